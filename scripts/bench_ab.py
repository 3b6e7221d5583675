"""Interleaved A/B runs of one load point: server settings against each other and the no-op.

The machine's speed drifts between runs (a shared VM), so variants are measured in turns (A, B,
no-op, A, B, no-op, ...) and compared by their medians, which is how docs/PERFORMANCE.md's
"interleaved runs" were taken. Each point starts a fresh server on loopback.

python scripts/bench_ab.py --runs 4                                  # defaults against the no-op
python scripts/bench_ab.py --rate 2700 max_queue_delay_s=0 default   # open loop, two settings
python scripts/bench_ab.py --api kserve --model adding_gru default noop
python scripts/bench_ab.py --rate 2700 default zero-model noop       # the model call's share

Variants: ``default``; comma-separated ``setting=value`` pairs for ``rnnserve serve``; ``noop``
(the transport limit, ``grpc.aio``); ``noop-threads`` (the same on the synchronous thread-pool
server); ``zero-model`` (the server with every model call answering zeros);
``checkout=PATH[,setting=value...]`` (the server of another source tree, e.g. an older commit:
``python -m service.cli serve`` run with PATH as working directory and first on PYTHONPATH,
with the settings given after it). The other variants run this checkout's server.

Comparing this checkout with an older commit (the worktree shares this repository's history):

git worktree add /tmp/base <commit>
python scripts/bench_ab.py --runs 5 checkout=/tmp/base default noop              # 256 sessions, chunk 1
python scripts/bench_ab.py --rate 2700 --runs 5 checkout=/tmp/base default noop  # open loop
git worktree remove /tmp/base

For the open-loop half-load point, pass half the closed-loop steps per second that ``python -m
bench`` measured at that point as ``--rate`` (chunks per second, all sessions together). The other
tree's server must accept this checkout's start-up flags (``--host``, ``--grpc-port``,
``--metrics-port``, ``--model-repository``, ``--session-ttl-s``, ``--snapshot-backend``,
``--port-file``) and log "serving" when it serves. Every variant loads ``--model-repository``
(this checkout's bundled models by default), so both trees serve the same models.

Run from the checkout root or anywhere: the script puts the checkout on ``sys.path`` itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: bench, service

from bench.harness import ServerProcess, start_noop_server, start_server
from bench.loadgen import LoadConfig
from bench.sweep import measure
from service.repository import read_spec
from service.settings import BUNDLED_MODELS

COLUMNS = ("steps_per_s", "p50_ms", "p99_ms", "p99_from_send_ms", "server_cpu_per_request_us",
           "machine_steal")  # fmt: skip


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``setting=value`` pairs as a dict (a ``ValueError`` names a pair without ``=``)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ValueError(f"expected setting=value, got {pair!r}")
        settings[name] = value
    return settings


def start(variant: str, repository: Path, outputs: int) -> ServerProcess:
    """``noop``, ``noop-threads``, ``zero-model``, ``default``, ``checkout=PATH`` followed by
    optional ``,setting=value`` pairs, or comma-separated ``setting=value`` pairs for ``rnnserve
    serve``."""
    if variant == "noop":
        return start_noop_server(outputs)
    if variant == "noop-threads":
        return start_noop_server(outputs, flavour="threads")
    if variant == "zero-model":
        return start_server(repository, zero_model=True)
    if variant == "default":
        return start_server(repository)
    first, *rest = variant.split(",")
    if first.startswith("checkout="):
        source = Path(first.removeprefix("checkout=")).expanduser()
        return start_server(repository, source=source, **parse_settings(rest))
    return start_server(repository, **parse_settings(variant.split(",")))


def check_variant(variant: str) -> None:
    """Refuse a malformed variant before any server starts (a typo would waste the other runs)."""
    if variant in ("noop", "noop-threads", "zero-model", "default"):
        return
    first, *rest = variant.split(",")
    if first.startswith("checkout="):
        source = Path(first.removeprefix("checkout=")).expanduser()
        if not (source / "service" / "cli.py").is_file():
            raise SystemExit(f"{variant}: {source} is not a source tree (no service/cli.py)")
        pairs = rest
    else:
        pairs = variant.split(",")
    try:
        parse_settings(pairs)
    except ValueError as error:
        raise SystemExit(f"variant {variant!r}: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("variants", nargs="*", default=["default", "noop"])
    parser.add_argument("--model-repository", type=Path, default=BUNDLED_MODELS)
    parser.add_argument("--model", default="adding_lstm")
    parser.add_argument("--api", choices=("native", "kserve"), default="native")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1, help="steps per chunk")
    parser.add_argument("--rate", type=float, default=None, help="open loop: chunks per second")
    parser.add_argument("--runs", type=int, default=3, help="turns per variant")
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    args = parser.parse_args()
    for variant in args.variants:
        check_variant(variant)

    spec = read_spec(args.model_repository / args.model / "1")
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for turn in range(args.runs):
        for variant in args.variants:
            server = start(variant, args.model_repository.resolve(), spec.output_size)
            try:
                cfg = LoadConfig(target=server.target, model=args.model, features=spec.input_size,
                                 api=args.api, sessions=args.sessions, chunk_steps=args.chunk,
                                 duration_s=args.duration_s, warmup_s=args.warmup_s,
                                 rate_per_s=args.rate)  # fmt: skip
                row = measure(server, cfg)
            finally:
                server.stop()
            rows[variant].append(row)
            print(f"turn {turn + 1}/{args.runs} {variant}: "
                  + " ".join(f"{k}={row[k]:.4g}" for k in COLUMNS), flush=True)  # fmt: skip
    print("\n| variant | " + " | ".join(f"median {c}" for c in COLUMNS) + " | all steps/s |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for variant, measured in rows.items():
        medians = [statistics.median(r[c] for r in measured) for c in COLUMNS]
        every = ", ".join(f"{r['steps_per_s']:,.0f}" for r in measured)
        print(f"| {variant} | " + " | ".join(f"{m:,.4g}" for m in medians) + f" | {every} |")


if __name__ == "__main__":
    main()
