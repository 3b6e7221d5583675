"""The core's own CPU per chunk, in-process: no gRPC, no load generator, so far less noise than a
served A/B on a shared machine. For judging a change to the core (engine, batcher, batch
computation, session store, metrics) against another commit, in turns:

    git worktree add /tmp/base <commit>
    for turn in 1 2 3; do
        PYTHONPATH=/tmp/base python scripts/core_probe.py; python scripts/core_probe.py
    done

It loads the bundled models and drives one (``--model``) with ``--sessions`` sessions of one-step
chunks: "closed" keeps every session's next chunk queued as soon as its last is answered (batches
as large as the load allows), "single" sends one chunk at a time (batches of one: the per-batch
cost). It prints the best of ``--repeats`` as microseconds of process CPU per chunk, the model
calls included. The core is the one on ``sys.path``: that of ``PYTHONPATH`` when set. A core from
before the 2026-11 rework has ``step`` where the current one has ``submit``; both are driven.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np

import service
from service.engine import InferenceEngine
from service.event_loop import run_to_result
from service.metrics import Metrics
from service.settings import Settings

BUNDLED = Path(__file__).resolve().parent.parent / "models"


async def probe(args: argparse.Namespace) -> dict[str, float]:
    settings = Settings(model_repository=args.model_repository, snapshot_backend="none",
                        session_ttl_s=0)  # fmt: skip
    engine = InferenceEngine(settings, Metrics())
    engine.load_models()
    await engine.start()
    model = engine.model(args.model).spec
    ids = []
    for _ in range(args.sessions):
        view = engine.open_session(args.model, api="native")
        if inspect.isawaitable(view):  # async since the cluster (kept runnable on older revs)
            view = await view
        ids.append(view.session_id)
    x = np.zeros((1, model.input_size), np.float32)
    entry: Any = getattr(engine, "submit", None) or engine.step  # type: ignore[attr-defined]

    def chunk(session_id: str) -> Awaitable[Any]:
        return entry(args.model, "", session_id, x, api="native", received_s=time.perf_counter())

    async def session_loop(session_id: str, chunks: int) -> None:
        for _ in range(chunks):
            await chunk(session_id)

    async def closed() -> None:
        await asyncio.gather(*(session_loop(i, args.chunks) for i in ids))

    async def single() -> None:
        for k in range(args.chunks * 4):
            await chunk(ids[k % len(ids)])

    results: dict[str, float] = {}
    for name, run, count in (("closed", closed, args.chunks * len(ids)),
                             ("single", single, args.chunks * 4)):  # fmt: skip
        await run()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            started = time.process_time()
            await run()
            best = min(best, (time.process_time() - started) / count * 1e6)
        results[name] = best
    await engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=BUNDLED)
    parser.add_argument("--model", default="adding_lstm")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=100, help="per session and run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = run_to_result(probe(args), "auto")
    source = Path(service.__file__).resolve().parent.parent
    print(f"{source}: closed {results['closed']:.1f} µs, single {results['single']:.1f} µs "
          "of CPU per chunk")  # fmt: skip


if __name__ == "__main__":
    main()
