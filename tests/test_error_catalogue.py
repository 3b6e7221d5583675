"""Every way a request can be wrong (docs/ERRORS.md), with the status code it gets, over both APIs.

One server; a witness session streams between the cases, and at the end its outputs must still
equal the offline run: no bad request disturbs another session.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from tests.grpc_helpers import (
    channel,
    expect_code,
    hold_batches,
    infer_request,
    kserve,
    native,
    output_of,
    serving,
    step_request,
)
from tests.models_for_tests import OfflineReference

MODEL = "tiny_lstm"
GOOD = np.ones((2, 3), np.float32)
LIMITS = {"max_chunk_steps": 8, "max_message_bytes": 4096, "max_queue_delay_s": 0.0}
Call = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Case:
    name: str  # the id docs/ERRORS.md lists
    code: grpc.StatusCode
    call: Call  # (native stub, kserve stub) -> the failing call
    details: str = ""  # a fragment the message must hold


def tensor(shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(shape=shape, data=data)


def step(session: str, t: pb.Tensor, model: str = MODEL, version: str = "") -> pb.StepRequest:
    return pb.StepRequest(model=model, version=version, session_id=session, input=t)


def chunk_of(value: float, shape: tuple[int, int] = (2, 3)) -> pb.Tensor:
    x = np.full(shape, value, np.float32)
    return tensor(list(shape), x.tobytes())


def kserve_with(
    change: Callable[[kpb.ModelInferRequest], None], seq: int = 900
) -> kpb.ModelInferRequest:
    request = infer_request(MODEL, seq, GOOD, start=True)
    change(request)
    return request


async def stream_error(stub: Any, *messages: pb.StreamRequest) -> None:
    call = stub.Stream()
    for m in messages:
        await call.write(m)
    while True:  # read until the stream fails (it must)
        await call.read()


class RawBytes:
    """A service's RPCs called with bytes as they are: requests that do not parse."""

    def __init__(self, ch: grpc.aio.Channel, service: str) -> None:
        self.channel, self.service = ch, service

    @classmethod
    def attach(cls, stub: Any, ch: grpc.aio.Channel, service: str) -> Any:
        """``stub``, with these calls as ``stub.raw`` (the cases' lambdas take two stubs)."""
        stub.raw = cls(ch, service)
        return stub

    def call(self, method: str, payload: bytes) -> Any:
        rpc = self.channel.unary_unary(f"/{self.service}/{method}")  # no serialiser: bytes
        return rpc(payload)


def not_utf8(message: Any) -> bytes:
    """``message`` serialised, its string field "ab" made two bytes that are not UTF-8."""
    data: bytes = message.SerializeToString()
    return data.replace(b"\x02ab", b"\x02\xff\xfe")


def kserve_shaped(shape: list[int], raw: bool = True) -> kpb.ModelInferRequest:
    """A START request whose input has ``shape`` and no values."""
    request = infer_request(MODEL, 904, GOOD, start=True, raw=raw)
    request.inputs[0].shape[:] = shape
    request.inputs[0].contents.Clear()
    request.raw_input_contents[:] = [b""] if raw else []
    return request


def int_contents(request: kpb.ModelInferRequest) -> None:
    """Move the request's values from raw_input_contents to int_contents (an FP32 input)."""
    request.ClearField("raw_input_contents")
    request.inputs[0].contents.int_contents.extend([1] * GOOD.size)


def with_fields(request: pb.StepRequest, **fields: Any) -> pb.StepRequest:
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def expecting(steps: int | str) -> kpb.ModelInferRequest:
    """A request of the live sequence 950 stating the step count it expects."""
    request = infer_request(MODEL, 950, GOOD)
    parameter = request.parameters["sequence_expected_steps"]
    if isinstance(steps, int):
        parameter.int64_param = steps
    else:
        parameter.string_param = steps
    return request


Parameters = dict[str, kpb.ModelRepositoryParameter]


def load(name: str = MODEL, parameters: Parameters | None = None) -> Any:
    """KServe RepositoryModelLoad of ``name`` with ``parameters`` (tritonclient's load_model)."""
    return kpb.RepositoryModelLoadRequest(model_name=name, parameters=parameters or {})


def unload(name: str = MODEL, parameters: Parameters | None = None) -> Any:
    """KServe RepositoryModelUnload of ``name`` with ``parameters``."""
    return kpb.RepositoryModelUnloadRequest(model_name=name, parameters=parameters or {})


def text(value: str) -> kpb.ModelRepositoryParameter:
    return kpb.ModelRepositoryParameter(string_param=value)


GARBAGE = b"\xff\xff\xff\xff\xff"  # a field tag that never ends
LONG = "n" * 3000  # a client string far longer than a message quotes (and under 4096 bytes)
OPEN = pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL))
CASES = [
    # --- the chunk ---
    Case("wrong-rank", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([6], GOOD.tobytes()))), "must be [steps, 3]"),
    Case("wrong-feature-count", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", chunk_of(1.0, (2, 4)))), "takes 3 features"),
    Case("byte-length-mismatch", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([2, 3], b"\0" * 20))), "needs 24 bytes"),
    Case("negative-dimension", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([-2, 3], b""))), "invalid shape"),
    Case("nan-input", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", chunk_of(float("nan")))), "NaN or Inf"),
    Case("inf-input", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", chunk_of(float("inf")))), "NaN or Inf"),
    Case("empty-chunk", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([0, 3], b""))), "at least one step"),
    Case("chunk-too-long", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", chunk_of(1.0, (9, 3)))), "limit of 8"),
    Case("message-too-large", grpc.StatusCode.RESOURCE_EXHAUSTED,
         lambda n, k: n.Step(step("victim", chunk_of(1.0, (400, 3))))),
    Case("huge-dimension", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([2**62, 0], b""))), "at most 2147483647"),
    Case("huge-element-count", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([2**30, 2**30, 2**30, 0], b""))), "multiply to more than"),
    Case("rank-too-high", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.Step(step("victim", tensor([1] * 9, b""))), "at most 8 dimensions"),
    Case("unparsable-message", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.raw.call("Step", GARBAGE), "does not parse as rnnserve.v1.StepRequest"),
    Case("string-not-utf8", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.raw.call("Step", not_utf8(step("ab", chunk_of(1.0)))), "does not parse"),
    # --- model, session ---
    Case("unknown-model", grpc.StatusCode.NOT_FOUND,
         lambda n, k: n.Step(step("victim", chunk_of(1.0), model="nope")), "not found"),
    Case("unknown-version", grpc.StatusCode.NOT_FOUND,
         lambda n, k: n.Step(step("victim", chunk_of(1.0), version="9")), "no version '9'"),
    Case("unknown-session", grpc.StatusCode.NOT_FOUND,
         lambda n, k: n.Step(step("never-opened", chunk_of(1.0))), "not found"),
    Case("closed-session", grpc.StatusCode.NOT_FOUND,
         lambda n, k: n.Step(step("closed", chunk_of(1.0))), "not found"),
    Case("duplicate-session-id", grpc.StatusCode.ALREADY_EXISTS,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="victim")), "already exists"),
    Case("session-id-too-long", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="x" * 129)), "longer than 128"),
    Case("session-id-not-printable", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="a\nb")), "printable"),
    Case("initial-state-wrong-shape", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(
             model=MODEL, initial_state=[chunk_of(0.0, (1, 8)), chunk_of(0.0, (1, 8))])), "expected [2, 8]"),
    Case("initial-state-wrong-count", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(
             model=MODEL, initial_state=[chunk_of(0.0, (2, 8))])), "needs 2 tensors"),
    Case("expected-steps-mismatch", grpc.StatusCode.ABORTED,
         lambda n, k: n.Step(with_fields(step("victim", chunk_of(1.0)), expected_steps=999)), "expected step 999: not applied"),
    Case("incarnation-mismatch", grpc.StatusCode.NOT_FOUND,
         lambda n, k: n.Step(with_fields(step("victim", chunk_of(1.0)), incarnation="0" * 16)), "not the one you had"),
    # --- the stream ---
    Case("chunk-before-open", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: stream_error(n, pb.StreamRequest(chunk=pb.Chunk(input=chunk_of(1.0)))), "open or attach"),
    Case("second-open-on-a-stream", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: stream_error(n, OPEN, OPEN), "already has a session"),
    Case("empty-stream-message", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: stream_error(n, OPEN, pb.StreamRequest()), "empty stream message"),
    Case("attach-unknown-session", grpc.StatusCode.NOT_FOUND,
         lambda n, k: stream_error(n, pb.StreamRequest(attach=pb.GetSessionRequest(model=MODEL, session_id="nope"))), "not found"),
    # --- KServe v2 / Triton ---
    Case("kserve-missing-sequence-id", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: r.parameters.pop("sequence_id"))), "sequence_id"),
    Case("kserve-sequence-id-zero", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(infer_request(MODEL, 0, GOOD, start=True))),
    Case("kserve-no-start-for-new-sequence", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(infer_request(MODEL, 901, GOOD)), "START"),
    Case("kserve-wrong-input-name", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: setattr(r.inputs[0], "name", "input")))),
    Case("kserve-wrong-datatype", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: setattr(r.inputs[0], "datatype", "FP64")))),
    Case("kserve-batch-not-one", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: r.inputs[0].shape.__setitem__(slice(None), [2, 1, 3]))), "batch size 1"),
    Case("kserve-raw-length-mismatch", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7)))),
    Case("kserve-unknown-model", grpc.StatusCode.NOT_FOUND,
         lambda n, k: k.ModelInfer(infer_request("nope", 902, GOOD, start=True))),
    Case("kserve-nan-input", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(infer_request(MODEL, 903, np.full((2, 3), np.nan, np.float32), start=True)), "NaN"),
    Case("kserve-huge-dimension", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_shaped([1, 2**62, 0])), "at most 2147483647"),
    Case("kserve-huge-dimension-typed", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_shaped([1, 2**62, 0], raw=False)), "at most 2147483647"),
    Case("kserve-raw-and-typed-contents", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 6))), "both"),
    Case("kserve-raw-count-mismatch", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: r.raw_input_contents.append(GOOD.tobytes()))), "2 entries for 1 input"),
    Case("kserve-wrong-typed-contents", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(int_contents)), "not int_contents"),
    Case("kserve-expected-steps-mismatch", grpc.StatusCode.ABORTED,
         lambda n, k: k.ModelInfer(expecting(999)), "expected step 999: not applied"),
    Case("kserve-expected-steps-not-a-count", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(expecting("2")), "non-negative int64"),
    Case("kserve-unparsable-message", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.raw.call("ModelInfer", GARBAGE), "does not parse as inference.ModelInferRequest"),
    Case("kserve-unknown-model-long-name", grpc.StatusCode.NOT_FOUND,
         lambda n, k: k.ModelInfer(infer_request(LONG, 906, GOOD, start=True)), "(3000 characters)"),
    Case("kserve-long-input-name", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: setattr(r.inputs[0], "name", LONG))), "(3000 characters)"),
    Case("kserve-long-output-name", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.ModelInfer(kserve_with(lambda r: r.outputs.add(name=LONG))), "(3000 characters)"),
    # --- model control (the KServe model repository extension); model_control none here ---
    Case("kserve-load-not-explicit", grpc.StatusCode.UNAVAILABLE,
         lambda n, k: k.RepositoryModelLoad(load()), "model_control is none"),
    Case("kserve-unload-not-explicit", grpc.StatusCode.UNAVAILABLE,
         lambda n, k: k.RepositoryModelUnload(unload()), "explicit model load / unload is not allowed"),
    Case("kserve-load-config", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.RepositoryModelLoad(load(parameters={"config": text("{}")})), "parameter 'config' is not supported"),
    Case("kserve-load-files", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.RepositoryModelLoad(load(parameters={"file:1/model.onnx": kpb.ModelRepositoryParameter(
             bytes_param=b"onnx")})), "parameter 'file:1/model.onnx' is not supported"),
    Case("kserve-load-unknown-parameter", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.RepositoryModelLoad(load(parameters={"pin": text("yes")})), "unknown RepositoryModelLoad parameter 'pin'"),
    Case("kserve-unload-unknown-parameter", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.RepositoryModelUnload(unload(parameters={"now": text("yes")})), "unknown RepositoryModelUnload parameter 'now'"),
    Case("kserve-unload-dependents-not-bool", grpc.StatusCode.INVALID_ARGUMENT,
         lambda n, k: k.RepositoryModelUnload(unload(parameters={"unload_dependents": text("true")})), "must be a bool parameter"),
]  # fmt: skip


def on_version(request: kpb.ModelInferRequest, version: str) -> kpb.ModelInferRequest:
    """``request`` naming model version ``version``."""
    request.model_version = version
    return request


# Model control with model_control explicit, on a server whose repository changed after start-up
# (test_model_control_refusals_with_explicit_control): tiny_lstm/1 was removed from it and a load
# retired it, tiny_lstm/2 serves, tiny_lstm/3 is broken, tiny_gru was unloaded; a live session on
# each retired version goes on.
CONTROL_CASES = [
    Case("kserve-load-unknown-model", grpc.StatusCode.NOT_FOUND,
         lambda n, k: k.RepositoryModelLoad(load("nope")), "model 'nope' is not in the model repository"),
    Case("kserve-unload-unknown-model", grpc.StatusCode.NOT_FOUND,
         lambda n, k: k.RepositoryModelUnload(unload("../tiny_gru")), "is not loaded, nor in the model repository"),
    Case("kserve-load-refused", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: k.RepositoryModelLoad(load()), "failed to load 'tiny_lstm': model tiny_lstm/3"),
    Case("retired-version", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(model=MODEL, version="1")),
         "model tiny_lstm/1 takes no new sessions: its folder was removed from the repository; its live "
         "sessions go on until they end; open new ones on version 2, or name no version"),
    Case("kserve-start-on-retired-version", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: k.ModelInfer(on_version(infer_request(MODEL, 907, GOOD, start=True), "1")),
         "model tiny_lstm/1 takes no new sessions"),
    Case("unloaded-model", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(model="tiny_gru")),
         "model 'tiny_gru' takes no new sessions: it was unloaded (RepositoryModelUnload); its live "
         "sessions go on until they end"),
    Case("kserve-start-on-unloaded-model", grpc.StatusCode.FAILED_PRECONDITION,
         lambda n, k: k.ModelInfer(infer_request("tiny_gru", 908, GOOD, start=True)),
         "model 'tiny_gru' takes no new sessions"),
    Case("id-live-on-another-version", grpc.StatusCode.ALREADY_EXISTS,
         lambda n, k: n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="old")),
         "session 'old' already exists, on version 1 of model 'tiny_lstm'; close it first, or "
         "choose another id"),
]  # fmt: skip


async def test_every_catalogued_bad_request_gets_its_code_and_harms_no_one(
    make_settings: Any,
) -> None:
    x = np.random.default_rng(11).standard_normal((2 * (len(CASES) + 1), 3)).astype(np.float32)
    async with serving(make_settings(**LIMITS)) as srv, channel(srv.grpc_port) as ch:
        n = RawBytes.attach(native(ch), ch, "rnnserve.v1.StreamingInference")
        k = RawBytes.attach(kserve(ch), ch, "inference.GRPCInferenceService")
        reference = OfflineReference(srv.settings.model_repository, MODEL)(x)
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="victim"))
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="closed"))
        await n.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id="closed"))
        await k.ModelInfer(infer_request(MODEL, 950, GOOD, start=True))
        outputs = [output_of(await n.Step(step_request(MODEL, "victim", x[:2])))]
        for i, case in enumerate(CASES, start=1):
            details = await expect_code(case.code, case.call(n, k))
            assert case.details in details, (case.name, details)
            outputs.append(
                output_of(await n.Step(step_request(MODEL, "victim", x[2 * i : 2 * i + 2])))
            )
        np.testing.assert_allclose(np.concatenate(outputs), reference, atol=1e-5)
        # Nothing leaked: the victim, KServe sequence 950, and the two sessions opened on streams
        # that then failed; those are detached, not lost (they follow the idle timeout, like any
        # detached session).
        store = srv.engine.model(MODEL).store
        assert len(store) == 4 and sum(s.busy for s in store.sessions.values()) == 0
        assert srv.engine.expire_idle_sessions() == 0  # TTL off here; with it on they would end


async def test_model_control_refusals_with_explicit_control(
    make_settings: Any, tiny_repository: Path, tmp_path: Path
) -> None:
    """The catalogue's model-control cases that need model_control explicit and a repository
    that changed while serving; a witness session on the retired version goes on between them,
    exactly."""
    root = tmp_path / "models"
    for name, version, source in [(MODEL, "1", "1"), (MODEL, "2", "1"), ("tiny_gru", "1", "1")]:
        shutil.copytree(tiny_repository / name / source, root / name / version)
    x = np.random.default_rng(12).standard_normal((2 * (len(CONTROL_CASES) + 1), 3))
    x = x.astype(np.float32)
    settings = make_settings(model_repository=root, model_control="explicit", **LIMITS)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        n, k = native(ch), kserve(ch)
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, version="1", session_id="old"))
        await n.CreateSession(pb.CreateSessionRequest(model="tiny_gru", session_id="kept"))
        outputs = [output_of(await n.Step(step_request(MODEL, "old", x[:2])))]
        shutil.rmtree(root / MODEL / "1")
        await k.RepositoryModelLoad(load())  # 1 retires: its folder is gone
        await k.RepositoryModelUnload(unload("tiny_gru"))
        shutil.copytree(tiny_repository / MODEL / "1", root / MODEL / "3")
        (root / MODEL / "3" / "model.json").write_text("{not json")
        for i, case in enumerate(CONTROL_CASES, start=1):
            details = await expect_code(case.code, case.call(n, k))
            assert case.details in details, (case.name, details)
            outputs.append(
                output_of(await n.Step(step_request(MODEL, "old", x[2 * i : 2 * i + 2])))
            )
        reference = OfflineReference(tiny_repository, MODEL)(x)
        np.testing.assert_allclose(np.concatenate(outputs), reference, atol=1e-5)
        assert srv.engine.versions(MODEL) == ["2"] and srv.engine.versions("tiny_gru") == []
        for name, kept in [(MODEL, "old"), ("tiny_gru", "kept")]:  # nothing else was opened
            handle = srv.engine.registry.find(name, "1")
            assert handle is not None and list(handle.store.sessions) == [kept]
        assert len(srv.engine.model(MODEL, "2").store) == 0


async def test_a_session_whose_new_state_could_not_be_stored_ends_failed(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state write failing part-way (a device error, here made to happen) ends the sessions
    of that batch's finished chunks (reason failed) instead of letting them go on from a state
    nobody can vouch for: a unary Step is INTERNAL, a native stream is told SessionEnded{FAILED},
    a KServe sequence must START again. Other sessions go on."""
    async with serving(make_settings(**LIMITS)) as srv, channel(srv.grpc_port) as ch:
        n, k = native(ch), kserve(ch)
        store = srv.engine.model(MODEL).store

        def broken(slots: Any, states: Any) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="a"))
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="other"))
        await n.Step(step_request(MODEL, "a", GOOD))
        await k.ModelInfer(infer_request(MODEL, 960, GOOD, start=True))
        monkeypatch.setattr(store, "scatter", broken)
        details = await expect_code(
            grpc.StatusCode.INTERNAL, n.Step(step_request(MODEL, "a", GOOD))
        )
        assert details == (
            "model tiny_lstm/1 could not store the new state of session 'a' (RuntimeError); the "
            "session is ended: open it again and replay its inputs from step 0"
        )
        details = await expect_code(
            grpc.StatusCode.INTERNAL, k.ModelInfer(infer_request(MODEL, 960, GOOD))
        )
        assert "could not store the new state of sequence '960'" in details
        stream = n.Stream()
        await stream.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL)))
        await stream.read()  # opened
        await stream.write(pb.StreamRequest(chunk=pb.Chunk(input=chunk_of(1.0))))
        ended = await stream.read()  # its chunk is not answered: the session ended
        assert ended.WhichOneof("kind") == "ended"
        assert ended.ended.reason == pb.END_REASON_FAILED and ended.ended.steps == 0
        assert await stream.read() is grpc.aio.EOF  # and the stream ends, OK
        assert await stream.code() == grpc.StatusCode.OK
        monkeypatch.undo()  # the state writes work again

        await expect_code(grpc.StatusCode.NOT_FOUND, n.Step(step_request(MODEL, "a", GOOD)))
        details = await expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, k.ModelInfer(infer_request(MODEL, 960, GOOD))
        )
        assert "must specify the START flag" in details
        assert (await n.Step(step_request(MODEL, "other", GOOD))).steps == 2
        assert len(store) == 1 and store.find("other") is not None


async def test_a_second_chunk_while_one_is_in_flight_is_refused(make_settings: Any) -> None:
    # The first chunk's batch is held computing (its model call waits on an event), so it is in
    # flight for as long as the test needs: no timer decides it.
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        n = native(ch)
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="a"))
        computing, go_on = hold_batches(srv.engine.model(MODEL).batcher.runner)
        first = asyncio.ensure_future(n.Step(step_request(MODEL, "a", GOOD)))
        await computing.wait()
        details = await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, n.Step(step_request(MODEL, "a", GOOD))
        )
        assert "in flight" in details
        go_on.set()
        assert (await first).steps == 2


async def test_nonfinite_inputs_can_be_allowed(make_settings: Any) -> None:
    async with (
        serving(make_settings(nonfinite_inputs="allow")) as srv,
        channel(srv.grpc_port) as ch,
    ):
        n = native(ch)
        await n.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
        reply = await n.Step(step("s", chunk_of(float("nan"))))
        # Accepted and computed; what NaN becomes is the model's business (onnxruntime's gate
        # kernels clip their inputs, so the outputs may even be finite).
        assert reply.steps == 2 and output_of(reply).shape == (2, 2)
