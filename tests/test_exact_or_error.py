"""Exact or a clear error under failure (issue #16): every case here was silently wrong, or
unanswerable, before. A crash is simulated in-process by putting back the snapshot files as they
were at the crash point after a graceful stop (the stop's own final snapshot is what a kill -9
never writes); tests/test_crash_matrix.py does it with real processes and real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.status import SESSION_STEPS_KEY
from service.durability import Durability, DurableModel
from service.errors import Unavailable
from service.metrics import Metrics
from service.server import RnnServer
from service.session_store import SessionStore
from service.snapshots import (
    MAGIC_V1,
    CorruptSnapshot,
    DirectorySnapshots,
    ModelSnapshot,
    SessionRecord,
    decode,
    encode,
)
from tests.grpc_helpers import (
    channel,
    expect_code,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
    serving,
    step_request,
)
from tests.models_for_tests import OfflineReference

MODEL = "tiny_lstm"  # 3 features, 2 outputs


def inputs(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, 3)).astype(np.float32)


@contextlib.contextmanager
def gated(
    server: RnnServer, model: str = MODEL
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold the model's next calls in its worker thread until ``release`` is set; ``entered`` is
    set once a call is inside (the chunk is computing: it will be applied)."""
    runtime = server.engine.model(model).runtime
    original = runtime.run
    entered, release = threading.Event(), threading.Event()

    def run(x: np.ndarray, states: Any, single_thread: bool = False) -> Any:
        entered.set()
        release.wait(30)
        return original(x, states, single_thread)

    runtime.run = run  # type: ignore[method-assign]
    try:
        yield entered, release
    finally:
        release.set()
        del runtime.run  # the class's method again


async def idle(server: RnnServer, model: str = MODEL) -> None:
    """Until the model has nothing queued or computing (every chunk applied and answered)."""
    await asyncio.wait_for(server.engine.model(model).batcher._idle.wait(), 30)


def steps_in(error: grpc.aio.AioRpcError) -> int:
    """The session's step count an error carries (trailing metadata)."""
    return int(dict(error.trailing_metadata() or ())[SESSION_STEPS_KEY])


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def crash_point(state: Path, saved: Path) -> None:
    """Remember the snapshot files as they are now: what a kill -9 would leave."""
    shutil.copytree(state, saved)


def crashed(state: Path, saved: Path) -> None:
    """Put the remembered snapshot files back (after a graceful stop): as after a kill -9."""
    shutil.rmtree(state)
    shutil.copytree(saved, state)


def durable_settings(make_settings: Any, tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(
        snapshot_backend="directory",
        snapshot_dir=tmp_path / "state",
        snapshot_interval_s=0.0,  # snapshots only when the test takes them
        snapshot_when_idle_s=0.0,
        inline_compute_below_s=0.0,  # every batch in the worker thread, where gated() holds it
        **overrides,
    )


# ----- 1. deadlines ---------------------------------------------------------------------------
async def test_a_chunk_computing_past_the_deadline_is_applied_and_its_retry_is_refused(
    make_settings: Any, tiny_repository: Path
) -> None:
    x = inputs(5)
    reference = OfflineReference(tiny_repository, MODEL)(x)
    settings = make_settings(inline_compute_below_s=0.0)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="d"))
        with gated(srv) as (entered, release):
            call = stub.Step(step_request(MODEL, "d", x[:2]), timeout=0.5)
            await asyncio.to_thread(entered.wait, 30)  # computing: it will be applied
            await expect_code(grpc.StatusCode.DEADLINE_EXCEEDED, call)  # the client's own timer
            release.set()
            await idle(srv)
        # The client does not know whether it was applied: it resends, stating the count it knew.
        retry = step_request(MODEL, "d", x[:2])
        retry.expected_steps = 0
        refused = await failure(stub.Step(retry))
        assert refused.code() == grpc.StatusCode.ABORTED
        assert "at step 2, this chunk expected step 0: not applied" in str(refused.details())
        assert steps_in(refused) == 2
        info = await stub.GetSession(pb.GetSessionRequest(model=MODEL, session_id="d"))
        np.testing.assert_allclose(output_of(pb.StepResponse(output=info.last_output)),
                                   reference[:2], atol=1e-5)  # fmt: skip
        go_on = step_request(MODEL, "d", x[2:])
        go_on.expected_steps = 2
        reply = await stub.Step(go_on)
        assert reply.steps == 5
        np.testing.assert_allclose(output_of(reply), reference[2:], atol=1e-5)


async def test_a_queued_chunk_is_refused_unapplied_before_the_callers_deadline(
    make_settings: Any,
) -> None:
    settings = make_settings(inline_compute_below_s=0.0, deadline_margin_s=0.4)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        for name in ("busy", "late"):
            await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id=name))
        with gated(srv) as (entered, release):
            first = stub.Step(step_request(MODEL, "busy", inputs(1)))
            await asyncio.to_thread(entered.wait, 30)
            refused = await failure(stub.Step(step_request(MODEL, "late", inputs(1)), timeout=0.8))
            # The server's answer, not the client's timer: it says the chunk was not applied.
            assert refused.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "not applied" in str(refused.details()) and steps_in(refused) == 0
            release.set()
            await first
        await idle(srv)
        late = await stub.GetSession(pb.GetSessionRequest(model=MODEL, session_id="late"))
        assert late.steps == 0


# ----- 2. an id reused, then a crash ----------------------------------------------------------
async def test_a_reused_id_restored_as_its_old_incarnation_is_never_resumed(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = durable_settings(make_settings, tmp_path)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="x"))
        await stub.Step(step_request(MODEL, "x", inputs(4)))
        assert srv.engine.durability is not None
        await srv.engine.durability.snapshot(force=True)  # holds the first "x", at step 4
        crash_point(tmp_path / "state", tmp_path / "at-crash")
        await stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id="x"))
        second = await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="x"))
        await stub.Step(step_request(MODEL, "x", inputs(4, seed=1)))
    crashed(tmp_path / "state", tmp_path / "at-crash")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        attach = pb.GetSessionRequest(model=MODEL, session_id="x", incarnation=second.incarnation)
        details = await expect_code(grpc.StatusCode.NOT_FOUND, stub.GetSession(attach))
        assert "not the one you had" in details
        # A client that knows neither incarnation nor step count is not stepped either.
        refused = await failure(stub.Step(step_request(MODEL, "x", inputs(1))))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "restored after an unclean stop from its last saved state (a snapshot, or the cluster store) at step 4"
            in str(refused.details())
        )
        stepped = step_request(MODEL, "x", inputs(1))
        stepped.incarnation = second.incarnation
        await expect_code(grpc.StatusCode.NOT_FOUND, stub.Step(stepped))


def test_the_python_client_refuses_to_resume_onto_another_incarnation(
    make_settings: Any, tmp_path: Path
) -> None:
    from service.client import Client, SessionLostError

    settings = durable_settings(make_settings, tmp_path)

    async def first_life() -> tuple[int, str]:
        async with serving(settings) as srv:
            port = srv.grpc_port
            with Client(f"127.0.0.1:{port}") as client:
                old = await asyncio.to_thread(client.open_session, MODEL, session_id="x")
                await asyncio.to_thread(old.step, inputs(4))
                assert srv.engine.durability is not None
                await srv.engine.durability.snapshot(force=True)
                crash_point(tmp_path / "state", tmp_path / "at-crash")
                await asyncio.to_thread(old.close)
                new = await asyncio.to_thread(client.open_session, MODEL, session_id="x")
                await asyncio.to_thread(new.step, inputs(4, seed=1))
                new.detach()
                return port, new.incarnation

    port, incarnation = asyncio.run(first_life())
    crashed(tmp_path / "state", tmp_path / "at-crash")

    async def second_life() -> None:
        async with serving(settings.model_copy(update={"grpc_port": port})):
            with Client(f"127.0.0.1:{port}") as client:
                session = await asyncio.to_thread(client.attach, MODEL, "x")
                session.incarnation = incarnation  # as the client that held it knows it
                session.steps = session._kept_from = 4  # and its step count
                # The stream breaks as after a crash; the client must not resume onto old "x".
                session._requests.put(None)
                with pytest.raises(SessionLostError, match="not the one you had"):
                    await asyncio.to_thread(session._recover, inputs(1))

    asyncio.run(second_life())


# ----- 3. KServe sequences after a crash ------------------------------------------------------
async def test_a_kserve_sequence_never_rewinds_silently_after_a_crash(
    make_settings: Any, tiny_repository: Path, tmp_path: Path
) -> None:
    x = inputs(10, seed=2)
    reference = OfflineReference(tiny_repository, MODEL)(x)
    settings = durable_settings(make_settings, tmp_path)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        started = await stub.ModelInfer(infer_request(MODEL, 7, x[:5], start=True))
        incarnation = started.parameters["sequence_incarnation"].string_param
        assert len(incarnation) == 16
        assert srv.engine.durability is not None
        await srv.engine.durability.snapshot(force=True)  # sequence 7 at step 5
        crash_point(tmp_path / "state", tmp_path / "at-crash")
        await stub.ModelInfer(infer_request(MODEL, 7, x[5:8]))  # step 8: lost in the crash
    crashed(tmp_path / "state", tmp_path / "at-crash")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        plain = await failure(stub.ModelInfer(infer_request(MODEL, 7, x[8:])))
        assert plain.code() == grpc.StatusCode.INVALID_ARGUMENT  # as Triton: an unknown sequence
        assert (
            "sequence '7' was restored after an unclean stop from its last saved state (a snapshot, or the cluster store) at step 5"
            in str(plain.details())
            and "sequence_start" in str(plain.details())
        )
        assert steps_in(plain) == 5
        # On a stream the same answer comes in-band, with the step count as a parameter.
        replies = [r async for r in stub.ModelStreamInfer(iter([infer_request(MODEL, 7, x[8:])]))]
        assert "restored after an unclean stop" in replies[0].error_message
        assert replies[0].infer_response.parameters["sequence_steps"].int64_param == 5
        # A client that opts in states the count it knows: 8 is refused, the server is at 5...
        knows_8 = resuming(infer_request(MODEL, 7, x[8:]), 8, incarnation)
        refused = await failure(stub.ModelInfer(knows_8))
        assert refused.code() == grpc.StatusCode.ABORTED and steps_in(refused) == 5
        # The count alone does not do: the same count could belong to an older history.
        count_only = infer_request(MODEL, 7, x[5:8])
        count_only.parameters["sequence_expected_steps"].int64_param = 5
        refused = await failure(stub.ModelInfer(count_only))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sequence_incarnation" in str(refused.details())
        # ... so it replays from 5, naming its incarnation, and the sequence goes on exactly.
        await stub.ModelInfer(resuming(infer_request(MODEL, 7, x[5:8]), 5, incarnation))
        last = await stub.ModelInfer(infer_request(MODEL, 7, x[8:]))
        assert last.parameters["sequence_steps"].int64_param == 10
        np.testing.assert_allclose(infer_output(last), reference[8:], atol=1e-5)


def resuming(
    request: kpb.ModelInferRequest, expected_steps: int, incarnation: str
) -> kpb.ModelInferRequest:
    request.parameters["sequence_expected_steps"].int64_param = expected_steps
    request.parameters["sequence_incarnation"].string_param = incarnation
    return request


async def test_an_older_history_at_the_same_count_is_never_resumed(
    make_settings: Any, tmp_path: Path
) -> None:
    """A START draws a new incarnation: the sequence as it was before the START (or the previous
    sequence under a reused id), restored by a crash at the count the client states, is refused."""
    settings = durable_settings(make_settings, tmp_path)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        await stub.ModelInfer(infer_request(MODEL, 8, inputs(3), start=True))
        assert srv.engine.durability is not None
        await srv.engine.durability.snapshot(force=True)  # the older history, at step 3
        crash_point(tmp_path / "state", tmp_path / "at-crash")
        again = await stub.ModelInfer(infer_request(MODEL, 8, inputs(3, seed=1), start=True))
        incarnation = again.parameters["sequence_incarnation"].string_param
    crashed(tmp_path / "state", tmp_path / "at-crash")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        request = resuming(infer_request(MODEL, 8, inputs(1)), 3, incarnation)
        refused = await failure(kserve(ch).ModelInfer(request))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not the one you had" in str(refused.details()) and steps_in(refused) == 3


async def test_start_after_a_crash_starts_from_zero_and_a_final_snapshot_vouches_only_once(
    make_settings: Any, tiny_repository: Path, tmp_path: Path
) -> None:
    x = inputs(6, seed=3)
    reference = OfflineReference(tiny_repository, MODEL)(x)
    settings = durable_settings(make_settings, tmp_path)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        await kserve(ch).ModelInfer(infer_request(MODEL, "s", inputs(50), start=True))
    # A graceful stop: its final snapshot vouches for the sequence, which goes on plainly.
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        going_on = await stub.ModelInfer(infer_request(MODEL, "s", inputs(1)))
        assert going_on.parameters["sequence_steps"].int64_param == 51
        crash_point(tmp_path / "state", tmp_path / "at-crash")  # the final snapshot, now spent
        restarted = await stub.ModelInfer(infer_request(MODEL, "s", x, start=True))
        np.testing.assert_allclose(infer_output(restarted), reference, atol=1e-5)
        info = await native(ch).GetSession(pb.GetSessionRequest(model=MODEL, session_id="s"))
        assert (info.steps, info.durable_steps) == (6, 0)  # START: nothing of it is durable yet
    crashed(tmp_path / "state", tmp_path / "at-crash")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        # The snapshot was final when read at the previous start, and was marked spent then: the
        # sequence it holds (step 50) is behind what was served since, so it is not trusted.
        refused = await failure(stub.ModelInfer(infer_request(MODEL, "s", inputs(1))))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and steps_in(refused) == 50
        again = await stub.ModelInfer(infer_request(MODEL, "s", x, start=True))
        np.testing.assert_allclose(infer_output(again), reference, atol=1e-5)
        assert again.parameters["sequence_steps"].int64_param == 6


# ----- 4 and 5. snapshots ---------------------------------------------------------------------
def one_session_store() -> SessionStore:
    store = SessionStore(state_count=1, layers=1, hidden=2, max_sessions=4)
    store.create("a").steps = 3
    return store


async def test_a_failed_snapshot_write_leaves_no_file_is_logged_once_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = one_session_store()
    metrics = Metrics()
    backend = DirectorySnapshots(tmp_path)
    durability = Durability(backend, lambda: [DurableModel("m", "1", "abc", store)], metrics,
                            interval_s=0.0, when_idle_s=0.0)  # fmt: skip

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("service.snapshots.os.fsync", disk_full)
    with caplog.at_level(logging.DEBUG, logger="service.durability"):
        for _ in range(3):
            with pytest.raises(OSError):
                await durability.snapshot(force=True)
        left = await asyncio.to_thread(lambda: list(tmp_path.rglob("*")))
        assert left == [tmp_path / "m"]  # no temporary file keeps the space
        monkeypatch.undo()  # space returns
        assert await durability.snapshot() == 1  # the failed ones left a change to write
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "are failing" in errors[0].getMessage()
    assert any("succeed again after 3 failure(s)" in r.getMessage() for r in caplog.records)
    failed = metrics.registry.get_sample_value("rnnserve_snapshots_total", {"outcome": "failed"})
    assert failed == 3.0
    assert decode(backend.read("m/1") or b"").sessions[0].steps == 3


def a_snapshot() -> ModelSnapshot:
    records = [SessionRecord("a", 5, "", None, "10.0.0.1", "00000000000000ff", True)]
    return ModelSnapshot("m", "1", "abc", 1.0, records, [np.ones((1, 1, 2), np.float32)], True)


def test_a_changed_header_is_detected() -> None:
    blob = encode(a_snapshot())
    assert decode(blob).sessions[0] == a_snapshot().sessions[0]
    for old, new in (
        (b'["a",5,', b'["a",6,'),
        (b'["a",', b'["b",'),
        (b'"final":true', b'"final":fals'),
    ):
        assert old in blob
        changed = blob.replace(old, new)
        with pytest.raises(CorruptSnapshot, match="sha256"):
            decode(changed)


def test_a_format_1_snapshot_is_still_read_and_vouches_for_nothing() -> None:
    import hashlib
    import json
    import struct

    payload = np.ones((1, 1, 2), "<f4").tobytes()
    header = {"format": 1, "model": "m", "version": "1", "model_sha256": "abc",
              "created_unix_s": 1.0, "state_count": 1, "layers": 1, "hidden": 2,
              "output_size": 0, "sessions": [["a", 5, "", 0]], "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
    text = json.dumps(header).encode()
    snapshot = decode(MAGIC_V1 + struct.pack("<Q", len(text)) + text + payload)
    (record,) = snapshot.sessions
    assert (record.session_id, record.steps, record.incarnation) == ("a", 5, "")
    assert not snapshot.final and not record.confirmed


# ----- 9. a reply that could not be sent ------------------------------------------------------
async def test_a_chunk_whose_reply_would_not_fit_is_refused_before_it_applies(
    make_settings: Any, tmp_path: Path
) -> None:
    from training.synthetic import export_random_model

    repository = tmp_path / "models"
    export_random_model(repository, "wide", cell="gru", input_size=1, hidden_size=4,
                        output_size=16, num_layers=1, seed=0)  # fmt: skip
    settings = make_settings(model_repository=repository, max_message_bytes=4096)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model="wide", session_id="w"))
        big = np.ones((200, 1), np.float32)  # an 800-byte request, a 12,800-byte reply
        details = await expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, stub.Step(step_request("wide", "w", big))
        )
        assert "over max_message_bytes (4096); send at most" in details
        most = int(details.rsplit("send at most ", 1)[1].split()[0])
        reply = await stub.Step(step_request("wide", "w", big[:most]))
        assert reply.steps == most
        info = await stub.GetSession(pb.GetSessionRequest(model="wide", session_id="w"))
        assert info.steps == most and len(info.last_output.data) == 4 * 16 * most
        # KServe echoes the request id: a long one leaves less room, and is counted.
        request = infer_request("wide", 5, big[:most], start=True, request_id="i" * 1000)
        await expect_code(grpc.StatusCode.INVALID_ARGUMENT, kserve(ch).ModelInfer(request))


async def close_during_a_chunk(
    srv: RnnServer, stub: Any, session_id: str, x: np.ndarray, entered: threading.Event
) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
    """Step ``session_id`` (the model gated), then close it while the chunk computes; returns
    both calls once the close has reached the server (it waits for the chunk)."""
    step = asyncio.ensure_future(stub.Step(step_request(MODEL, session_id, x)))
    await asyncio.to_thread(entered.wait, 30)
    close = asyncio.ensure_future(
        stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id=session_id))
    )
    session = srv.engine.model(MODEL).store.get(session_id)
    for _ in range(100_000):  # until the close has reached the server (no timer)
        if session.close_when_idle is not None:
            break
        await asyncio.sleep(0)
    assert session.close_when_idle is not None and not close.done()
    return step, close


# ----- 10. step counts on shared sessions -----------------------------------------------------
async def test_close_during_a_chunk_reports_the_count_with_that_chunk(make_settings: Any) -> None:
    async with (
        serving(make_settings(inline_compute_below_s=0.0)) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="c"))
        with gated(srv) as (entered, release):
            step, close = await close_during_a_chunk(srv, stub, "c", inputs(3), entered)
            release.set()
            reply, ended = await step, await close
        assert reply.steps == 3 and ended.steps == 3  # the final count, chunk included


async def test_replies_on_a_sequence_shared_by_streams_each_report_their_own_count(
    make_settings: Any,
) -> None:
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        await stub.ModelInfer(infer_request(MODEL, 3, inputs(1), start=True))
        # 4 x 16 requests: never more than the 64 a sequence may have waiting (the default
        # max_waiting_chunks_per_session), however slowly the machine serves them
        lengths = {f"{s}-{i}": 1 + (s + i) % 4 for s in range(4) for i in range(16)}

        async def stream(s: int) -> list[kpb.ModelStreamInferResponse]:
            requests = [infer_request(MODEL, 3, inputs(lengths[f"{s}-{i}"]), request_id=f"{s}-{i}")
                        for i in range(16)]  # fmt: skip
            return [r async for r in stub.ModelStreamInfer(iter(requests))]

        replies = [r for rs in await asyncio.gather(*map(stream, range(4))) for r in rs]
    assert not [r.error_message for r in replies if r.error_message]
    counts = sorted(
        (r.infer_response.parameters["sequence_steps"].int64_param, r.infer_response.id)
        for r in replies
    )
    previous = 1
    for steps, request_id in counts:  # each count is the one right after its own chunk
        assert steps - previous == lengths[request_id], (steps, request_id)
        previous = steps


# ----- 11. per-client limits survive a restart ------------------------------------------------
async def test_per_client_limits_hold_across_a_restart(make_settings: Any, tmp_path: Path) -> None:
    settings = durable_settings(make_settings, tmp_path, max_sessions_per_client=2)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        for name in ("a", "b"):
            await native(ch).CreateSession(pb.CreateSessionRequest(model=MODEL, session_id=name))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        details = await expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            native(ch).CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="c")),
        )
        assert "limit of 2 sessions" in details


# ----- found in review ------------------------------------------------------------------------
async def test_a_broken_sequence_goes_on_behind_a_request_that_states_its_count(
    make_settings: Any, tiny_repository: Path
) -> None:
    x = inputs(6, seed=4)
    reference = OfflineReference(tiny_repository, MODEL)(x)
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        await stub.ModelInfer(infer_request(MODEL, 12, x[:2], start=True))
        bad = infer_request(MODEL, 12, x[2:4])
        bad.inputs[0].datatype = "FP64"
        await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer(bad))  # breaks it
        anchored = infer_request(MODEL, 12, x[2:4])
        anchored.parameters["sequence_expected_steps"].int64_param = 2
        requests = [anchored, infer_request(MODEL, 12, x[4:5]), infer_request(MODEL, 12, x[5:])]
        replies = [r async for r in stub.ModelStreamInfer(iter(requests))]  # pipelined
    assert [r.error_message for r in replies] == ["", "", ""]
    outputs = [infer_output(r.infer_response) for r in replies]
    np.testing.assert_allclose(np.concatenate(outputs), reference[2:], atol=1e-5)


async def test_a_bad_parameter_of_a_request_breaks_its_sequence(make_settings: Any) -> None:
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        await stub.ModelInfer(infer_request(MODEL, 13, inputs(2), start=True))
        bad = infer_request(MODEL, 13, inputs(1))
        bad.parameters["sequence_expected_steps"].string_param = "2"
        refused = await failure(stub.ModelInfer(bad))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and steps_in(refused) == 2
        details = await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ModelInfer(infer_request(MODEL, 13, inputs(1))),
        )  # sent behind the refused one, it must not apply without it
        assert "cannot go on" in details


async def test_an_error_reply_too_large_to_echo_the_request_keeps_the_stream(
    make_settings: Any,
) -> None:
    async with serving(make_settings(max_message_bytes=4096)) as srv, channel(srv.grpc_port) as ch:
        stub = kserve(ch)
        unknown = infer_request("nope", 14, inputs(1), start=True, request_id="i" * 3900)
        good = infer_request(MODEL, 14, inputs(1), start=True, request_id="good")
        replies = [r async for r in stub.ModelStreamInfer(iter([unknown, good]))]
    assert "not found" in replies[0].error_message and replies[0].infer_response.id == ""
    assert not replies[1].error_message and replies[1].infer_response.id == "good"


async def test_sessions_are_unavailable_not_missing_while_the_models_load(
    make_settings: Any,
) -> None:
    server = RnnServer(make_settings())  # not started: nothing loaded or restored yet
    for call in (
        lambda: server.engine.session(MODEL, "", "s"),
        lambda: server.engine.model(MODEL),
    ):
        with pytest.raises(Unavailable, match="still loading"):
            call()


async def test_a_session_closing_when_the_final_snapshot_is_taken_is_not_saved(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = durable_settings(make_settings, tmp_path, drain_timeout_s=0.0)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        for name in ("kept", "closing"):
            await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id=name))
        with gated(srv) as (entered, release):
            step, close = await close_during_a_chunk(srv, stub, "closing", inputs(1), entered)
            assert srv.engine.durability is not None
            await srv.engine.durability.snapshot(force=True, final=True)
            blob = await asyncio.to_thread(
                DirectorySnapshots(tmp_path / "state").read, f"{MODEL}/1"
            )
            release.set()
            await step, await close
    assert [r.session_id for r in decode(blob or b"").sessions] == ["kept"]


def test_the_python_client_goes_on_after_a_refused_chunk(
    make_settings: Any, tiny_repository: Path
) -> None:
    from service.client import Client

    x = inputs(6, seed=5)
    reference = OfflineReference(tiny_repository, MODEL)(x)

    async def run() -> None:
        async with serving(make_settings()) as srv:
            with Client(f"127.0.0.1:{srv.grpc_port}") as client:
                session = await asyncio.to_thread(client.open_session, MODEL)
                first = await asyncio.to_thread(session.step, x[:3])
                with pytest.raises(grpc.RpcError) as refused:
                    await asyncio.to_thread(session.step, np.zeros((2, 5), np.float32))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                second = await asyncio.to_thread(session.step, x[3:])  # attaches again
                assert session.steps == 6 and await asyncio.to_thread(session.close) == 6
        np.testing.assert_allclose(np.concatenate([first, second]), reference, atol=1e-5)

    asyncio.run(run())


async def test_two_servers_never_share_a_snapshot_directory(
    make_settings: Any, tmp_path: Path
) -> None:
    from service.server import StartupError

    settings = durable_settings(make_settings, tmp_path)
    async with serving(settings):
        with pytest.raises(StartupError, match="in use by another rnnserve server"):
            await RnnServer(settings).start()
    async with serving(settings):  # released when the first stopped
        pass


def test_a_forked_session_goes_on_from_the_state_it_was_forked_at(
    make_settings: Any, tiny_repository: Path
) -> None:
    from service.client import Client

    x = inputs(8, seed=6)
    reference = OfflineReference(tiny_repository, MODEL)(x)

    async def run() -> None:
        async with serving(make_settings()) as srv:
            with Client(f"127.0.0.1:{srv.grpc_port}") as client:
                original = await asyncio.to_thread(client.open_session, MODEL)
                await asyncio.to_thread(original.step, x[:5])
                state = await asyncio.to_thread(original.state)
                assert [s.shape for s in state] == [(2, 8), (2, 8)]  # h and c, [layers, hidden]
                fork = await asyncio.to_thread(original.fork)
                forked = await asyncio.to_thread(fork.step, x[5:])
                went_on = await asyncio.to_thread(original.step, x[5:])
                assert (fork.steps, original.steps) == (3, 8)
                await asyncio.to_thread(fork.close)
                await asyncio.to_thread(original.close)
        np.testing.assert_allclose(forked, reference[5:], atol=1e-5)
        np.testing.assert_array_equal(forked, went_on)  # the same state, the same outputs

    asyncio.run(run())
