"""Metrics exposition (checked by promtool), health and reflection."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.server import KSERVE_SERVICE, NATIVE_SERVICE, RnnServer
from tests.grpc_helpers import (
    channel,
    expect_code,
    infer_request,
    kserve,
    native,
    step_request,
)

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
    assert 'rnnserve_failures_total{api="native",code="NOT_FOUND",model="tiny_gru"} 1.0' in text
    assert session_id not in text and "session_id" not in text  # labels stay low-cardinality
    full_collections = r'rnnserve_gc_pause_seconds_count{generation="2"} (\d+)'
    assert int(float(re.search(full_collections + r"\.0", text).group(1))) >= 1  # type: ignore[union-attr]


async def test_failures_are_counted_under_the_served_model_they_name(server: RnnServer) -> None:
    """The model label is a model the server serves, or empty: a name a client made up never
    becomes a label value (cardinality stays bounded by the repository)."""
    made_up = "no_such_model_4711"
    x = np.zeros((1, 3), np.float32)
    async with channel(server.grpc_port) as ch:
        stub, triton = native(ch), kserve(ch)
        not_found = grpc.StatusCode.NOT_FOUND
        await expect_code(not_found, stub.CreateSession(pb.CreateSessionRequest(model=made_up)))
        await expect_code(not_found, stub.Step(step_request("tiny_gru", "gone", x)))
        await expect_code(not_found, triton.ModelMetadata(kpb.ModelMetadataRequest(name=made_up)))
        await expect_code(not_found, triton.ModelInfer(infer_request(made_up, 1, x, start=True)))
        bad = grpc.StatusCode.INVALID_ARGUMENT
        await expect_code(bad, triton.ModelInfer(infer_request("tiny_lstm", 7, x)))  # no START

        async def stream() -> Any:
            yield infer_request("tiny_gru", 8, x, request_id="no-start")
            yield infer_request(made_up, 9, x, start=True, request_id="made-up")

        replies = [r async for r in triton.ModelStreamInfer(stream())]
        assert all(r.error_message for r in replies) and len(replies) == 2

        async def session_stream() -> Any:
            yield pb.StreamRequest(open=pb.CreateSessionRequest(model="tiny_gru"))
            yield pb.StreamRequest(chunk=pb.Chunk(input=pb.Tensor(shape=[1, 99], data=b"")))

        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in stub.Stream(session_stream()):
                pass
    text = await asyncio.to_thread(scrape, server.metrics_port)
    counted = {
        (labels["api"], labels["code"], labels["model"]): value
        for name, labels, value in samples(text)
        if name == "rnnserve_failures_total"
    }
    assert counted == {
        ("native", "NOT_FOUND", ""): 1.0,
        ("native", "NOT_FOUND", "tiny_gru"): 1.0,
        ("native", "INVALID_ARGUMENT", "tiny_gru"): 1.0,
        ("kserve", "NOT_FOUND", ""): 3.0,  # metadata, infer, in a stream
        ("kserve", "INVALID_ARGUMENT", "tiny_lstm"): 1.0,
        ("kserve", "INVALID_ARGUMENT", "tiny_gru"): 1.0,
    }, counted
    assert made_up not in text


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The exposition's samples as (name, labels, value)."""
    found = []
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            found.append((match.group(1), labels, float(match.group(3))))
    return found


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
    if promtool is None:  # never a silent skip: the README's test command installs it
        pytest.fail("promtool is missing: bash scripts/test.sh installs it (Debian's prometheus)")
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


ROOT = Path(__file__).resolve().parent.parent


def with_an_unused_initializer(source: Path, target: Path) -> None:
    """Copy the model version ``source`` to ``target`` with one initializer no node uses, which
    onnxruntime warns about (in colour, on stderr) each time it opens the model."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source / "model.onnx"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "unused"))
    target.mkdir(parents=True)
    onnx.save(model, str(target / "model.onnx"))
    metadata = json.loads((source / "model.json").read_text())
    metadata["sha256"] = hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest()
    (target / "model.json").write_text(json.dumps(metadata))


def test_json_logs_are_json_from_the_first_line(tmp_path: Path) -> None:
    """``--log-format json`` on the bundled models, and one model onnxruntime warns about: every
    line the server writes until it serves is one JSON object (onnxruntime's own logger, which
    prints coloured text to stderr, reports errors only)."""
    repository = tmp_path / "models"
    shutil.copytree(ROOT / "models", repository)
    with_an_unused_initializer(repository / "adding_gru" / "1", repository / "warns_gru" / "1")
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
               "--grpc-port", "0", "--metrics-port", "0", "--model-repository", str(repository),
               "--snapshot-backend", "none", "--log-format", "json"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, process.kill)  # a server that never serves fails, not hangs
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "serving" in line:
                break
    finally:
        watchdog.cancel()
        process.terminate()
        process.communicate(timeout=60)
    assert lines and "serving" in lines[-1], lines
    for line in lines:
        entry = json.loads(line)  # not a coloured onnxruntime warning
        assert set(entry) >= {"ts", "level", "logger", "message"}, line
    assert any("loaded model warns_gru/1" in json.loads(line)["message"] for line in lines)
