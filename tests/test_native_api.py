"""Session lifecycle over the native API: each case gets its documented status and leaves the
other sessions exact."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_tensor
from service.server import RnnServer
from tests.grpc_helpers import channel, expect_code, native, output_of, serving, step_request
from tests.models_for_tests import OfflineReference

MODEL = "tiny_lstm"


@pytest.fixture
async def stub(server: RnnServer) -> AsyncIterator[Any]:
    async with channel(server.grpc_port) as ch:
        yield native(ch)


class Witness:
    """A session streamed alongside every failure, checked against the offline run at the end."""

    def __init__(self, stub: Any, server: RnnServer, seed: int = 7) -> None:
        self.stub = stub
        self.x = np.random.default_rng(seed).standard_normal((12, 3)).astype(np.float32)
        self.reference = OfflineReference(server.settings.model_repository, MODEL)(self.x)
        self.outputs: list[np.ndarray] = []
        self.session_id = ""

    async def open(self) -> None:
        info = await self.stub.CreateSession(pb.CreateSessionRequest(model=MODEL))
        self.session_id = info.session_id

    async def advance(self, steps: int = 3) -> None:
        start = sum(len(o) for o in self.outputs)
        reply = await self.stub.Step(
            step_request(MODEL, self.session_id, self.x[start : start + steps])
        )
        self.outputs.append(output_of(reply))

    def check(self) -> None:
        done = np.concatenate(self.outputs)
        np.testing.assert_allclose(done, self.reference[: len(done)], atol=1e-5)


async def test_create_step_inspect_close(stub: Any, server: RnnServer) -> None:
    w = Witness(stub, server)
    await w.open()
    await w.advance(4)
    info = await stub.GetSession(
        pb.GetSessionRequest(model=MODEL, session_id=w.session_id, include_state=True)
    )
    assert info.steps == 4 and len(info.state) == 2 and list(info.state[0].shape) == [2, 8]
    ended = await stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id=w.session_id))
    assert ended.reason == pb.END_REASON_CLOSED and ended.steps == 4
    w.check()


async def test_step_after_close_and_unknown_id_are_not_found(stub: Any, server: RnnServer) -> None:
    w = Witness(stub, server)
    await w.open()
    gone = await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))
    await stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id=gone.session_id))
    x = np.zeros((1, 3), np.float32)
    await expect_code(grpc.StatusCode.NOT_FOUND, stub.Step(step_request(MODEL, gone.session_id, x)))
    await expect_code(grpc.StatusCode.NOT_FOUND, stub.Step(step_request(MODEL, "never-opened", x)))
    await expect_code(
        grpc.StatusCode.NOT_FOUND,
        stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id=gone.session_id)),
    )
    await w.advance()
    w.check()


async def test_duplicate_start_is_already_exists(stub: Any, server: RnnServer) -> None:
    w = Witness(stub, server)
    await w.open()
    await w.advance()
    await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="mine"))
    details = await expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="mine")),
    )
    assert "mine" in details
    await w.advance()
    w.check()


async def test_bad_chunks_are_invalid_argument(stub: Any, server: RnnServer) -> None:
    w = Witness(stub, server)
    await w.open()
    sid = w.session_id
    bad = [
        pb.StepRequest(model=MODEL, session_id=sid, input=to_tensor(np.zeros((2, 5), np.float32))),
        pb.StepRequest(model=MODEL, session_id=sid, input=to_tensor(np.zeros((0, 3), np.float32))),
        pb.StepRequest(
            model=MODEL, session_id=sid, input=to_tensor(np.zeros((2, 2, 3), np.float32))
        ),
        pb.StepRequest(model=MODEL, session_id=sid, input=pb.Tensor(shape=[2, 3], data=b"\0" * 5)),
        pb.StepRequest(
            model=MODEL, session_id=sid, input=to_tensor(np.full((1, 3), np.nan, np.float32))
        ),
        pb.StepRequest(
            model=MODEL, session_id=sid, input=to_tensor(np.zeros((5000, 3), np.float32))
        ),
    ]
    for request in bad:
        await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.Step(request))
    await w.advance()
    info = await stub.GetSession(pb.GetSessionRequest(model=MODEL, session_id=sid))
    assert info.steps == 3  # the rejected chunks did not move the session
    w.check()


async def test_unknown_model_and_version(stub: Any) -> None:
    details = await expect_code(
        grpc.StatusCode.NOT_FOUND, stub.CreateSession(pb.CreateSessionRequest(model="nope"))
    )
    assert "tiny_gru" in details and "tiny_lstm" in details
    await expect_code(
        grpc.StatusCode.NOT_FOUND,
        stub.CreateSession(pb.CreateSessionRequest(model=MODEL, version="7")),
    )


async def test_max_sessions_is_resource_exhausted(make_settings: Any) -> None:
    async with serving(make_settings(max_sessions=3)) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        w = Witness(stub, srv)
        await w.open()
        for _ in range(2):
            await stub.CreateSession(pb.CreateSessionRequest(model=MODEL))
        await expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            stub.CreateSession(pb.CreateSessionRequest(model=MODEL)),
        )
        other = await stub.CreateSession(
            pb.CreateSessionRequest(model="tiny_gru")
        )  # limits are per model
        assert other.session_id
        await w.advance()
        w.check()


async def test_idle_timeout_ends_the_session_and_tells_the_attached_stream(
    make_settings: Any,
) -> None:
    async with (
        serving(make_settings(session_ttl_s=30.0, ttl_check_interval_s=3600.0)) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        w = Witness(stub, srv)
        await w.open()
        requests: list[pb.StreamRequest] = [
            pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="idle"))
        ]
        call = stub.Stream()
        await call.write(requests[0])
        opened = await call.read()
        assert opened.opened.session_id == "idle"
        store = srv.engine.model(MODEL).store
        store.get("idle").last_used_s -= 60.0  # idle for a minute, as far as the store can tell
        assert srv.engine.expire_idle_sessions() == 1
        notice = await call.read()
        assert (
            notice.ended.reason == pb.END_REASON_IDLE_TIMEOUT and notice.ended.session_id == "idle"
        )
        await call.done_writing()
        await expect_code(
            grpc.StatusCode.NOT_FOUND,
            stub.Step(step_request(MODEL, "idle", np.zeros((1, 3), np.float32))),
        )
        await w.advance()
        w.check()
        ended = srv.metrics.registry.get_sample_value(
            "rnnserve_sessions_ended_total",
            {"model": MODEL, "version": "1", "reason": "idle_timeout"},
        )
        assert ended == 1.0


async def test_stream_open_chunks_close_and_detach_reattach(stub: Any, server: RnnServer) -> None:
    x = np.random.default_rng(3).standard_normal((10, 3)).astype(np.float32)
    reference = OfflineReference(server.settings.model_repository, MODEL)(x)
    call = stub.Stream()
    await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="roam")))
    assert (await call.read()).opened.steps == 0
    await call.write(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x[:4]))))
    first = await call.read()
    assert first.output.steps == 4
    await call.done_writing()  # detach: the session lives on
    assert await call.read() == grpc.aio.EOF
    call = stub.Stream()
    await call.write(pb.StreamRequest(attach=pb.GetSessionRequest(model=MODEL, session_id="roam")))
    assert (await call.read()).opened.steps == 4
    await call.write(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x[4:]))))
    second = await call.read()
    await call.write(pb.StreamRequest(close=pb.Close()))
    ended = await call.read()
    assert ended.ended.reason == pb.END_REASON_CLOSED and ended.ended.steps == 10
    got = np.concatenate([output_of(first.output), output_of(second.output)])
    np.testing.assert_allclose(got, reference, atol=1e-5)


async def test_chunk_before_open_fails_the_stream(stub: Any) -> None:
    call = stub.Stream()
    await call.write(
        pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(np.zeros((1, 3), np.float32))))
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_and_get_models(stub: Any) -> None:
    models = (await stub.ListModels(pb.ListModelsRequest())).models
    assert {m.name for m in models} == {"tiny_lstm", "tiny_gru"}
    info = await stub.GetModel(pb.GetModelRequest(model=MODEL))
    assert (info.cell, info.layers, info.hidden_size, info.input_size, info.output_size) == (
        "lstm",
        2,
        8,
        3,
        2,
    )
    assert [s.name for s in info.state] == ["h0", "c0"]


async def test_eviction_when_full_tells_the_evicted_stream(make_settings: Any) -> None:
    async with (
        serving(make_settings(max_sessions=2, evict_when_full=True)) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        call = stub.Stream()
        await call.write(
            pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="first"))
        )
        await call.read()
        srv.engine.model(MODEL).store.get("first").last_used_s -= 60.0  # the longest idle
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="second"))
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="third"))
        notice = await call.read()
        assert notice.ended.reason == pb.END_REASON_EVICTED and notice.ended.session_id == "first"
        await call.done_writing()
        evicted = srv.metrics.registry.get_sample_value(
            "rnnserve_sessions_ended_total",
            {"model": MODEL, "version": "1", "reason": "evicted"},
        )
        assert evicted == 1.0


async def test_a_client_that_disconnects_mid_stream_leaves_its_session_to_the_idle_policy(
    make_settings: Any,
) -> None:
    async with serving(make_settings(session_ttl_s=30.0, ttl_check_interval_s=3600.0)) as srv:
        async with channel(srv.grpc_port) as ch:
            stub = native(ch)
            call = stub.Stream()
            await call.write(
                pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="gone"))
            )
            await call.read()
            x = np.ones((3, 3), np.float32)
            await call.write(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x))))
            assert (await call.read()).output.steps == 3
            call.cancel()  # the client goes away without closing
            info = await stub.GetSession(pb.GetSessionRequest(model=MODEL, session_id="gone"))
            assert info.steps == 3  # released by the stream, kept for a reconnect
        store = srv.engine.model(MODEL).store
        store.clock = lambda: time.monotonic() + 60.0  # later than the TTL
        assert srv.engine.expire_idle_sessions() == 1 and len(store) == 0


async def test_a_stream_whose_session_is_closed_elsewhere_ends_and_never_reaches_its_successor(
    server: RnnServer,
) -> None:
    async with channel(server.grpc_port) as ch:
        stub = native(ch)
        call = stub.Stream()
        await call.write(
            pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id="s"))
        )
        await call.read()
        ended = await stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id="s"))
        notice = await call.read()  # told at once, before it sends another chunk
        assert notice.ended.reason == pb.END_REASON_CLOSED and notice.ended.steps == ended.steps
        assert await call.read() == grpc.aio.EOF
        successor = await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
        assert successor.steps == 0 and successor.incarnation != ""
