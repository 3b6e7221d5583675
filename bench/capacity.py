"""Capacity figures: start-up time (process start to SERVING), the memory of idle sessions, and
how fast a loaded server admits new work (new streams, unary calls)."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.harness import REPO_ROOT, ServerProcess, source_env, start_server
from bench.loadgen import CHANNEL_OPTIONS, require_loopback
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.repository import ModelSpec, discover, read_spec, version_key


def _latest_spec(repository: Path, model: str) -> ModelSpec:
    """The spec of ``model``'s newest version, ordered as the server orders versions."""
    versions = [p for p in (repository / model).iterdir() if p.is_dir()]
    return read_spec(max(versions, key=lambda p: version_key(p.name)))


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
    spec = _latest_spec(repository, model)
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


async def _open_burst(target: str, model: str, count: int) -> float:
    """Seconds until ``count`` native streams, opened at once over one fresh connection, have all
    been answered (their sessions are then closed)."""
    require_loopback(target)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.StreamingInferenceStub(channel)

        async def open_one() -> grpc.aio.StreamStreamCall:
            call = stub.Stream(timeout=120)
            await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=model)))
            await call.read()
            return call

        started = time.perf_counter()
        calls = await asyncio.gather(*(open_one() for _ in range(count)))
        elapsed = time.perf_counter() - started
        for call in calls:
            await call.write(pb.StreamRequest(close=pb.Close()))
            await call.read()
            await call.done_writing()
    return elapsed


async def _unary_steps_per_s(
    target: str, model: str, features: int, sessions: int, duration_s: float
) -> float:
    """Unary ``Step`` calls per second answered for ``sessions`` concurrent sessions, each sending
    its next step when the last is answered, over ``duration_s``."""
    require_loopback(target)
    x = pb.Tensor(shape=[1, features], data=bytes(4 * features))
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.StreamingInferenceStub(channel)
        ids = [
            (await stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=60)).session_id
            for _ in range(sessions)
        ]
        answered = 0
        stop_s = time.perf_counter() + duration_s

        async def stepper(session_id: str) -> None:
            nonlocal answered
            request = pb.StepRequest(model=model, session_id=session_id, input=x)
            while time.perf_counter() < stop_s:
                await stub.Step(request, timeout=60)
                answered += 1

        started = time.perf_counter()
        await asyncio.gather(*map(stepper, ids))
        elapsed = time.perf_counter() - started
        for session_id in ids:
            await stub.CloseSession(pb.CloseSessionRequest(model=model, session_id=session_id))
    return answered / elapsed


def measure_admission(
    repository: Path,
    model: str,
    busy_sessions: int = 256,
    new_streams: int = 100,
    unary_sessions: int = 16,
    unary_s: float = 2.5,
) -> dict[str, Any]:
    """How fast the server takes on new work, idle and while ``busy_sessions`` sessions stream
    chunks in a closed loop (the load runs in a child process): the seconds until ``new_streams``
    streams opened at once are all answered, and unary ``Step`` calls per second from
    ``unary_sessions`` sessions. Every new call, a stream or a unary request, has to be accepted
    by grpc.aio's server loop first (docs/PERFORMANCE.md, "Capacity")."""
    spec = _latest_spec(repository, model)
    server = start_server(repository)
    try:
        idle_open_s = asyncio.run(_open_burst(server.target, model, new_streams))
        idle_unary = asyncio.run(
            _unary_steps_per_s(server.target, model, spec.input_size, unary_sessions, unary_s)
        )
        load_command = [sys.executable, "-m", "bench.loadgen", "--target", server.target,
                        "--model", model, "--features", str(spec.input_size),
                        "--sessions", str(busy_sessions), "--duration-s", "600",
                        "--warmup-s", "0.5"]  # fmt: skip
        load = subprocess.Popen(
            load_command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=source_env()
        )
        try:
            assert load.stdout is not None
            if load.stdout.readline().strip() != "measuring":  # blocks until the load runs
                raise RuntimeError(f"the background load ended early (exit {load.wait()})")
            busy_open_s = asyncio.run(_open_burst(server.target, model, new_streams))
            busy_unary = asyncio.run(
                _unary_steps_per_s(server.target, model, spec.input_size, unary_sessions, unary_s)
            )
        finally:
            load.terminate()
            load.wait()
            if load.stdout is not None:
                load.stdout.close()
    finally:
        server.stop()
    return {
        "model": model,
        "busy_sessions": busy_sessions,
        "new_streams": new_streams,
        "unary_sessions": unary_sessions,
        "idle_open_s": idle_open_s,
        "busy_open_s": busy_open_s,
        "idle_unary_steps_per_s": idle_unary,
        "busy_unary_steps_per_s": busy_unary,
    }
