"""Two capacity figures: start-up time (process start to SERVING) and the memory of idle sessions."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.bench.harness import ServerProcess, start_server
from service.bench.loadgen import require_loopback
from service.repository import discover, read_spec


def measure_startup(repository: Path, runs: int = 3) -> dict[str, Any]:
    """Seconds from spawning ``rnnserve serve`` to its health SERVING with every model loaded.

    The server logs "serving" right after it sets health to SERVING, so the time to that line is
    the time a readiness probe would first succeed. The median of ``runs`` starts is reported.
    """
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        server = start_server(repository)
        times.append(time.perf_counter() - started)
        server.stop()
    return {
        "models": len(discover(repository)),
        "startup_s_median": statistics.median(times),
        "startup_s_all": times,
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _open_sessions(target: str, model: str, count: int, concurrency: int = 64) -> None:
    require_loopback(target)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.StreamingInferenceStub(channel)
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                await stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=30)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure_idle_sessions(repository: Path, model: str, count: int) -> dict[str, Any]:
    """Server RSS before and after opening ``count`` sessions of ``model`` that then sit idle,
    against their raw state bytes (layers x hidden x float32 x state tensors per session)."""
    spec = read_spec(sorted(p for p in (repository / model).iterdir() if p.is_dir())[-1])
    server: ServerProcess = start_server(repository, max_sessions=count)
    try:
        before = rss_bytes(server.process.pid)
        started = time.perf_counter()
        asyncio.run(_open_sessions(server.target, model, count))
        opened_s = time.perf_counter() - started
        after = rss_bytes(server.process.pid)
    finally:
        server.stop()
    raw = count * len(spec.state_inputs) * spec.num_layers * spec.hidden_size * 4
    grown = after - before
    budget = 1.2 * raw + 100 * 2**20
    return {
        "model": model,
        "sessions": count,
        "open_s": opened_s,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "rss_growth_mb": grown / 2**20,
        "raw_state_mb": raw / 2**20,
        "budget_mb": budget / 2**20,
        "within_budget": grown < budget,
    }
