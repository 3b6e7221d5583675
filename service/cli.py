"""``rnnserve``: serve models, stream a demo session, list models.

Every setting is a flag of ``rnnserve serve`` and an environment variable ``RNNSERVE_<NAME>``;
flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from service.cli_client import (
    add_connection_flags,
    channel_credentials,
    channel_options,
    check_connection_flags,
    connect,
    repository_lines,
)
from service.cli_stream import command_stream
from service.errors import UsageError
from service.settings import Settings


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, documented with its description, unit, default and env name."""
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        help_text = f"{field.description} [env RNNSERVE_{name.upper()}; default {field.default}]"
        choices = None
        kind: Any = str
        origin = typing.get_origin(annotation)
        if annotation is SecretStr:
            continue  # secrets come from the environment only: argv is visible to every user
        if annotation is bool:
            parser.add_argument(
                flag_name(name),
                dest=name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
            continue
        if origin is typing.Literal:
            choices = list(typing.get_args(annotation))
        elif annotation is int:
            kind = int
        elif annotation is float:
            kind = float
        elif annotation in (Path, Path | None):
            kind = Path
        parser.add_argument(
            flag_name(name), dest=name, type=kind, choices=choices, default=None, help=help_text
        )


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings: flags over ``RNNSERVE_*`` environment variables over defaults. A value out
    of range is a UsageError naming the flag and the variable (one line, exit 2)."""

    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise UsageError(settings_problems(error)) from None


def settings_problems(error: ValidationError) -> str:
    """Pydantic's errors as one line, each naming the flag and the environment variable."""
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        where = f"{flag_name(field)} (RNNSERVE_{field.upper()})" if field else "settings"
        problems.append(f"{where}: {problem['msg']}")
    return "; ".join(problems)


def command_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 1 with one line (no traceback) when start-up fails for
    an operator's reason: a port, the snapshot directory, Redis, the model repository or one of
    its models, the execution provider or event loop asked for."""
    # gRPC's C core would print its own (plain text) line beside ours when a port is taken; the
    # server reports every start-up failure itself, in the log format asked for.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from service.errors import ModelContractError
    from service.event_loop import EventLoopUnavailable
    from service.event_loop import run as run_event_loop
    from service.logs import configure_logging
    from service.runtime import ProviderUnavailable
    from service.server import RnnServer, StartupError

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        if settings.workers > 1:  # a supervisor of N servers on one port (service/workers.py)
            from service.workers import supervise

            return supervise(settings, args)
        run_event_loop(
            RnnServer(settings).serve_until_signal(),
            settings.event_loop,
            settings.gil_switch_interval_s,
        )
    except (StartupError, ModelContractError, ProviderUnavailable, EventLoopUnavailable) as error:
        if settings.log_format == "json":  # a log pipeline parses this line too
            logging.getLogger("service.cli").error("cannot start: %s", error)
        else:
            print(f"rnnserve: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


TARGET_HELP = "server address host:port (default: 127.0.0.1 and RNNSERVE_GRPC_PORT, else 8001)"


def default_target(args: argparse.Namespace) -> None:
    """``--target``, defaulting to this machine at the port ``RNNSERVE_GRPC_PORT`` names."""
    if getattr(args, "target", "") is None:
        try:
            args.target = f"127.0.0.1:{Settings().grpc_port}"
        except ValidationError as error:
            raise UsageError(settings_problems(error)) from None


def command_models(args: argparse.Namespace) -> int:
    """List the models the server serves (a line each, then their tensors, states and labels),
    then those it refused and why."""
    with connect(args, timeout_s=args.timeout_s) as client:
        repository = client.repository()
    for line in repository_lines(repository):
        print(line)
    return 0


def command_check(args: argparse.Namespace) -> int:
    """``rnnserve check PATH`` (service/cli_check.py; imported here so that the client commands
    need not load onnxruntime)."""
    from service.cli_check import check_repository

    return check_repository(args.path)


def command_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server's gRPC health service answers SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or f"127.0.0.1:{Settings().grpc_port}"
    credentials = channel_credentials(args)
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=channel_options(args))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, else a clear error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve", description="Streaming inference for recurrent models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model repository over gRPC")
    add_settings_flags(serve)
    serve.set_defaults(handler=command_serve)

    check = commands.add_parser(
        "check",
        help="check a model repository, or one model version folder, as the server would at load",
        description="Run the server's load checks offline (model.json, onnxruntime load, the "
        "tensors by name, and streaming behaviour on random inputs); one line per problem; "
        "exit 1 if any model fails, 0 otherwise. Needs no server and no torch.",
    )
    check.add_argument(
        "path", type=Path, help="a repository (<name>/<version>/) or a version folder"
    )
    check.set_defaults(handler=command_check)

    models = commands.add_parser("models", help="list the models a server has loaded")
    models.add_argument("--target", default=None, help=TARGET_HELP)
    models.add_argument(
        "--timeout-s", type=positive_seconds, default=10.0, help="how long to wait, in seconds"
    )
    add_connection_flags(models, server_name=None, token=True)
    models.set_defaults(handler=command_models, command_parser=models)

    health = commands.add_parser(
        "health", help="exit 0 if the server reports SERVING (health probe)"
    )
    health.add_argument(
        "--target",
        default=None,
        help="host:port (default 127.0.0.1 and RNNSERVE_GRPC_PORT or 8001)",
    )
    health.add_argument("--service", default="", help="service name to check ('' = the server)")
    health.add_argument(
        "--timeout-s", type=positive_seconds, default=2.0, help="how long to wait, in seconds"
    )
    add_connection_flags(health, server_name="localhost", token=False)  # probes need no token
    health.set_defaults(handler=command_health, command_parser=health)

    stream = commands.add_parser(
        "stream",
        help="stream a model's demo through the server and score it by the task's measure",
        description="Stream inputs of the model's task (drawn as in training, at the lengths "
        "it was trained on) through the server, each sequence in its own session, and compare "
        "the served outputs with the targets by the task's measure, beside the model's "
        "documented test-set figure. Demos: timer, adding, temporal_order, co2.",
    )
    stream.add_argument("--target", default=None, help=TARGET_HELP)
    stream.add_argument("--model", required=True, help="model name, e.g. timer_lstm")
    stream.add_argument(
        "--task",
        default=None,
        help="demo task, for a model whose model.json names none (default: the model's task)",
    )
    stream.add_argument(
        "--steps",
        type=whole_number(1),
        default=None,
        help="steps of each sequence (default: the task's own: the trained lengths, 4000 for "
        "the timer, the whole series for co2)",
    )
    stream.add_argument(
        "--sequences",
        type=whole_number(1),
        default=None,
        help="sequences to stream, for per-sequence tasks (adding, temporal_order; default 20)",
    )
    stream.add_argument(
        "--chunk", type=whole_number(1), default=1, help="steps per message (default 1)"
    )
    stream.add_argument(
        "--seed", type=whole_number(0), default=0, help="seed of the demo inputs (default 0)"
    )
    stream.add_argument(
        "--show", type=whole_number(0), default=12, help="rows of the table to print (0: none)"
    )
    stream.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write a PNG of target vs served prediction (needs pip install 'rnnserve[plot]')",
    )
    add_connection_flags(stream, server_name=None, token=True)
    stream.set_defaults(handler=command_stream, command_parser=stream)
    return parser


def exit_code(program: str, command: Callable[[], int]) -> int:
    """Run a command line's ``command``: a bad value exits 2, a gRPC error or a file that cannot
    be read 1, each with a one-line message instead of a traceback; Ctrl-C exits 130."""
    try:
        return command()
    except KeyboardInterrupt:
        return 130
    except UsageError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            raise
        print(f"{program}: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    except Exception as error:
        import grpc

        if isinstance(error, grpc.RpcError):
            print(f"{program}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_connection_flags(args)

    def run() -> int:
        default_target(args)
        return int(args.handler(args))

    return exit_code("rnnserve", run)


if __name__ == "__main__":
    sys.exit(main())
