"""Small async helpers for talking to a test server over both APIs with the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.native_messages import to_array, to_tensor
from service.server import RnnServer
from service.settings import Settings


def channel(server_port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server_port}")


def native(ch: grpc.aio.Channel) -> pb_grpc.StreamingInferenceStub:
    return pb_grpc.StreamingInferenceStub(ch)


def kserve(ch: grpc.aio.Channel) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(ch)


def step_request(model: str, session_id: str, x: np.ndarray, end: bool = False) -> pb.StepRequest:
    return pb.StepRequest(model=model, session_id=session_id, input=to_tensor(x), end=end)


def output_of(response: pb.StepResponse) -> np.ndarray:
    return to_array(response.output, "output")


def infer_request(
    model: str,
    sequence_id: int | str,
    x: np.ndarray,
    start: bool = False,
    end: bool = False,
    raw: bool = True,
    request_id: str = "",
) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, id=request_id)
    if isinstance(sequence_id, str):
        request.parameters["sequence_id"].string_param = sequence_id
    else:
        request.parameters["sequence_id"].int64_param = sequence_id
    if start:
        request.parameters["sequence_start"].bool_param = True
    if end:
        request.parameters["sequence_end"].bool_param = True
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def infer_output(response: kpb.ModelInferResponse) -> np.ndarray:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(shape)[0]


async def expect_code(code: grpc.StatusCode, call: Any) -> str:
    """Await ``call``, assert it fails with ``code``, and return the error's details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[RnnServer]:
    """A started server for the block, stopped afterwards whatever happens."""
    server = RnnServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def hold_batches(runner: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold every batch of ``runner`` (a model's BatchRunner) before it computes: ``computing`` is
    set once one is held, and the batches go on when ``go_on`` is set. A chunk is then in flight
    for as long as a test needs, with no timer deciding it."""
    computing, go_on = asyncio.Event(), asyncio.Event()
    run = runner.run

    async def held(inputs: Any, states: Any) -> Any:
        computing.set()
        await go_on.wait()
        return await run(inputs, states)

    runner.run = held
    return computing, go_on
