"""``rnnserve``: serve models, stream a demo session, list models.

Every setting is a flag of ``rnnserve serve`` and an environment variable ``RNNSERVE_<NAME>``;
flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

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
    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def command_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 1 with one line (no traceback) when something the
    server needs from outside fails at start (a port, the snapshot directory, Redis)."""
    from service.event_loop import run as run_event_loop
    from service.logs import configure_logging
    from service.server import RnnServer, StartupError

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_event_loop(
            RnnServer(settings).serve_until_signal(),
            settings.event_loop,
            settings.gil_switch_interval_s,
        )
    except StartupError as error:
        print(f"rnnserve: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def command_models(args: argparse.Namespace) -> int:
    from service.client import Client

    with Client(args.target, timeout_s=10) as client:
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
    if args.tls_ca_file is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca_file.read_bytes(),
            private_key=args.tls_key_file.read_bytes() if args.tls_key_file else None,
            certificate_chain=args.tls_cert_file.read_bytes() if args.tls_cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", args.tls_server_name)]
        channel = grpc.secure_channel(target, credentials, options=options)
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


def command_stream(args: argparse.Namespace) -> int:
    import numpy as np

    from service.client import Client
    from service.demo import demo_for_task

    with Client(args.target, timeout_s=30) as client:
        info = client.model(args.model)
        task = args.task or info.task
        demo = demo_for_task(task, args.steps, args.seed)
        outputs = []
        with client.open_session(args.model) as session:
            for start in range(0, len(demo.inputs), args.chunk):
                outputs.append(session.step(demo.inputs[start : start + args.chunk]))
            steps = session.steps
        prediction = np.concatenate(outputs)
    print(f"model {info.name}/{info.version} ({info.cell}), task {task}: {demo.description}")
    print(f"session streamed {steps} steps in chunks of {args.chunk}")
    has_target = ~np.isnan(demo.targets).any(axis=1)
    rows = np.flatnonzero(has_target)
    shown = (
        rows
        if len(rows) <= args.show
        else rows[np.linspace(0, len(rows) - 1, args.show).astype(int)]
    )
    print(f"{'step':>6}  {'input':<24} {'target':<20} prediction")

    def fmt(v: np.ndarray) -> str:
        return np.array2string(v, precision=3, suppress_small=True)

    for t in shown:
        print(f"{t:>6}  {fmt(demo.inputs[t]):<24} {fmt(demo.targets[t]):<20} {fmt(prediction[t])}")
    error = prediction[has_target] - demo.targets[has_target]
    print(
        f"mean squared error over {int(has_target.sum())} targeted steps: {float(np.mean(error**2)):.5f}"
    )
    if args.plot:
        plot_stream(
            args.plot, demo.inputs, demo.targets, prediction, f"{info.name}: {demo.description}"
        )
        print(f"plot written to {args.plot}")
    return 0


def plot_stream(path: Path, inputs: Any, targets: Any, prediction: Any, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'rnnserve[plot]'") from None
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.plot(targets[:, 0], color="black", lw=2, label="target")
    ax.plot(prediction[:, 0], lw=1, label="served prediction")
    ax.plot(inputs[:, 0], lw=0.6, alpha=0.6, label="input[0]")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    models.set_defaults(handler=command_models)

    health = commands.add_parser(
        "health", help="exit 0 if the server reports SERVING (health probe)"
    )
    health.add_argument(
        "--target",
        default=None,
        help="host:port (default 127.0.0.1 and RNNSERVE_GRPC_PORT or 8001)",
    )
    health.add_argument("--service", default="", help="service name to check ('' = the server)")
    health.add_argument("--timeout-s", type=float, default=2.0, help="how long to wait, in seconds")
    health.add_argument(
        "--tls-ca-file", type=Path, default=None, help="PEM CA of the server certificate (TLS)"
    )
    health.add_argument(
        "--tls-server-name",
        default="localhost",
        help="name the server certificate must carry (TLS; default localhost)",
    )
    health.add_argument(
        "--tls-cert-file", type=Path, default=None, help="PEM client certificate (mutual TLS)"
    )
    health.add_argument(
        "--tls-key-file", type=Path, default=None, help="PEM client key (mutual TLS)"
    )
    health.set_defaults(handler=command_health)

    stream = commands.add_parser(
        "stream", help="stream a demo sequence through a session and compare with targets"
    )
    stream.add_argument("--target", default="127.0.0.1:8001", help="server address host:port")
    stream.add_argument("--model", required=True, help="model name, e.g. timer_lstm")
    stream.add_argument("--task", default=None, help="demo task (default: the model's task)")
    stream.add_argument("--steps", type=int, default=600, help="steps to stream (default 600)")
    stream.add_argument("--chunk", type=int, default=1, help="steps per chunk (default 1)")
    stream.add_argument("--seed", type=int, default=0, help="seed of the demo stream")
    stream.add_argument("--show", type=int, default=12, help="rows of the table to print")
    stream.add_argument(
        "--plot", type=Path, default=None, help="write a PNG of target vs prediction"
    )
    stream.set_defaults(handler=command_stream)
    return parser


def exit_code(program: str, command: Callable[[], int]) -> int:
    """Run a command line's ``command``: a bad value exits 2 and a gRPC error 1, each with a
    one-line message instead of a traceback; Ctrl-C exits 130."""
    try:
        return command()
    except KeyboardInterrupt:
        return 130
    except ValueError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        import grpc

        if isinstance(error, grpc.RpcError):
            print(f"{program}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code("rnnserve", lambda: int(args.handler(args)))


if __name__ == "__main__":
    sys.exit(main())
