"""``rnnserve``: serve models, stream a demo session, list models.

Every setting is a flag of ``rnnserve serve`` and an environment variable ``RNNSERVE_<NAME>``;
flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from service.settings import Settings

if TYPE_CHECKING:
    import grpc

    from service._proto.rnnserve.v1 import streaming_pb2 as pb
    from service.client import Client
    from service.demo import DemoPlan, DemoScore


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
    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def command_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 1 with one line (no traceback) when start-up fails for
    an operator's reason: a port, the snapshot directory, Redis, the model repository or one of
    its models, the execution provider or event loop asked for."""
    from service.errors import ModelContractError
    from service.event_loop import EventLoopUnavailable
    from service.event_loop import run as run_event_loop
    from service.logs import configure_logging
    from service.runtime import ProviderUnavailable
    from service.server import RnnServer, StartupError

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_event_loop(
            RnnServer(settings).serve_until_signal(),
            settings.event_loop,
            settings.gil_switch_interval_s,
        )
    except (StartupError, ModelContractError, ProviderUnavailable, EventLoopUnavailable) as error:
        print(f"rnnserve: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


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
            raise ValueError(f"--token-file {args.token_file} is empty")
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


def command_models(args: argparse.Namespace) -> int:
    """List the models the server has loaded, one line each."""
    with connect(args, timeout_s=args.timeout_s) as client:
        for m in client.models():
            print(
                f"{m.name}/{m.version}\t{m.cell}\tlayers={m.layers} hidden={m.hidden_size}\t"
                f"in={m.input_size} out={m.output_size}\t{m.task}"
            )
    return 0


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


def matplotlib_missing() -> bool:
    """True when matplotlib (the ``plot`` extra) cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def check_plot_path(path: Path | None) -> int:
    """Before anything streams: 0 when ``--plot`` can be written, else 2 after one line saying why."""
    if path is None:
        return 0
    if matplotlib_missing():
        print("rnnserve: --plot needs matplotlib: pip install 'rnnserve[plot]'", file=sys.stderr)
        return 2
    if not path.parent.is_dir():
        print(f"rnnserve: --plot {path}: folder {path.parent} does not exist", file=sys.stderr)
        return 2
    return 0


def stream_sequences(client: Client, model: str, sequences: list[Any], chunk: int) -> list[Any]:
    """Stream each sequence through its own session (closed after it), ``chunk`` steps per
    message; the outputs [steps, outputs] of each."""
    import numpy as np

    outputs = []
    for inputs in sequences:
        with client.open_session(model) as session:
            parts = [
                session.step(inputs[start : start + chunk])
                for start in range(0, len(inputs), chunk)
            ]
        outputs.append(np.concatenate(parts))
    return outputs


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], show: int) -> None:
    """At most ``show`` rows, spread evenly over ``rows``, in aligned columns."""
    if show == 0 or not rows:
        return
    picked = rows if len(rows) <= show else [rows[i] for i in spread(len(rows), show)]
    widths = [max(len(r[c]) for r in (header, *picked)) for c in range(len(header))]
    for row in (header, *picked):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if len(picked) < len(rows):
        print(f"({len(picked)} of {len(rows)} rows; --show N for more)")


def spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first and last included."""
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class StreamedDemo:
    """A demo streamed through the server: the model, the plan and its score."""

    model: pb.ModelInfo
    task: str
    plan: DemoPlan
    score: DemoScore


def stream_demo(client: Client, args: argparse.Namespace) -> StreamedDemo:
    """Stream the demo of ``args.model`` (its task's, or ``args.task``'s) and score it."""
    import json

    from service.demo import plan_for

    info = client.model(args.model)
    metadata = json.loads(info.metadata_json) if info.metadata_json else {}
    task = args.task or info.task
    plan = plan_for(task, metadata, steps=args.steps, sequences=args.sequences, seed=args.seed)
    outputs = stream_sequences(client, args.model, plan.sequences, args.chunk)
    return StreamedDemo(info, task, plan, plan.score(outputs))


def print_demo(demo: StreamedDemo, chunk: int, show: int) -> None:
    """What was streamed, a table of examples, and each measure beside the documented one."""
    info, plan = demo.model, demo.plan
    print(f"model {info.name}/{info.version} ({info.cell}), task {demo.task}: {plan.description}")
    print(plan.summary(chunk))
    for note in plan.notes:
        print(note)
    print_table(demo.score.header, demo.score.rows, show)
    for measure in demo.score.measures:
        print(measure.line())


def command_stream(args: argparse.Namespace) -> int:
    """Stream the model's demo through the server and compare the served outputs with the task's
    targets by the task's own measure, beside the model's documented test-set figure."""
    refused = check_plot_path(args.plot)
    if refused:
        return refused
    with connect(args, timeout_s=30) as client:
        demo = stream_demo(client, args)
    print_demo(demo, args.chunk, args.show)
    if args.plot:
        title = f"{demo.model.name}: {demo.plan.description}"
        plot_demo(args.plot, demo.score, title)
        print(f"plot written to {args.plot}")
    return 0


def plot_demo(path: Path, score: DemoScore, title: str) -> None:
    """A PNG of the score's curves (target and served prediction) against steps or sequences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.5))
    for index, (label, values) in enumerate(score.curves.items()):
        if score.markers:  # target as a ring, served value as a cross: both show where they agree
            ax.plot(values, "ox"[min(index, 1)], fillstyle="none", label=label, ms=8 - 3 * index)
        else:
            ax.plot(values, lw=1, alpha=0.8, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(score.x_label)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve", description="Streaming inference for recurrent models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model repository over gRPC")
    add_settings_flags(serve)
    serve.set_defaults(handler=command_serve)

    models = commands.add_parser("models", help="list the models a server has loaded")
    models.add_argument("--target", default="127.0.0.1:8001", help="server address host:port")
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
    stream.add_argument("--target", default="127.0.0.1:8001", help="server address host:port")
    stream.add_argument("--model", required=True, help="model name, e.g. timer_lstm")
    stream.add_argument("--task", default=None, help="demo task (default: the model's task)")
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
    except ValueError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            raise
        print(f"{program}: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
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
    return exit_code("rnnserve", lambda: int(args.handler(args)))


if __name__ == "__main__":
    sys.exit(main())
