"""Property-based fuzzing of both APIs: random, mostly malformed, requests against one server.

Whatever arrives, the server answers with OK or a documented code (never INTERNAL or UNKNOWN),
keeps serving, and leaks no session: at the end it holds exactly the sessions the fuzzer opened and
did not close. Derandomised, so every run throws the same requests.
"""

from __future__ import annotations

import asyncio
import collections
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
dims = st.lists(st.integers(-2, 20), min_size=0, max_size=4)
values = st.sampled_from([0.0, 1.0, -3.5, float("nan"), float("inf"), 1e38])


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    if draw(st.integers(0, 9)) < 6:  # a well-formed chunk for the tiny models (3 features)
        steps = draw(st.integers(1, 5))
        x = np.full((steps, 3), draw(values), np.float32)
        return pb.Tensor(shape=[steps, 3], data=x.tobytes())
    shape = draw(dims)
    if draw(st.booleans()) and all(d >= 0 for d in shape):
        count = int(np.prod(shape)) if shape else 1
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


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(calls=st.lists(st.one_of(native_calls(), kserve_calls()), min_size=5, max_size=30))
def test_random_requests_get_documented_codes_and_leak_nothing(
    fuzz_server: ServerThread, calls: list[tuple[str, Any]]
) -> None:
    port = fuzz_server.server.grpc_port
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 20)]
    ) as ch:
        native = pb_grpc.StreamingInferenceStub(ch)
        kserve = kpb_grpc.GRPCInferenceServiceStub(ch)
        for kind, request in calls:
            method = {"create": native.CreateSession, "step": native.Step, "close": native.CloseSession,
                      "get": native.GetSession, "infer": kserve.ModelInfer}[kind]  # fmt: skip
            try:
                method(request, timeout=30)
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
