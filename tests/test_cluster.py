"""Replicas of one cluster in one process, sharing an in-memory cluster store: any replica serves
any session, exactly (hand-over, drain, a dead owner's restore, fencing, one source of truth).

Everything is driven by the test: leases last long enough never to expire by themselves, writes
to the store happen when a test asks (``write_changed``), and a "dead" replica is one whose lease
the test ends in the store while it stops renewing. The same logic against real processes, Redis
and nginx is in tests/test_cluster_acceptance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.cluster_backend import MemoryBackend
from service.server import RnnServer
from service.settings import Settings
from service.snapshots import DirectorySnapshots, ModelSnapshot, SessionRecord, encode
from tests.grpc_helpers import (
    channel,
    expect_code,
    hold_batches,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
    step_request,
)
from tests.models_for_tests import OfflineReference

MODEL = "tiny_lstm"


@contextlib.asynccontextmanager
async def replicas(
    make_settings: Callable[..., Settings],
    count: int = 2,
    backend: MemoryBackend | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[MemoryBackend, list[RnnServer]]]:
    """``count`` started servers sharing one in-memory cluster store (``backend``, or a new
    one), named replica-0, replica-1, ...; stopped afterwards (unless a test stopped them)."""
    backend = backend or MemoryBackend()
    base: dict[str, Any] = {
        "cluster_lease_s": 600.0,  # never expires by itself: tests end leases themselves
        "cluster_write_interval_s": 3600.0,  # tests write with write_changed()
        "cluster_handover_timeout_s": 10.0,
    }
    base.update(overrides)
    servers = []
    try:
        for k in range(count):
            server = RnnServer(
                make_settings(cluster_replica_id=f"replica-{k}", **base), cluster_backend=backend
            )
            await server.start()
            servers.append(server)
        yield backend, servers
    finally:
        for server in servers:
            if server.engine.ready:
                with contextlib.suppress(Exception):  # (a test may have broken its store)
                    await server.stop()


def count(metric: Any) -> float:
    return float(metric._value.get())


def chunks(seed: int, lengths: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 3)).astype(np.float32) for n in lengths]


async def step(server: RnnServer, session_id: str, x: np.ndarray, **fields: Any) -> pb.StepResponse:
    async with channel(server.grpc_port) as ch:
        request = step_request(MODEL, session_id, x)
        for name, value in fields.items():
            setattr(request, name, value)
        response: pb.StepResponse = await native(ch).Step(request)
        return response


async def open_session(server: RnnServer, session_id: str = "") -> pb.SessionInfo:
    async with channel(server.grpc_port) as ch:
        info: pb.SessionInfo = await native(ch).CreateSession(
            pb.CreateSessionRequest(model=MODEL, session_id=session_id)
        )
        return info


async def test_a_session_continues_exactly_on_whichever_replica_a_request_reaches(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(0, [3, 1, 4, 2, 5, 1, 2, 3])
    async with replicas(make_settings) as (_, (a, b)):
        sid = (await open_session(a)).session_id
        route = [a, a, b, b, a, b, a, a]  # each chunk to the replica the "balancer" picked
        outputs = [
            output_of(await step(server, sid, x)) for server, x in zip(route, xs, strict=True)
        ]
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)
        # a -> b, b -> a, a -> b, b -> a: each move a hand-over from a live owner, nothing replayed
        assert count(b.metrics.cluster_moves.labels("handover")) == 2
        assert count(a.metrics.cluster_moves.labels("handover")) == 2
        assert count(a.metrics.cluster_handed_over.labels("asked")) == 2
        assert count(a.metrics.cluster_moves.labels("restored")) == 0
        for server in (a, b):
            assert count(server.metrics.cluster_fenced_writes) == 0


async def test_a_stream_on_the_old_owner_is_told_the_session_moved(
    make_settings: Callable[..., Settings],
) -> None:
    async with replicas(make_settings) as (_, (a, b)), channel(a.grpc_port) as ch:
        stream = native(ch).Stream()
        await stream.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL)))
        opened = (await stream.read()).opened
        await stream.write(
            pb.StreamRequest(
                chunk=pb.Chunk(input=step_request(MODEL, "", np.ones((2, 3), np.float32)).input)
            )
        )
        assert (await stream.read()).output.steps == 2
        moved = await step(b, opened.session_id, np.ones((1, 3), np.float32))
        assert moved.steps == 3
        ended = (await stream.read()).ended
        assert ended.reason == pb.END_REASON_MOVED
        assert ended.steps == 2


async def test_a_hand_over_waits_for_the_chunk_in_flight_and_loses_nothing(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(1, [2, 3, 1])
    async with replicas(make_settings) as (_, (a, b)):
        sid = (await open_session(a)).session_id
        first = output_of(await step(a, sid, xs[0]))
        computing, go_on = hold_batches(a.engine.model(MODEL).batcher.runner)
        in_flight = asyncio.ensure_future(step(a, sid, xs[1]))
        await computing.wait()
        on_b = asyncio.ensure_future(step(b, sid, xs[2]))
        await asyncio.sleep(0)  # (b's request is now waiting for a's hand-over)
        assert not on_b.done()
        go_on.set()
        second, third = await in_flight, await on_b
        assert (second.steps, third.steps) == (5, 6)
        outputs = [first, output_of(second), output_of(third)]
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)


async def test_a_drained_replica_hands_every_session_over_with_nothing_to_replay(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    offline = OfflineReference(tiny_repository, MODEL)
    async with replicas(make_settings) as (_, (a, b)):
        sessions = {}
        for k in range(5):
            sid = (await open_session(a)).session_id
            xs = chunks(10 + k, [2, 3])
            sessions[sid] = (xs, [output_of(await step(a, sid, xs[0]))])
        report = await a.stop()
        assert report["sessions_saved"] == 5
        for sid, (xs, outputs) in sessions.items():
            # no stated step count needed: a drained session is confirmed
            outputs.append(output_of(await step(b, sid, xs[1])))
            np.testing.assert_allclose(
                np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5
            )
        assert count(b.metrics.cluster_moves.labels("released")) == 5
        assert count(a.metrics.cluster_handed_over.labels("drain")) == 5


async def test_a_dead_owners_sessions_resume_from_their_last_write_and_its_writes_are_fenced(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    """The SIGSTOP story in one process: a stops renewing its lease (paused), b takes the session
    from a's last write, the client replays from there; a wakes up, its writes are refused and
    counted, it drops the session, and the outputs stay exact."""
    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(2, [2, 3, 1, 4])
    async with replicas(make_settings) as (backend, (a, b)):
        assert a.engine.cluster is not None
        info = await open_session(a)
        sid, known = info.session_id, info.incarnation
        outputs = [output_of(await step(a, sid, xs[0]))]
        assert await a.engine.cluster.write_changed() == 1  # the store has steps 0..2
        outputs.append(output_of(await step(a, sid, xs[1])))  # steps 2..5: only on a
        # a "pauses": it renews nothing, and its lease ends in the store
        a.engine.cluster._tasks[0].cancel()
        backend.leases.pop(a.engine.cluster.replica)
        # b restores steps 0..2, unconfirmed: a chunk must state where its client stands
        details = await expect_code(grpc.StatusCode.FAILED_PRECONDITION, step(b, sid, xs[2]))
        assert "2" in details
        assert count(b.metrics.cluster_moves.labels("restored")) == 1
        # the client replays from step 2 (as service.client does), then goes on
        replay = output_of(await step(b, sid, xs[1], expected_steps=2, incarnation=known))
        np.testing.assert_allclose(replay, outputs[1], atol=1e-6)
        outputs.append(output_of(await step(b, sid, xs[2], expected_steps=5)))
        # a wakes up: its lease is gone, so it applies nothing until it checked its sessions
        a.engine.cluster._valid_until_s = 0.0
        await expect_code(grpc.StatusCode.UNAVAILABLE, step(a, sid, xs[3], expected_steps=6))
        a_session = a.engine.registry.holding(MODEL, sid, "")
        assert a_session is not None  # it still holds its stale copy, at step 5
        await backend.register(a.engine.cluster.replica, 600.0)
        assert await a.engine.cluster.write_changed(every_session=True) == 0  # none lands
        assert count(a.metrics.cluster_fenced_writes) == 1
        assert count(a.metrics.cluster_sessions_lost) == 1
        assert a.engine.registry.holding(MODEL, sid, "") is None
        # the session's truth is b's: a request on a (lease renewed) moves it from b, exactly
        a.engine.cluster._trust_lease(a.engine.cluster.clock())
        outputs.append(output_of(await step(a, sid, xs[3], expected_steps=6)))
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)


async def test_an_id_is_unique_across_the_cluster_and_a_close_anywhere_ends_it(
    make_settings: Callable[..., Settings],
) -> None:
    async with replicas(make_settings) as (backend, (a, b)):
        await open_session(a, "mine")
        await expect_code(grpc.StatusCode.ALREADY_EXISTS, open_session(b, "mine"))
        async with channel(b.grpc_port) as ch:
            ended = await native(ch).CloseSession(
                pb.CloseSessionRequest(model=MODEL, session_id="mine")
            )
        assert ended.reason == pb.END_REASON_CLOSED
        assert not backend.records  # gone from the store before the reply
        await open_session(a, "mine")  # the id is free again, anywhere
        await expect_code(
            grpc.StatusCode.NOT_FOUND, step(b, "never-opened", np.ones((1, 3), np.float32))
        )


async def test_a_kserve_sequence_goes_on_across_replicas_and_a_start_anywhere_restarts_it(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(3, [2, 1, 3])
    async with (
        replicas(make_settings) as (backend, (a, b)),
        channel(a.grpc_port) as ca,
        channel(b.grpc_port) as cb,
    ):
        stubs = [kserve(ca), kserve(cb), kserve(ca)]
        outputs = []
        for k, (stub, x) in enumerate(zip(stubs, xs, strict=True)):
            request = infer_request(MODEL, 77, x, start=k == 0, end=k == len(xs) - 1)
            outputs.append(infer_output(await stub.ModelInfer(request)))
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)
        assert not backend.records  # the END ended it everywhere
        # a START on b of a sequence living on a: taken over, then begun again from zero
        await kserve(ca).ModelInfer(infer_request(MODEL, 78, xs[0], start=True))
        again = infer_output(
            await kserve(cb).ModelInfer(infer_request(MODEL, 78, xs[1], start=True))
        )
        np.testing.assert_allclose(again, offline(xs[1]), atol=1e-5)
        assert a.engine.registry.holding(MODEL, "78", "") is None


async def test_a_replica_in_a_cluster_never_restores_its_old_local_snapshots(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """One source of truth: a replica restarted in its old directory must not bring back a
    session the cluster has moved on from."""
    async with replicas(make_settings, 1) as (_, (a,)):
        handle = a.engine.model(MODEL)
        spec = handle.spec
        states = [np.zeros((s.pre, 1, s.post), np.float32) for s in handle.store.state_specs]
    old = ModelSnapshot(
        spec.name, spec.version, spec.sha256, 1.0, [SessionRecord("old", 9, "")], states, final=True
    )
    DirectorySnapshots(tmp_path).write(old.key, encode(old))
    async with replicas(make_settings, 1, snapshot_backend="directory", snapshot_dir=tmp_path) as (
        _,
        (c,),
    ):
        await expect_code(grpc.StatusCode.NOT_FOUND, step(c, "old", np.ones((1, 3), np.float32)))
        assert len(c.engine.model(MODEL).store) == 0


@pytest.mark.parametrize("reason", ["unreachable"])
async def test_a_replica_that_cannot_reach_its_store_applies_nothing(
    make_settings: Callable[..., Settings], reason: str
) -> None:
    """Without a lease it can confirm, a replica refuses chunks (UNAVAILABLE: clients retry,
    maybe elsewhere) rather than risk applying them to a session another replica took."""
    async with replicas(make_settings) as (_, (a, _b)):
        assert a.engine.cluster is not None
        sid = (await open_session(a)).session_id
        a.engine.cluster._valid_until_s = 0.0
        details = await expect_code(
            grpc.StatusCode.UNAVAILABLE, step(a, sid, np.ones((1, 3), np.float32))
        )
        assert "lease" in details


async def test_the_python_client_follows_its_session_when_another_replica_takes_it(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    """The client's stream is told MOVED (another replica took the session: here a GetSession
    through it), reconnects, brings the session back and goes on: exact, nothing replayed."""
    from service.client import Client

    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(4, [2, 1, 3, 2])
    async with replicas(make_settings) as (_, (a, b)):
        client = Client(f"127.0.0.1:{a.grpc_port}")
        session = await asyncio.to_thread(client.open_session, MODEL)
        try:
            outputs = [await asyncio.to_thread(session.step, x) for x in xs[:2]]
            async with channel(b.grpc_port) as ch:
                request = pb.GetSessionRequest(model=MODEL, session_id=session.session_id)
                assert (await native(ch).GetSession(request)).steps == 3  # now on b
            outputs += [await asyncio.to_thread(session.step, x) for x in xs[2:]]
            assert session.reconnects == 1 and session.replayed_steps == 0
        finally:
            await asyncio.to_thread(session.close)
            await asyncio.to_thread(client.close)
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)
        assert count(a.metrics.cluster_moves.labels("handover")) == 1  # brought back
