"""``python -m bench``: the whole benchmark against servers it starts on loopback (run from the
checkout root). It measures the sweep (this server batched, batching off, the no-op transport limit
and onnxruntime's compute limit), the open-loop latency at half load, the capacity figures and the
targets, and writes bench.{json,md,png} (docs/PERFORMANCE.md)::

    python -m bench --out bench-results
    python -m bench --models adding_lstm --sessions 1 64 256 --chunks 1 --no-synthetic

``--target HOST:PORT`` measures a server that is already running (on this machine: the load
generator drives loopback addresses only) instead: the sweep of ``--models`` x ``--sessions`` x
``--chunks`` through its API, and its batch sizes given ``--metrics-port``; nothing to compare
with, no capacity figures, no server CPU time::

    python -m bench --target 127.0.0.1:8001 --metrics-port 8002 --models adding_lstm --sessions 1 64
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bench import suite
from bench.harness import RunningServer
from bench.loadgen import require_loopback
from bench.sweep import SweepPlan, run_sweep, write_outputs
from service.cli import exit_code
from service.settings import Settings


def run_against(args: argparse.Namespace) -> int:
    """The sweep against the running server ``args.target``, written as bench.{json,md,png}."""
    require_loopback(args.target)
    plan = SweepPlan(
        repository=args.model_repository,
        models=tuple(args.models),
        api=args.api,
        sessions=tuple(args.sessions),
        chunks=tuple(args.chunks),
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        compare=False,
    )
    rows = run_sweep(plan, RunningServer(args.target, args.metrics_port))
    for path in write_outputs(plan, rows, args.out, {"target": args.target}):
        print(path)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the whole comparison against servers this command starts on loopback, then write
    bench.{json,md,png}: the sweep, open-loop latency at half load, capacity, and the targets."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.target:
        return run_against(args)
    repository = suite.bench_repository(args.model_repository, args.out, args.synthetic)
    models = list(args.models)
    if args.synthetic and suite.SYNTHETIC not in models:
        models.append(suite.SYNTHETIC)
    spot = [] if args.no_spot else [
        p.parent.parent.name for p in sorted(repository.glob("*/*/model.onnx"))
        if p.parent.parent.name not in models
    ]  # fmt: skip
    plan = SweepPlan(
        repository=repository,
        models=tuple(models),
        api=args.api,
        sessions=tuple(args.sessions),
        chunks=tuple(args.chunks),
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        compare=not args.no_compare,
        spot_models=tuple(dict.fromkeys(spot)),
        spot_sessions=args.spot_sessions,
    )
    rows = run_sweep(plan)
    half_load = suite.half_load_latency(plan, rows, [*plan.models, *plan.spot_models])
    figures = suite.capacity(
        args.model_repository,
        suite.CapacityPlan(
            idle_sessions=args.idle_sessions,
            idle_model=args.idle_model,
            startup_runs=args.startup_runs,
            admission_streams=args.admission_streams,
            admission_busy_sessions=plan.spot_sessions,
            admission_unary_s=plan.duration_s,
        ),
    )
    targets = suite.check_targets(rows, half_load, figures, sessions=plan.spot_sessions)
    extra = {"half_load": half_load, "capacity": figures, "targets": targets}
    summary = suite.targets_markdown(targets, half_load)
    if figures["admission"]:
        summary += "\n" + suite.admission_markdown(figures["admission"])
    for path in write_outputs(plan, rows, args.out, extra, summary):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure throughput and latency against the transport and compute limits.",
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="measure this running server (loopback) instead of starting servers: the sweep "
        "only, batched as it is configured",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="with --target: the server's metrics port, for the batch sizes in the table",
    )
    parser.add_argument("--models", nargs="+", default=["adding_lstm"], help="models to load")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Settings.model_fields["model_repository"].default,
        help="model repository the servers load",
    )
    parser.add_argument(
        "--api", choices=("native", "kserve"), default="native", help="API to drive"
    )
    parser.add_argument(
        "--sessions",
        type=int,
        nargs="+",
        default=[1, 16, 64, 256, 1024],
        help="concurrent sessions to sweep",
    )
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[1, 16], help="steps per chunk to sweep"
    )
    parser.add_argument("--duration-s", type=float, default=2.5, help="measured seconds per point")
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=0.75,
        help="unmeasured seconds before each point, counted once every session has opened its "
        "stream (longer if some session has not been answered by then, up to 30 s more)",
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="only this server, batched (no limits)"
    )
    parser.add_argument(
        "--no-synthetic",
        dest="synthetic",
        action="store_false",
        help="skip the synthetic 2-layer LSTM with hidden 512 (exporting it needs torch)",
    )
    parser.add_argument(
        "--no-spot",
        action="store_true",
        help="skip the headline point (256 sessions, chunk 1) for the other repository models",
    )
    parser.add_argument(
        "--spot-sessions",
        type=int,
        default=256,
        help="sessions of the headline point and of the open-loop half-load point",
    )
    parser.add_argument(
        "--idle-sessions",
        type=int,
        default=100_000,
        help="idle sessions opened for the memory figure (0 skips it)",
    )
    parser.add_argument(
        "--idle-model",
        default="adding_lstm",
        help="model of the idle-session memory and the admission figures",
    )
    parser.add_argument(
        "--startup-runs", type=int, default=3, help="server starts timed for the start-up figure"
    )
    parser.add_argument(
        "--admission-streams",
        type=int,
        default=100,
        help="new streams opened at once, idle and beside --spot-sessions busy ones, for the "
        "admission figure (0 skips it)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="where bench.{json,md,png} go"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code("bench", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
