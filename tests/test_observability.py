"""Metrics exposition (checked by promtool), health and reflection."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shutil
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.server import KSERVE_SERVICE, NATIVE_SERVICE, RnnServer
from tests.grpc_helpers import channel, native, step_request

EXPECTED_METRICS = (
    "rnnserve_request_latency_seconds",
    "rnnserve_queue_wait_seconds",
    "rnnserve_compute_seconds",
    "rnnserve_batch_size",
    "rnnserve_active_sessions",
    "rnnserve_state_bytes",
    "rnnserve_steps_total",
    "rnnserve_sessions_started_total",
    "rnnserve_sessions_ended_total",
    "rnnserve_failures_total",
    "rnnserve_gc_pause_seconds",
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def exercise(server: RnnServer) -> str:
    """Open, step, close and one failed step; returns the session id used."""
    async with channel(server.grpc_port) as ch:
        stub = native(ch)
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model="tiny_gru"))).session_id
        await stub.Step(step_request("tiny_gru", sid, np.zeros((3, 3), np.float32)))
        await stub.CloseSession(pb.CloseSessionRequest(model="tiny_gru", session_id=sid))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Step(step_request("tiny_gru", sid, np.zeros((1, 3), np.float32)))
    return str(sid)


async def test_metrics_exposition_has_every_metric_and_moves(server: RnnServer) -> None:
    session_id = await exercise(server)
    gc.collect()  # one full collection, timed by the running server
    text = await asyncio.to_thread(scrape, server.metrics_port)
    for name in EXPECTED_METRICS:
        assert f"\n{name}" in text or text.startswith(name), name
    assert 'rnnserve_steps_total{model="tiny_gru",version="1"} 3.0' in text
    assert 'rnnserve_sessions_ended_total{model="tiny_gru",reason="closed",version="1"} 1.0' in text
    assert 'rnnserve_failures_total{api="native",code="NOT_FOUND"} 1.0' in text
    assert session_id not in text and "session_id" not in text  # labels stay low-cardinality
    full_collections = r'rnnserve_gc_pause_seconds_count{generation="2"} (\d+)'
    assert int(float(re.search(full_collections + r"\.0", text).group(1))) >= 1  # type: ignore[union-attr]


async def test_a_stopped_server_stops_timing_collections(make_settings: Any) -> None:
    server = RnnServer(make_settings())
    await server.start()
    assert server._gc_pauses._on_collection in gc.callbacks
    await server.stop()
    assert server._gc_pauses._on_collection not in gc.callbacks


def test_freezing_start_up_objects_takes_them_out_of_collections() -> None:
    from service.gc_pauses import freeze_start_up_objects

    try:
        frozen = freeze_start_up_objects()
        assert frozen == gc.get_freeze_count() > 1000
        assert len(gc.get_objects()) < frozen  # what collections still scan
    finally:
        gc.unfreeze()


async def test_promtool_accepts_the_exposition(server: RnnServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip(
            "promtool not installed (apt-get install prometheus); CI always runs this check"
        )
    await exercise(server)
    text = await asyncio.to_thread(scrape, server.metrics_port)
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate(text.encode())
    assert process.returncode == 0, output.decode()


async def test_health_is_serving_after_load_and_reflection_lists_services(
    server: RnnServer,
) -> None:
    async with channel(server.grpc_port) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", NATIVE_SERVICE, KSERVE_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> list[str]:
            call = reflect.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            return [s.name for s in reply.list_services_response.service]

        names = await ask()
        assert NATIVE_SERVICE in names and KSERVE_SERVICE in names


async def test_health_goes_not_serving_on_stop(make_settings: Any) -> None:
    srv = RnnServer(make_settings())
    await srv.start()
    await srv.stop()
    assert not srv.engine.ready
