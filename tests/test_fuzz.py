"""Property-based fuzzing of both APIs: random, mostly malformed, requests against one server.

Whatever arrives, the server answers with OK or a documented code (never INTERNAL or UNKNOWN),
keeps serving, and leaks no session: at the end it holds exactly the sessions the fuzzer opened and
did not close. Shapes include zero, negative and absurd dimensions; some requests are bytes that do
not parse (garbage, or a string field that is not UTF-8), sent to every kind of RPC. Derandomised,
so every run throws the same requests.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.server import RnnServer
from service.settings import Settings

MODELS = ["tiny_lstm", "tiny_gru"]
NATIVE = "/rnnserve.v1.StreamingInference/"
KSERVE = "/inference.GRPCInferenceService/"
NATIVE_UNARY = ["CreateSession", "Step", "CloseSession", "GetSession", "ListModels", "GetModel"]
KSERVE_UNARY = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelInfer", "ModelConfig"]  # fmt: skip
UNARY_METHODS = [NATIVE + m for m in NATIVE_UNARY] + [KSERVE + m for m in KSERVE_UNARY]
STREAM_METHODS = [NATIVE + "Stream", KSERVE + "ModelStreamInfer"]
NOT_UTF8_FIELD_1 = b"\x0a\x02\xff\xfe"  # field 1 (a string in most requests), not UTF-8
DOCUMENTED = {  # docs/ERRORS.md
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class ServerThread:
    """The server on its own event loop in a thread, so the fuzzer can use blocking stubs."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = RnnServer(settings)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=60)

    def call(self, function: Any) -> Any:
        """Run ``function()`` on the server's loop (to read its state safely) and return it."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)
        self.loop.close()


OUTCOMES: collections.Counter[str] = collections.Counter()  # reported with -s, for RELIABILITY.md


@pytest.fixture(scope="module")
def fuzz_server(tiny_repository: Any) -> Iterator[ServerThread]:
    server = ServerThread(Settings(host="127.0.0.1", grpc_port=0, metrics_port=0,
                                   model_repository=tiny_repository, session_ttl_s=0,
                                   snapshot_backend="none", max_chunk_steps=16,
                                   max_sessions=64, max_message_bytes=8192))  # fmt: skip
    yield server
    server.stop()
    print(f"\nfuzz: {sum(OUTCOMES.values())} requests: {dict(OUTCOMES.most_common())}")


# Mostly plausible values, so that requests get past the first checks and reach the deeper ones.
model_names = st.sampled_from([*MODELS, *MODELS, *MODELS, "", "nope", "tiny_lstm\0"])
versions = st.sampled_from(["", "", "", "1", "2", "x"])
session_ids = st.sampled_from(["a", "b", "c", "", "x" * 200, "\n", "5"])
huge_dims = st.sampled_from([0, 2**31, 2**62, 2**63 - 1, -(2**62), -1])
dims = st.lists(st.one_of(st.integers(-2, 20), huge_dims), min_size=0, max_size=4)
values = st.sampled_from([0.0, 1.0, -3.5, float("nan"), float("inf"), 1e38])


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    if draw(st.integers(0, 9)) < 6:  # a well-formed chunk for the tiny models (3 features)
        steps = draw(st.integers(1, 5))
        x = np.full((steps, 3), draw(values), np.float32)
        return pb.Tensor(shape=[steps, 3], data=x.tobytes())
    shape = draw(dims)
    if draw(st.booleans()) and all(d >= 0 for d in shape):
        count = math.prod(shape)  # Python ints: 2**62 * 2**62 does not wrap
        data = np.full(min(count, 4096), draw(values), np.float32).tobytes()
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(shape=shape, data=data)


@st.composite
def native_calls(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["create", "step", "close", "get"]))
    m, v, s = draw(model_names), draw(versions), draw(session_ids)
    if kind == "create":
        return kind, pb.CreateSessionRequest(model=m, version=v, session_id=s)
    if kind == "step":
        return kind, pb.StepRequest(model=m, version=v, session_id=s, input=draw(tensors()),
                                    end=draw(st.booleans()))  # fmt: skip
    if kind == "close":
        return kind, pb.CloseSessionRequest(model=m, version=v, session_id=s)
    return kind, pb.GetSessionRequest(
        model=m, version=v, session_id=s, include_state=draw(st.booleans())
    )


@st.composite
def kserve_calls(draw: st.DrawFn) -> tuple[str, Any]:
    request = kpb.ModelInferRequest(model_name=draw(model_names), model_version=draw(versions))
    sequence = draw(st.one_of(st.integers(-1, 4), st.sampled_from(["a", "", "b"]), st.none()))
    if isinstance(sequence, int):
        request.parameters["sequence_id"].int64_param = sequence
    elif isinstance(sequence, str):
        request.parameters["sequence_id"].string_param = sequence
    for flag in ("sequence_start", "sequence_end"):
        if draw(st.booleans()):
            request.parameters[flag].bool_param = True
    t = draw(tensors())
    tensor = request.inputs.add(name=draw(st.sampled_from(["x", "y", ""])),
                                datatype=draw(st.sampled_from(["FP32", "FP64", "INT8"])),
                                shape=[1, *t.shape] if draw(st.booleans()) else list(t.shape))  # fmt: skip
    if draw(st.booleans()):
        request.raw_input_contents.append(t.data)
    else:
        tensor.contents.fp32_contents.extend(
            np.frombuffer(t.data[: len(t.data) // 4 * 4], np.float32).tolist()
        )
    return "infer", request


@st.composite
def malformed_payloads(draw: st.DrawFn) -> bytes:
    """Bytes that mostly do not parse: garbage (some parses, as unknown fields), a field tag that
    never ends, or a plausible request whose first field is then overwritten with bytes that are
    not UTF-8 (a string there in most requests; a message in StreamRequest: malformed either way)."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=48))
    if kind == 1:
        return b"\xff" * draw(st.integers(1, 6))
    _, request = draw(st.one_of(native_calls(), kserve_calls()))
    data: bytes = request.SerializeToString()
    return data + NOT_UTF8_FIELD_1


@st.composite
def unparsable_calls(draw: st.DrawFn) -> tuple[str, Any]:
    """Malformed bytes as whole messages: each a unary call, or together on one stream."""
    method = draw(st.sampled_from([*UNARY_METHODS, *STREAM_METHODS, *STREAM_METHODS]))
    payloads = draw(st.lists(malformed_payloads(), min_size=1, max_size=3))
    return ("stream" if method in STREAM_METHODS else "raw"), (method, payloads)


def send_raw(ch: grpc.Channel, kind: str, method: str, payloads: list[bytes]) -> None:
    """Send ``payloads`` as they are: each as a unary call, or all on one stream (read to its
    end). A KServe stream answers in-band: no reply may carry an internal error."""
    if kind == "raw":
        for payload in payloads:
            ch.unary_unary(method)(payload, timeout=30)
        return
    for reply in ch.stream_stream(method)(iter(payloads), timeout=30):
        if method.startswith(KSERVE):
            error = kpb.ModelStreamInferResponse.FromString(reply).error_message
            OUTCOMES["in-band error" if error else "in-band OK"] += 1
            assert not error.startswith("internal error"), error


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    calls=st.lists(
        st.one_of(native_calls(), kserve_calls(), unparsable_calls()), min_size=5, max_size=30
    )
)
def test_random_requests_get_documented_codes_and_leak_nothing(
    fuzz_server: ServerThread, calls: list[tuple[str, Any]]
) -> None:
    port = fuzz_server.server.grpc_port
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 20)]
    ) as ch:
        native = pb_grpc.StreamingInferenceStub(ch)
        kserve = kpb_grpc.GRPCInferenceServiceStub(ch)
        methods = {"create": native.CreateSession, "step": native.Step, "close": native.CloseSession,
                   "get": native.GetSession, "infer": kserve.ModelInfer}  # fmt: skip
        for kind, request in calls:
            try:
                if kind in methods:
                    methods[kind](request, timeout=30)
                else:
                    send_raw(ch, kind, *request)
                OUTCOMES["OK"] += 1
            except grpc.RpcError as error:
                OUTCOMES[error.code().name] += 1
                assert error.code() in DOCUMENTED, (kind, error.code(), error.details())
        # Still serving, nothing in flight, and every session that exists is one a call opened:
        # closing them all (as their owner would) leaves every store empty.
        assert native.ListModels(pb.ListModelsRequest(), timeout=30).models
        for model in MODELS:
            for sid in fuzz_server.call(lambda m=model: [s.session_id for s in
                                                         fuzz_server.server.engine.model(m).store.sessions.values()]):  # fmt: skip
                native.CloseSession(pb.CloseSessionRequest(model=model, session_id=sid), timeout=30)
        for model in MODELS:
            store = fuzz_server.server.engine.model(model).store
            assert fuzz_server.call(lambda s=store: (len(s), len(s._free_slots) == s.capacity)) == (
                0,
                True,
            )
