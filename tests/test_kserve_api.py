"""KServe v2 / Triton sequence protocol with the generated stubs (tritonclient: test_tritonclient.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service.errors import NotFound
from service.server import RnnServer
from tests.grpc_helpers import channel, expect_code, infer_output, infer_request, kserve
from tests.models_for_tests import OfflineReference

MODEL = "tiny_gru"


@pytest.fixture
async def stub(server: RnnServer) -> AsyncIterator[Any]:
    async with channel(server.grpc_port) as ch:
        yield kserve(ch)


async def test_server_and_model_metadata(stub: Any) -> None:
    assert (await stub.ServerLive(kpb.ServerLiveRequest())).live
    assert (await stub.ServerReady(kpb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(kpb.ModelReadyRequest(name=MODEL))).ready
    assert not (await stub.ModelReady(kpb.ModelReadyRequest(name="nope"))).ready
    meta = await stub.ServerMetadata(kpb.ServerMetadataRequest())
    assert meta.name == "rnnserve" and "sequence" in meta.extensions
    model = await stub.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL))
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("x", "FP32", [-1, -1, 3])
    ]
    assert [(t.name, list(t.shape)) for t in model.outputs] == [("y", [-1, -1, 2])]
    config = (await stub.ModelConfig(kpb.ModelConfigRequest(name=MODEL))).config
    assert config.HasField("sequence_batching") and config.max_batch_size > 0
    assert list(config.input[0].dims) == [-1, 3]


async def test_sequence_start_continue_end_matches_offline(stub: Any, server: RnnServer) -> None:
    x = np.random.default_rng(1).standard_normal((9, 3)).astype(np.float32)
    reference = OfflineReference(server.settings.model_repository, MODEL)(x)
    r1 = await stub.ModelInfer(infer_request(MODEL, 77, x[:2], start=True, request_id="a"))
    r2 = await stub.ModelInfer(infer_request(MODEL, 77, x[2:6], raw=False, request_id="b"))
    r3 = await stub.ModelInfer(infer_request(MODEL, 77, x[6:], end=True, request_id="c"))
    assert [r.id for r in (r1, r2, r3)] == ["a", "b", "c"]
    assert r3.parameters["sequence_steps"].int64_param == 9
    got = np.concatenate([infer_output(r) for r in (r1, r2, r3)])
    np.testing.assert_allclose(got, reference, atol=1e-5)
    details = await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(infer_request(MODEL, 77, x[:1]))
    )
    assert "START" in details  # ended sequences are unknown again


async def test_string_ids_and_restart_on_start(stub: Any, server: RnnServer) -> None:
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    reference = OfflineReference(server.settings.model_repository, MODEL)(x)
    await stub.ModelInfer(infer_request(MODEL, "user-9", x[:3], start=True))
    again = await stub.ModelInfer(
        infer_request(MODEL, "user-9", x, start=True)
    )  # START on a live id restarts
    np.testing.assert_allclose(infer_output(again), reference, atol=1e-5)


async def test_protocol_errors(stub: Any) -> None:
    x = np.zeros((2, 3), np.float32)
    no_id = infer_request(MODEL, 1, x, start=True)
    del no_id.parameters["sequence_id"]
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(no_id))
    wrong_name = infer_request(MODEL, 2, x, start=True)
    wrong_name.inputs[0].name = "input"
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(wrong_name))
    wrong_type = infer_request(MODEL, 3, x, start=True)
    wrong_type.inputs[0].datatype = "FP64"
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(wrong_type))
    batch_two = infer_request(MODEL, 4, x, start=True)
    batch_two.inputs[0].shape[:] = [2, 1, 3]
    details = await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(batch_two))
    assert "batch size 1" in details
    short = infer_request(MODEL, 5, x, start=True)
    short.raw_input_contents[0] = b"\0" * 7
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(short))
    await expect_code(
        grpc.StatusCode.NOT_FOUND, stub.ModelInfer(infer_request("nope", 6, x, start=True))
    )
    await expect_code(
        grpc.StatusCode.NOT_FOUND, stub.ModelMetadata(kpb.ModelMetadataRequest(name="nope"))
    )


async def test_stream_errors_stay_in_band_and_the_stream_continues(
    stub: Any, server: RnnServer
) -> None:
    x = np.random.default_rng(4).standard_normal((6, 3)).astype(np.float32)
    reference = OfflineReference(server.settings.model_repository, MODEL)(x)
    requests = [
        infer_request(MODEL, 10, x[:3], start=True, request_id="1"),
        infer_request(MODEL, 11, x[:1], request_id="bad"),  # no START for an unknown id
        infer_request(MODEL, 10, x[3:], end=True, request_id="2"),
    ]

    async def send() -> AsyncIterator[kpb.ModelInferRequest]:
        for r in requests:
            yield r

    replies = {r.infer_response.id: r async for r in stub.ModelStreamInfer(send())}
    assert set(replies) == {"1", "bad", "2"}
    assert "START" in replies["bad"].error_message
    assert replies["1"].error_message == "" and replies["2"].error_message == ""
    got = np.concatenate(
        [infer_output(replies["1"].infer_response), infer_output(replies["2"].infer_response)]
    )
    np.testing.assert_allclose(got, reference, atol=1e-5)
    failures = server.metrics.registry.get_sample_value(
        "rnnserve_failures_total", {"api": "kserve", "code": "INVALID_ARGUMENT", "model": MODEL}
    )
    assert failures == 1.0


async def test_cancelled_stream_leaves_the_server_healthy(stub: Any, server: RnnServer) -> None:
    x = np.ones((3, 3), np.float32)

    async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
        yield infer_request(MODEL, "gone", x, start=True, request_id="0")
        await asyncio.Event().wait()  # never finishes writing: the client cancels instead

    call = stub.ModelStreamInfer(requests())
    first = await call.read()
    assert first.error_message == ""
    call.cancel()
    store = server.engine.model(MODEL).store
    session = store.get("gone")
    assert not session.busy and session.steps == 3  # applied, and nothing left in flight
    again = await stub.ModelInfer(infer_request(MODEL, "gone", x, end=True))
    assert again.parameters["sequence_steps"].int64_param == 6


async def test_interleaved_sequences_on_one_stream_apply_in_order(
    stub: Any, server: RnnServer
) -> None:
    # Three sequences, three chunks each, all sent at once round-robin: each sequence's chunks
    # must apply in their order (the second waits for the first), while the sequences batch.
    rng = np.random.default_rng(9)
    inputs = {name: rng.standard_normal((6, 3)).astype(np.float32) for name in "abc"}
    reference = OfflineReference(server.settings.model_repository, MODEL)
    requests = [
        infer_request(MODEL, f"seq-{name}", x[2 * k : 2 * k + 2], start=k == 0, end=k == 2,
                      request_id=f"{name}{k}")
        for k in range(3)
        for name, x in inputs.items()
    ]  # fmt: skip

    async def send() -> AsyncIterator[kpb.ModelInferRequest]:
        for r in requests:
            yield r

    replies = {r.infer_response.id: r async for r in stub.ModelStreamInfer(send())}
    assert len(replies) == 9 and not any(r.error_message for r in replies.values())
    for name, x in inputs.items():
        chunks = [replies[f"{name}{k}"].infer_response for k in range(3)]
        assert [c.parameters["sequence_steps"].int64_param for c in chunks] == [2, 4, 6]
        got = np.concatenate([infer_output(c) for c in chunks])
        np.testing.assert_allclose(got, reference(x), atol=1e-5)
    store = server.engine.model(MODEL).store
    for name in inputs:  # END closed each sequence
        with pytest.raises(NotFound):
            store.get(f"seq-{name}")
