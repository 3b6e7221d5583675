"""Malformed requests that once escaped the error catalogue (issue #16), over both APIs.

Each gets a documented code with a short message: shapes whose zero dimension hides absurd ones
(once INTERNAL), bytes that do not parse as the request message (once UNKNOWN), client strings of
100 KB in names and ids (once RESOURCE_EXHAUSTED: the message quoting them did not fit a status),
and KServe inputs whose contents contradict each other (once silently accepted).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.handlers import add_service
from service.metrics import Metrics
from service.server import RnnServer
from tests.grpc_helpers import channel, expect_code, infer_request, kserve, native, serving

MODEL = "tiny_lstm"
GOOD = np.ones((2, 3), np.float32)
# A zero dimension makes each of these hold no values, so no byte count can refuse them.
HUGE_EMPTY_SHAPES = [[2**62, 0], [2**62, 2**62, 0], [0, 2**62], [2**30, 2**30, 2**30, 0]]
HUGE_TEXT = "n" * 100_000  # a client string far over what a status message can carry
SHORT_MESSAGE_CHARS = 400  # a message quoting at most ~100 characters of client input fits here
TOKEN = "alice-token-0123456789"
NATIVE = "/rnnserve.v1.StreamingInference/"
KSERVE = "/inference.GRPCInferenceService/"


def failures(server: RnnServer, api: str, code: str) -> float:
    """``rnnserve_failures_total{api, code}`` as the server counts it now, over every model."""
    return sum(
        sample.value
        for family in server.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "rnnserve_failures_total"
        and (sample.labels["api"], sample.labels["code"]) == (api, code)
    )


async def stream_failure(call: Any, *messages: Any) -> grpc.aio.AioRpcError:
    """Write ``messages`` to a bidirectional ``call`` and read until it fails (it must)."""
    for message in messages:
        await call.write(message)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            if await call.read() == grpc.aio.EOF:
                break
    return info.value


async def kserve_stream_replies(stub: Any, *requests: Any) -> list[kpb.ModelStreamInferResponse]:
    """Send ``requests`` on one ModelStreamInfer stream; its replies, in order of arrival."""

    async def send() -> AsyncIterator[Any]:
        for request in requests:
            yield request

    return [reply async for reply in stub.ModelStreamInfer(send())]


def with_tensor(shape: list[int]) -> pb.Tensor:
    """A native tensor of ``shape`` holding no bytes."""
    return pb.Tensor(shape=shape, data=b"")


def kserve_shaped(shape: list[int], raw: bool) -> kpb.ModelInferRequest:
    """A START request whose input has ``shape`` and no values (raw: one empty raw entry)."""
    request = infer_request(MODEL, 700, GOOD, start=True, raw=raw)
    request.inputs[0].shape[:] = shape
    request.inputs[0].contents.Clear()
    del request.raw_input_contents[:]
    if raw:
        request.raw_input_contents.append(b"")
    return request


# --- 6: a zero-size shape with huge dimensions -------------------------------------------------


@pytest.mark.parametrize("shape", HUGE_EMPTY_SHAPES, ids=str)
async def test_a_zero_size_shape_with_huge_dimensions_is_invalid_argument(
    make_settings: Any, shape: list[int]
) -> None:
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        n, k = native(ch), kserve(ch)
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
        bad_state = [with_tensor(shape), with_tensor(shape)]
        unary_calls = [
            n.Step(pb.StepRequest(model=MODEL, session_id="s", input=with_tensor(shape))),
            n.CreateSession(pb.CreateSessionRequest(model=MODEL, initial_state=bad_state)),
            k.ModelInfer(kserve_shaped(shape, raw=True)),
            k.ModelInfer(kserve_shaped(shape, raw=False)),
        ]
        for call in unary_calls:
            assert "shape" in await expect_code(grpc.StatusCode.INVALID_ARGUMENT, call)
        chunk = pb.StreamRequest(chunk=pb.Chunk(input=with_tensor(shape)))
        opened = pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
        bad_open = pb.StreamRequest(
            open=pb.CreateSessionRequest(model=MODEL, initial_state=bad_state)
        )
        for messages in ((opened, chunk), (bad_open,)):
            error = await stream_failure(n.Stream(), *messages)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        replies = await kserve_stream_replies(
            k, kserve_shaped(shape, raw=True), kserve_shaped(shape, raw=False)
        )
        assert [("shape" in r.error_message) for r in replies] == [True, True], replies
        assert failures(srv, "native", "INTERNAL") == failures(srv, "kserve", "INTERNAL") == 0


# --- 7: bytes that do not parse as the request -----------------------------------------------


def not_utf8(message: Any) -> bytes:
    """``message`` serialised, with its string field "ab" turned into two bytes that are not UTF-8
    (a proto3 string must be UTF-8)."""
    data: bytes = message.SerializeToString()
    assert data.count(b"\x02ab") == 1
    return data.replace(b"\x02ab", b"\x02\xff\xfe")


GARBAGE = b"\xff\xff\xff\xff\xff"  # a field tag that never ends


def raw_unary(ch: grpc.aio.Channel, method: str) -> Callable[..., Any]:
    """``method`` called with bytes as they are (no serialiser either way)."""
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


def raw_stream(ch: grpc.aio.Channel, method: str) -> Callable[..., Any]:
    return ch.stream_stream(method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize(
    ("method", "api", "payloads"),
    [
        (NATIVE + "Step", "native", [GARBAGE, not_utf8(pb.StepRequest(session_id="ab"))]),
        (NATIVE + "ListModels", "native", [GARBAGE]),
        (KSERVE + "ModelInfer", "kserve", [GARBAGE, not_utf8(kpb.ModelInferRequest(id="ab"))]),
        (KSERVE + "ModelReady", "kserve", [GARBAGE, not_utf8(kpb.ModelReadyRequest(name="ab"))]),
        (KSERVE + "ServerLive", "kserve", [GARBAGE]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_a_unary_request_that_does_not_parse_is_invalid_argument_and_counted(
    server: RnnServer, method: str, api: str, payloads: list[bytes]
) -> None:
    async with channel(server.grpc_port) as ch:
        call = raw_unary(ch, method)
        for payload in payloads:
            details = await expect_code(grpc.StatusCode.INVALID_ARGUMENT, call(payload))
            assert "does not parse" in details and len(details) < SHORT_MESSAGE_CHARS
    assert failures(server, api, "INVALID_ARGUMENT") == len(payloads)


@pytest.mark.parametrize(
    "payload",
    [GARBAGE, not_utf8(pb.StreamRequest(open=pb.CreateSessionRequest(model="ab")))],
    ids=["garbage", "utf8"],
)
async def test_a_native_stream_message_that_does_not_parse_fails_the_stream(
    server: RnnServer, payload: bytes
) -> None:
    opened = pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="st"))
    async with channel(server.grpc_port) as ch:
        call = raw_stream(ch, NATIVE + "Stream")()
        await call.write(opened.SerializeToString())
        assert pb.StreamResponse.FromString(await call.read()).opened.session_id == "st"
        error = await stream_failure(call, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in str(error.details())
    assert failures(server, "native", "INVALID_ARGUMENT") == 1
    # The session outlives its failed stream (detached, as after any failure) and still steps.
    async with channel(server.grpc_port) as ch:
        reply = await native(ch).Step(
            pb.StepRequest(
                model=MODEL, session_id="st", input=pb.Tensor(shape=[2, 3], data=GOOD.tobytes())
            )
        )
        assert reply.steps == 2


async def test_a_kserve_stream_answers_a_message_that_does_not_parse_in_band_and_goes_on(
    server: RnnServer,
) -> None:
    good = infer_request(MODEL, 710, GOOD, start=True, request_id="good")
    payloads = [GARBAGE, not_utf8(kpb.ModelInferRequest(model_name="ab")), good.SerializeToString()]
    async with channel(server.grpc_port) as ch:
        call = raw_stream(ch, KSERVE + "ModelStreamInfer")()
        replies = []
        for payload in payloads:
            await call.write(payload)
            replies.append(kpb.ModelStreamInferResponse.FromString(await call.read()))
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert ["does not parse" in r.error_message for r in replies] == [True, True, False]
    assert replies[2].infer_response.id == "good" and replies[2].infer_response.outputs
    assert failures(server, "kserve", "INVALID_ARGUMENT") == 2


async def test_with_bearer_tokens_an_unparsable_request_is_refused_for_its_token_first(
    make_settings: Any,
) -> None:
    async with (
        serving(make_settings(auth_tokens=f"alice:{TOKEN}")) as srv,
        channel(srv.grpc_port) as ch,
    ):
        step = raw_unary(ch, NATIVE + "Step")
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, step(GARBAGE))
        bearer = (("authorization", f"Bearer {TOKEN}"),)
        details = await expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, step(GARBAGE, metadata=bearer)
        )
        assert "does not parse" in details
        error = await stream_failure(raw_stream(ch, NATIVE + "Stream")(metadata=bearer), GARBAGE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


class YieldingHealth:
    """A health servicer whose Watch yields its replies (grpc's own awaits context.write): the
    two ways a unary-stream RPC can be written."""

    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


@pytest.mark.parametrize("servicer", [health_aio.HealthServicer, YieldingHealth])
async def test_a_unary_stream_rpc_refuses_a_request_that_does_not_parse(servicer: type) -> None:
    # Neither API has a unary-stream RPC; health's Watch is one, registered the same way here.
    server, metrics = grpc.aio.server(), Metrics()
    add_service(server, servicer(), health_pb2.DESCRIPTOR.services_by_name["Health"], "h", metrics)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel(port) as ch:
            watch = ch.unary_stream(
                "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in watch(GARBAGE):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "grpc.health.v1.HealthCheckRequest" in str(info.value.details())
            call = watch(health_pb2.HealthCheckRequest(service="x").SerializeToString())
            first = health_pb2.HealthCheckResponse.FromString(await call.read())
            assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            call.cancel()
    finally:
        await server.stop(None)
    counted = metrics.registry.get_sample_value(
        "rnnserve_failures_total", {"api": "h", "code": "INVALID_ARGUMENT", "model": ""}
    )
    assert counted == 1


# --- 8: client strings are quoted briefly ------------------------------------------------------


def long_named(field: str) -> kpb.ModelInferRequest:
    """A KServe START request with ``field`` of its input or output set to 100 KB of text."""
    request = infer_request(MODEL, 720, GOOD, start=True)
    if field == "output":
        request.outputs.add(name=HUGE_TEXT)
    else:
        setattr(request.inputs[0], field, HUGE_TEXT)
    return request


async def test_a_huge_client_string_is_quoted_briefly_so_the_real_code_arrives(
    server: RnnServer,
) -> None:
    async with channel(server.grpc_port) as ch:
        n, k = native(ch), kserve(ch)
        x = pb.Tensor(shape=[2, 3], data=GOOD.tobytes())
        cases = [
            (grpc.StatusCode.NOT_FOUND, n.Step(pb.StepRequest(model=HUGE_TEXT, session_id="s", input=x))),
            (grpc.StatusCode.NOT_FOUND, n.GetModel(pb.GetModelRequest(model=MODEL, version=HUGE_TEXT))),
            (grpc.StatusCode.NOT_FOUND, k.ModelInfer(infer_request(HUGE_TEXT, 721, GOOD, start=True))),
            (grpc.StatusCode.NOT_FOUND, k.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL, version=HUGE_TEXT))),
            (grpc.StatusCode.INVALID_ARGUMENT, k.ModelInfer(long_named("name"))),
            (grpc.StatusCode.INVALID_ARGUMENT, k.ModelInfer(long_named("datatype"))),
            (grpc.StatusCode.INVALID_ARGUMENT, k.ModelInfer(long_named("output"))),
        ]  # fmt: skip
        for code, call in cases:
            details = await expect_code(code, call)
            assert len(details) < SHORT_MESSAGE_CHARS and "100000 characters" in details, details


# --- 12: KServe contents that contradict each other --------------------------------------------


def contradicting(kind: str) -> kpb.ModelInferRequest:
    """A START request with contents a Triton server refuses."""
    request = infer_request(MODEL, 730, GOOD, start=True)
    if kind == "raw-and-typed":
        request.inputs[0].contents.fp32_contents.extend(GOOD.ravel().tolist())
    elif kind == "two-raw-entries":
        request.raw_input_contents.append(GOOD.tobytes())
    elif kind == "int-contents-for-fp32":
        del request.raw_input_contents[:]
        request.inputs[0].contents.int_contents.extend([1] * GOOD.size)
    return request


CONTRADICTIONS = {
    "raw-and-typed": "both",
    "two-raw-entries": "raw_input_contents",
    "int-contents-for-fp32": "int_contents",
}


@pytest.mark.parametrize(("kind", "fragment"), CONTRADICTIONS.items())
async def test_kserve_contents_that_contradict_each_other_are_invalid_argument(
    server: RnnServer, kind: str, fragment: str
) -> None:
    async with channel(server.grpc_port) as ch:
        k = kserve(ch)
        details = await expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, k.ModelInfer(contradicting(kind))
        )
        assert fragment in details, details
        replies = await kserve_stream_replies(
            k, contradicting(kind), infer_request(MODEL, 731, GOOD, start=True)
        )
        assert fragment in replies[0].error_message and not replies[1].error_message
