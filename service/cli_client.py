"""The client commands' connection: TLS and mutual TLS from files, a bearer token from a file or
the environment (never from the command line), and their flags; and what ``rnnserve models``
prints of a repository."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import UsageError

if TYPE_CHECKING:
    import grpc

    from service._proto.rnnserve.v1 import streaming_pb2 as pb
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


SHOWN_LABELS = 10  # labels listed by name; the rest are counted
SHOWN_TOKENS = 10  # vocabulary entries listed; the rest are counted
SHOWN_TEXT_CHARS = 24  # one label or token, quoted, cut to this


def repository_lines(repository: pb.ListModelsResponse) -> list[str]:
    """What ``rnnserve models`` prints: each served model (its line, then its tensors, states and
    any labels or vocabulary, indented), then each refused model and why."""
    lines = []
    for model in repository.models:
        lines.extend(model_lines(model))
    for refused in repository.refused:
        lines.append(f"{refused_label(refused)}\tNOT SERVED: {refused.reason}")
    return lines


def refused_label(refused: pb.RefusedModel) -> str:
    """A refused version as ``name/version``; a model refused as a whole (its serving.json is
    invalid: no version is tried) as ``name (serving.json)``."""
    if refused.version:
        return f"{refused.name}/{refused.version}"
    return f"{refused.name} (serving.json)"


def model_lines(m: pb.ModelInfo) -> list[str]:
    """One served model: a summary line, then one indented line per kind of detail; a long list
    of labels or tokens shows its size and its first entries, never all of it."""
    lines = [
        f"{m.name}/{m.version}\t{m.cell}\tlayers={m.layers} hidden={m.hidden_size}\t"
        f"in={m.input_size} out={m.output_size}\t{m.task}"
    ]
    inputs = list(m.inputs) or ([m.input] if m.HasField("input") else [])  # an older server
    outputs = list(m.outputs) or ([m.output] if m.HasField("output") else [])
    lines.append("  inputs:  " + ", ".join(tensor_text(t) for t in inputs))
    lines.append("  outputs: " + ", ".join(tensor_text(t) for t in outputs))
    if m.states:
        states = ", ".join(
            f"{s.input_name} -> {s.output_name} {s.datatype} {shape_text(s.shape, steps=False)}"
            for s in m.states
        )
        initial = sorted({s.initial for s in m.states if s.initial})
        lines.append(f"  state:   {states}" + (f" (from {', '.join(initial)})" if initial else ""))
    elif m.state:  # an older server: the states by their input names only
        states = ", ".join(
            f"{s.name} {s.datatype} {shape_text(s.shape, steps=False)}" for s in m.state
        )
        lines.append(f"  state:   {states}")
    if m.labels:
        lines.append(f"  labels:  {len(m.labels)} classes: {texts(m.labels, SHOWN_LABELS)}")
    if m.vocabulary:
        lines.append(
            f"  vocabulary: {len(m.vocabulary)} tokens: {texts(m.vocabulary, SHOWN_TOKENS)}"
        )
    return lines


def tensor_text(tensor: pb.TensorSpec) -> str:
    return f"{tensor.name} {tensor.datatype} {shape_text(tensor.shape, steps=True)}"


def shape_text(shape: Sequence[int], *, steps: bool) -> str:
    """``[steps, 3]``: an input's or output's first axis is the chunk's steps; any other dynamic
    axis reads ``?``."""
    axes = [
        "steps" if steps and axis == 0 and size < 0 else "?" if size < 0 else str(size)
        for axis, size in enumerate(shape)
    ]
    return f"[{', '.join(axes)}]"


def texts(items: Sequence[str], shown: int) -> str:
    """The first ``shown`` of ``items``, each quoted (a newline or a space token stays visible)
    and cut short, then how many more there are."""
    quoted = [
        repr(item) if len(item) <= SHOWN_TEXT_CHARS else repr(item[:SHOWN_TEXT_CHARS]) + "..."
        for item in items[:shown]
    ]
    if len(items) > shown:
        quoted.append(f"... ({len(items) - shown} more)")
    return ", ".join(quoted)
