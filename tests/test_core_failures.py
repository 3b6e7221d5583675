"""The core fails loudly instead of hanging: regression tests for three defects of the old core.

1. Requests queued behind one in flight on a KServe stream recursed through done callbacks and
   overflowed Python's recursion limit: part of the replies never came and the stream never ended.
2. A batch loop that stopped left every chunk of its model hanging, health still SERVING.
3. A KServe stream was read whether or not the client read its replies: server memory grew without
   bound under a client that never reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.snapshots import DirectorySnapshots, decode, snapshot_key
from tests.grpc_helpers import channel, expect_code, infer_request, kserve, native, serving

MODEL = "tiny_gru"  # 3 features, 2 outputs
ROOT = Path(__file__).resolve().parent.parent


async def test_2000_malformed_requests_behind_one_in_flight_are_all_answered(
    make_settings: Any,
) -> None:
    # A second live session and a 1 s batching delay keep the first request in flight while the
    # malformed ones of the same sequence arrive behind it.
    async with serving(make_settings(max_queue_delay_s=1.0)) as srv, channel(srv.grpc_port) as ch:
        await native(ch).CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="other"))
        x = np.ones((2, 3), np.float32)

        async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
            yield infer_request(MODEL, 5, x, start=True, request_id="first")
            for i in range(2000):
                bad = infer_request(MODEL, 5, x, request_id=str(i))
                bad.inputs[0].name = "z"  # the model's input is x
                yield bad

        async def read_all() -> list[kpb.ModelStreamInferResponse]:
            return [reply async for reply in kserve(ch).ModelStreamInfer(requests())]

        replies = await asyncio.wait_for(read_all(), timeout=120)  # the stream ends
        assert len(replies) == 2001
        errors = [r for r in replies if r.error_message]
        assert len(errors) == 2000 and all("exactly one input named 'x'" in r.error_message
                                           for r in errors)  # fmt: skip
        (good,) = [r for r in replies if not r.error_message]
        assert good.infer_response.id == "first"
        assert good.infer_response.parameters["sequence_steps"].int64_param == 2


async def test_a_model_whose_batch_loop_stops_is_not_ready_and_fails_fast(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(snapshot_backend="directory", snapshot_dir=tmp_path / "state")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub, health = kserve(ch), health_pb2_grpc.HealthStub(ch)
        x = np.ones((2, 3), np.float32)
        await stub.ModelInfer(infer_request(MODEL, 9, x, start=True))
        srv.engine.model(MODEL).batcher._task.cancel()  # the loop stops, as if it had died
        for _ in range(1000):  # let the loop run the task's done callback: no timer
            if srv.engine.model(MODEL).batcher.failure is not None:
                break
            await asyncio.sleep(0)
        assert not (await stub.ModelReady(kpb.ModelReadyRequest(name=MODEL))).ready
        assert (await stub.ModelReady(kpb.ModelReadyRequest(name="tiny_lstm"))).ready
        details = await expect_code(
            grpc.StatusCode.UNAVAILABLE, stub.ModelInfer(infer_request(MODEL, 9, x))
        )
        assert f"model {MODEL}/1 is not available" in details
        check = health_pb2.HealthCheckRequest(service=f"model/{MODEL}/1")
        for _ in range(1000):  # the health update is a task of its own
            if (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        ready = srv.metrics.registry.get_sample_value(
            "rnnserve_model_ready", {"model": MODEL, "version": "1"}
        )
        assert ready == 0.0
        started = time.monotonic()
    assert time.monotonic() - started < srv.settings.drain_timeout_s  # the stop did not wait on it
    # ... and still wrote the shutdown snapshot, the failed model's sequence in it.
    snapshot = decode(DirectorySnapshots(tmp_path / "state").read(snapshot_key(MODEL, "1")) or b"")
    assert [(r.session_id, r.steps) for r in snapshot.sessions] == [("9", 2)]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server_process(tiny_repository: Path, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """``rnnserve serve`` in a process of its own (its memory is measured): (pid, gRPC port)."""
    ports = tmp_path / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", "--model-repository", str(tiny_repository), "--port-file",
         str(ports), "--snapshot-backend", "none", "--session-ttl-s", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:  # until it serves
            if "serving" in line:
                break
        else:
            pytest.fail(f"server exited with {process.wait()}")
        # Keep reading its log so that a full pipe never blocks it.
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield process.pid, json.loads(ports.read_text())["grpc_port"]
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


WRITE_FOR_S = 20.0
CHUNK_STEPS = 2730  # 32 KiB of float32 per request, 21 KiB per reply
MEMORY_BOUND_BYTES = 64 * 1024 * 1024


@pytest.mark.slow
async def test_a_client_that_never_reads_replies_leaves_server_memory_bounded(
    server_process: tuple[int, int],
) -> None:
    # The bound: the stream's window (64 unanswered requests) of 32 KiB requests and 21 KiB
    # replies is 3.4 MiB; gRPC's HTTP/2 flow-control windows hold at most a few MiB more in each
    # direction; 64 MiB leaves room for the allocator. The old server read everything: over
    # 100 MiB within seconds.
    pid, port = server_process
    x = np.random.default_rng(0).standard_normal((CHUNK_STEPS, 3)).astype(np.float32)
    async with channel(port) as ch:
        call = kserve(ch).ModelStreamInfer()
        await call.write(infer_request(MODEL, 1, x[:1], start=True, request_id="start"))
        assert (await call.read()).error_message == ""  # the server is warm and the sequence open
        before = rss_bytes(pid)
        deadline = time.monotonic() + WRITE_FOR_S
        written = 0
        while (remaining := deadline - time.monotonic()) > 0:
            try:  # a write waits while the server does not read: flow control
                await asyncio.wait_for(call.write(infer_request(MODEL, 1, x)), remaining)
            except TimeoutError:
                break
            written += 1
        grown = rss_bytes(pid) - before
        call.cancel()
    print(
        f"\n{written} requests written in {WRITE_FOR_S:.0f} s; server memory grew {grown / 2**20:.1f} MiB"
    )
    assert written > 64  # the client did push past the window
    assert grown < MEMORY_BOUND_BYTES


async def test_a_failed_request_breaks_its_kserve_sequence_until_a_start(
    make_settings: Any,
) -> None:
    # Requests pipelined behind a failed one would apply to a history that lacks it: they are
    # refused (clear error) rather than answered with outputs that differ from the offline run.
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        x = np.ones((2, 3), np.float32)

        async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
            yield infer_request(MODEL, 8, x, start=True, request_id="start")
            bad = infer_request(MODEL, 8, x, request_id="bad")
            bad.inputs[0].datatype = "FP64"
            yield bad
            yield infer_request(MODEL, 8, x, request_id="behind")

        replies = {r.infer_response.id: r async for r in stub.ModelStreamInfer(requests())}
        assert replies["start"].error_message == ""
        assert "must be FP32" in replies["bad"].error_message
        assert "cannot go on: an earlier request of it failed" in replies["behind"].error_message
        details = await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, stub.ModelInfer(infer_request(MODEL, 8, x))
        )
        assert "send START to begin it again" in details
        again = await stub.ModelInfer(infer_request(MODEL, 8, x, start=True))
        assert again.parameters["sequence_steps"].int64_param == 2  # a new sequence
        more = await stub.ModelInfer(infer_request(MODEL, 8, x, end=True))
        assert more.parameters["sequence_steps"].int64_param == 4
