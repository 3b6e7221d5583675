"""The client commands' connection: TLS and mutual TLS from files, a bearer token from a file or
the environment (never from the command line), and their flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import UsageError

if TYPE_CHECKING:
    import grpc

    from service.client import Client


TOKEN_ENV = "RNNSERVE_CLIENT_TOKEN"


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from ``--tls-ca-file`` (and the client pair for mutual TLS); None: plaintext."""
    import grpc

    if args.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca_file.read_bytes(),
        private_key=args.tls_key_file.read_bytes() if args.tls_key_file else None,
        certificate_chain=args.tls_cert_file.read_bytes() if args.tls_cert_file else None,
    )


def channel_options(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The name the server certificate must carry, when it is not the target's host."""
    if args.tls_ca_file is None or not args.tls_server_name:
        return []
    return [("grpc.ssl_target_name_override", args.tls_server_name)]


def bearer_token(args: argparse.Namespace) -> str | None:
    """The token of ``--token-file``, else of the environment; None: send none."""
    if args.token_file is not None:
        token = str(args.token_file.read_text()).strip()
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def connect(args: argparse.Namespace, timeout_s: float) -> Client:
    """A client of ``--target`` with the command line's TLS and token."""
    from service.client import Client

    return Client(
        args.target,
        timeout_s=timeout_s,
        options=channel_options(args),
        credentials=channel_credentials(args),
        token=bearer_token(args),
    )


def readable_file(text: str) -> Path:
    """An argparse type: a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def add_connection_flags(
    parser: argparse.ArgumentParser, *, server_name: str | None, token: bool
) -> None:
    """TLS (``--tls-ca-file``, mutual TLS with ``--tls-cert-file``/``--tls-key-file``) and, for
    the commands that need one, a bearer token (``--token-file`` or the environment)."""
    parser.add_argument(
        "--tls-ca-file",
        type=readable_file,
        default=None,
        help="PEM CA of the server certificate: connect over TLS",
    )
    parser.add_argument(
        "--tls-server-name",
        default=server_name,
        help="name the server certificate must carry (TLS; default "
        + (server_name or "the host of --target")
        + ")",
    )
    parser.add_argument(
        "--tls-cert-file",
        type=readable_file,
        default=None,
        help="PEM client certificate (mutual TLS; with --tls-key-file and --tls-ca-file)",
    )
    parser.add_argument(
        "--tls-key-file",
        type=readable_file,
        default=None,
        help="PEM client key (mutual TLS; with --tls-cert-file)",
    )
    if token:
        parser.add_argument(
            "--token-file",
            type=readable_file,
            default=None,
            help=f"file holding the bearer token to send (default: ${TOKEN_ENV}, if set; "
            "never on the command line, where every user of the machine can read it)",
        )


def check_connection_flags(args: argparse.Namespace) -> None:
    """The TLS files come in the combinations that work; else a usage error (exit 2)."""
    if not hasattr(args, "tls_ca_file"):
        return
    parser: argparse.ArgumentParser = args.command_parser
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        parser.error("--tls-cert-file and --tls-key-file go together (mutual TLS)")
    if args.tls_cert_file is not None and args.tls_ca_file is None:
        parser.error("mutual TLS needs --tls-ca-file (the CA of the server certificate) too")
