"""The cluster under faults of its store and races between requests, in one process: each test a
finding of the review of the cluster code, which failed before its fix. Replicas share a
MemoryBackend whose operations can be made to fail, lose their reply, or take longer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.exceptions

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.cluster_backend import Claimed, HeldBy, MemoryBackend, Message, Write, record_key
from service.server import RnnServer
from service.settings import Settings
from tests.grpc_helpers import (
    channel,
    expect_code,
    hold_batches,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
)
from tests.models_for_tests import OfflineReference
from tests.test_cluster import MODEL, chunks, count, open_session, replicas, step
from tests.test_model_control import offline as offline_of
from tests.test_model_control import repository, versions  # noqa: F401  (a fixture)


class FaultyBackend(MemoryBackend):
    """A MemoryBackend with faults and delays the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_release: BaseException | None = None  # raised by release writes until cleared
        self.lose_release_reply = False  # the next release write lands, its reply is lost
        self.fail_renew: BaseException | None = None  # raised once
        self.fail_delete: BaseException | None = None  # raised once
        self.deletes_held: asyncio.Event | None = None  # deletes wait until it is set
        self.fail_acquire: BaseException | None = None  # raised once
        self.delays_s: dict[str, tuple[float, float]] = {}  # operation: (before, after)

    async def _delay(self, operation: str, at: int) -> None:
        if operation in self.delays_s:
            await asyncio.sleep(self.delays_s[operation][at])

    async def write(self, writes: Sequence[Write], ttl_s: float) -> list[bool]:
        if any(w.release for w in writes):
            if self.fail_release is not None:
                raise self.fail_release
            if self.lose_release_reply:
                self.lose_release_reply = False
                await super().write(writes, ttl_s)
                raise ConnectionError("the reply was lost (a timeout)")
        return await super().write(writes, ttl_s)

    async def renew(self, replica: str, lease_s: float) -> bool:
        if self.fail_renew is not None:
            error, self.fail_renew = self.fail_renew, None
            raise error
        return await super().renew(replica, lease_s)

    async def delete(self, key: str, replica: str, epoch: int) -> bool:
        if self.deletes_held is not None:
            await self.deletes_held.wait()
        if self.fail_delete is not None:
            error, self.fail_delete = self.fail_delete, None
            raise error
        return await super().delete(key, replica, epoch)

    async def create(self, key: str, replica: str, blob: bytes, ttl_s: float) -> int | None:
        await self._delay("create", 0)
        result = await super().create(key, replica, blob, ttl_s)
        await self._delay("create", 1)
        return result

    async def acquire(self, key: str, replica: str, ttl_s: float) -> Claimed | HeldBy | None:
        if self.fail_acquire is not None:
            error, self.fail_acquire = self.fail_acquire, None
            raise error
        await self._delay("acquire", 0)
        result = await super().acquire(key, replica, ttl_s)
        await self._delay("acquire", 1)
        return result


@contextlib.asynccontextmanager
async def cluster(
    make_settings: Callable[..., Settings], backend: MemoryBackend, size: int = 2, **overrides: Any
) -> AsyncIterator[list[RnnServer]]:
    """``size`` replicas over ``backend`` (tests/test_cluster.py's harness)."""
    async with replicas(make_settings, size, backend, **overrides) as (_, servers):
        yield servers


def kill(server: RnnServer, backend: MemoryBackend) -> None:
    """The replica stops renewing and its lease ends in the store (it "died")."""
    assert server.engine.cluster is not None
    server.engine.cluster._tasks[0].cancel()
    backend.leases.pop(server.engine.cluster.replica)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"not within 5 s: {what}")


async def test_a_record_given_back_after_its_owner_died_stays_unconfirmed(
    make_settings: Callable[..., Settings],
) -> None:
    """Taken from a dead owner, then not servable here (full): given back, it must not pass for
    a state written after the session's last chunk (a stale step 0 applied as current)."""
    xs = chunks(5, [2, 3])
    backend = FaultyBackend()
    async with cluster(make_settings, backend, 3, max_sessions=1) as (a, b, c):
        sid = (await open_session(a)).session_id
        await step(a, sid, xs[0])  # steps 0..2, never written: a dies
        kill(a, backend)
        await open_session(b)  # b is full
        await expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, step(b, sid, xs[1]))
        details = await expect_code(grpc.StatusCode.FAILED_PRECONDITION, step(c, sid, xs[1]))
        assert "expected_steps" in details


async def test_a_release_whose_reply_was_lost_leaves_no_second_copy(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(6, [2, 3, 1])
    backend = FaultyBackend()
    async with cluster(make_settings, backend, cluster_handover_timeout_s=2.0) as (a, b):
        sid = (await open_session(a)).session_id
        outputs = [output_of(await step(a, sid, xs[0]))]
        backend.lose_release_reply = True
        moved = await step(b, sid, xs[1])
        assert moved.steps == 5
        outputs.append(output_of(moved))
        back = await step(a, sid, xs[2])  # a's copy is gone: taken back from b
        assert back.steps == 6
        outputs.append(output_of(back))
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)


async def test_a_hand_over_failing_on_a_store_error_ends_nothing_silently_and_never_spins(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend, cluster_handover_timeout_s=0.5) as (a, b):
        sid = (await open_session(a)).session_id
        await step(a, sid, np.ones((2, 3), np.float32))
        backend.fail_release = redis.exceptions.OutOfMemoryError("OOM command not allowed")
        await expect_code(grpc.StatusCode.UNAVAILABLE, step(b, sid, np.ones((1, 3), np.float32)))
        assert count(a.metrics.cluster_store_errors.labels("release")) >= 1
        backend.fail_release = None  # the store is fine again
        # a dropped its copy (the release's outcome was unknown); the record is still a's, at
        # its last write, so the session comes back unconfirmed: its client says where it is
        await asyncio.wait_for(a.engine.bring(MODEL, "", sid), 2.0)
        found = a.engine.registry.holding(MODEL, sid, "")
        assert found is not None
        assert not found[1].moving
        assert found[1].unconfirmed


async def test_the_lease_task_survives_a_store_error_other_than_a_lost_connection(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend, 1, cluster_lease_s=0.3) as (a,):
        assert a.engine.cluster is not None
        sid = (await open_session(a)).session_id
        backend.fail_renew = redis.exceptions.ReadOnlyError("READONLY (a Sentinel failover)")
        errors = a.metrics.cluster_store_errors.labels("lease")
        await eventually(lambda: count(errors) == 1, "the failed renewal")
        renewals = backend.leases[a.engine.cluster.replica]
        await eventually(
            lambda: backend.leases.get(a.engine.cluster.replica, 0) > renewals,  # type: ignore[union-attr]
            "a renewal after it",
        )
        assert not a.engine.cluster._tasks[0].done()
        await step(a, sid, np.ones((1, 3), np.float32))


async def test_a_close_whose_delete_failed_once_is_retried_and_never_comes_back(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend) as (a, _b):
        info = await open_session(a, "mine")
        await step(a, "mine", np.ones((2, 3), np.float32))
        await a.engine.cluster.write_changed()  # type: ignore[union-attr]
        backend.fail_delete = ConnectionError("a store blip")
        async with channel(a.grpc_port) as ch:
            ended = await native(ch).CloseSession(
                pb.CloseSessionRequest(model=MODEL, session_id="mine")
            )
        assert ended.reason == pb.END_REASON_CLOSED
        assert not backend.records  # deleted by the retry before the close answered
        await expect_code(
            grpc.StatusCode.NOT_FOUND,
            step(a, "mine", np.ones((1, 3), np.float32), expected_steps=2,
                 incarnation=info.incarnation),
        )  # fmt: skip


async def test_a_claim_racing_an_open_of_the_same_id_waits_for_it(
    make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(7, [2, 3, 1])
    backend = FaultyBackend()
    async with cluster(make_settings, backend) as (a, _b):
        backend.delays_s = {"create": (0.0, 0.02), "acquire": (0.005, 0.05)}
        opening = asyncio.ensure_future(a.engine.open_session(MODEL, "", "x", api="native"))
        await asyncio.sleep(0.001)  # (the open's create is on its way)
        bringing = asyncio.ensure_future(a.engine.bring(MODEL, "", "x"))  # e.g. a GetSession
        await opening
        await bringing
        backend.delays_s = {}
        outputs = [output_of(await step(a, "x", xs[0])), output_of(await step(a, "x", xs[1]))]
        assert await a.engine.cluster.write_changed() == 1  # type: ignore[union-attr]
        last = await step(a, "x", xs[2])
        assert last.steps == 6
        outputs.append(output_of(last))
        np.testing.assert_allclose(np.concatenate(outputs), offline(np.concatenate(xs)), atol=1e-5)


async def test_nothing_is_kept_per_session_once_it_moved(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend) as (a, b):
        for _ in range(20):
            sid = (await open_session(a)).session_id
            await step(b, sid, np.ones((1, 3), np.float32))
        assert b.engine.cluster is not None and a.engine.cluster is not None
        assert not b.engine.cluster._asked and not b.engine.cluster._claims
        await eventually(lambda: not a.engine.cluster._releases, "a's hand-overs done")  # type: ignore[union-attr]


async def test_a_stream_request_that_could_not_bring_its_sequence_breaks_it(
    make_settings: Callable[..., Settings],
) -> None:
    """Pipelined: r1 fails before its sequence is here (a store blip), so r2, sent behind it,
    must not apply to a history without r1."""
    xs = chunks(9, [2, 3, 1])
    backend = FaultyBackend()
    async with cluster(make_settings, backend) as (a, b):
        async with channel(b.grpc_port) as cb:
            await kserve(cb).ModelInfer(infer_request(MODEL, 91, xs[0], start=True))
        backend.fail_acquire = ConnectionError("a store blip")

        async def requests() -> Any:
            yield infer_request(MODEL, 91, xs[1], request_id="r1")
            yield infer_request(MODEL, 91, xs[2], request_id="r2")

        async with channel(a.grpc_port) as ca:
            replies = {
                r.infer_response.id: r async for r in kserve(ca).ModelStreamInfer(requests())
            }
        assert "unavailable" in replies["r1"].error_message
        assert "cannot go on" in replies["r2"].error_message


async def test_a_start_on_another_version_keeps_the_sequence_in_the_cluster(
    versions: Path,  # noqa: F811
    tmp_path: Path,
    make_settings: Callable[..., Settings],
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    x = np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32)
    backend = FaultyBackend()
    async with (
        cluster(make_settings, backend, model_repository=root) as (a, b),
        channel(a.grpc_port) as ca,
        channel(b.grpc_port) as cb,
    ):
        on_1 = infer_request(MODEL, 8, x[:3], start=True)
        on_1.model_version = "1"
        await kserve(ca).ModelInfer(on_1)
        on_2 = infer_request(MODEL, 8, x[:3], start=True)
        on_2.model_version = "2"
        first = infer_output(await kserve(ca).ModelInfer(on_2))
        assert len(backend.records) == 1
        rest = infer_output(await kserve(cb).ModelInfer(infer_request(MODEL, 8, x[3:])))
        np.testing.assert_allclose(
            np.concatenate([first, rest]), offline_of(root, MODEL, "2", x), atol=1e-5
        )


async def test_a_broken_sequence_stays_broken_when_it_moves(
    make_settings: Callable[..., Settings],
) -> None:
    x = np.ones((2, 3), np.float32)
    backend = FaultyBackend()
    async with (
        cluster(make_settings, backend) as (a, b),
        channel(a.grpc_port) as ca,
        channel(b.grpc_port) as cb,
    ):
        await kserve(ca).ModelInfer(infer_request(MODEL, 5, x, start=True))
        bad = infer_request(MODEL, 5, np.ones((2, 4), np.float32))
        await expect_code(grpc.StatusCode.INVALID_ARGUMENT, kserve(ca).ModelInfer(bad))
        await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, kserve(ca).ModelInfer(infer_request(MODEL, 5, x))
        )
        await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, kserve(cb).ModelInfer(infer_request(MODEL, 5, x))
        )


async def test_a_release_asked_during_the_drain_is_no_loss(
    make_settings: Callable[..., Settings], tiny_repository: Path, monkeypatch: Any
) -> None:
    import service.cluster_writes as writes_module

    offline = OfflineReference(tiny_repository, MODEL)
    xs = chunks(12, [2, 3])
    backend = FaultyBackend()
    encoded = writes_module.encoded
    drain_writing = asyncio.Event()

    async def slow(snapshots: Any) -> Any:
        drain_writing.set()
        await asyncio.sleep(0.2)  # (the hand-over's request arrives meanwhile)
        return await encoded(snapshots)

    async with cluster(make_settings, backend) as (a, b):
        sid = (await open_session(a)).session_id
        first = output_of(await step(a, sid, xs[0]))
        monkeypatch.setattr(writes_module, "encoded", slow)
        stopping = asyncio.ensure_future(a.stop())
        await drain_writing.wait()
        second = await step(b, sid, xs[1])
        await stopping
        np.testing.assert_allclose(
            np.concatenate([first, output_of(second)]), offline(np.concatenate(xs)), atol=1e-5
        )
        assert count(a.metrics.cluster_fenced_writes) == 0
        assert count(a.metrics.cluster_sessions_lost) == 0
        moves = b.metrics.cluster_moves
        assert count(moves.labels("released")) + count(moves.labels("handover")) == 1
        assert count(moves.labels("restored")) == 0  # nothing replayed


async def test_a_refused_release_is_counted_as_fenced_and_lost(
    make_settings: Callable[..., Settings],
) -> None:
    """A paused owner wakes to the release request sent while it slept: the store refuses its
    write (another replica took the session), and that is counted like any fenced write."""
    async with replicas(make_settings) as (backend, (a, b)):
        assert a.engine.cluster is not None
        sid = (await open_session(a)).session_id
        await step(a, sid, np.ones((2, 3), np.float32))  # 2 steps a never writes
        # a "pauses": no renewal, its lease gone from the store; b takes the session (restored)
        a.engine.cluster._tasks[0].cancel()
        backend.leases.pop(a.engine.cluster.replica)
        async with channel(b.grpc_port) as ch:
            taken = await native(ch).GetSession(pb.GetSessionRequest(model=MODEL, session_id=sid))
        assert taken.steps == 0 and count(b.metrics.cluster_moves.labels("restored")) == 1
        # a "wakes" and handles the "release" b sent while it was paused
        await a.engine.cluster._hand_over(record_key(MODEL, sid, ""))
        assert a.engine.registry.holding(MODEL, sid, "") is None  # dropped here: right
        assert backend.records[record_key(MODEL, sid, "")].replica == b.engine.cluster.replica
        # and counted, as the same refusal is through write_changed
        assert count(a.metrics.cluster_fenced_writes) == 1
        assert count(a.metrics.cluster_sessions_lost) == 1


# ----- the second review's findings ----------------------------------------------------------


async def test_a_start_on_another_version_refused_keeps_the_older_copys_record(
    versions: Path,  # noqa: F811
    tmp_path: Path,
    make_settings: Callable[..., Settings],
) -> None:
    """A START on version 2 refused before it applies (its deadline too near) must not delete
    the record that the sequence's copy on version 1 still lives on."""
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    x = np.random.default_rng(4).standard_normal((9, 3)).astype(np.float32)
    backend = FaultyBackend()
    async with (
        cluster(make_settings, backend, model_repository=root, deadline_margin_s=5.0) as (a, b),
        channel(a.grpc_port) as ca,
        channel(b.grpc_port) as cb,
    ):
        on_1 = infer_request(MODEL, 8, x[:3], start=True)
        on_1.model_version = "1"
        await kserve(ca).ModelInfer(on_1)  # sequence 8 lives on version 1, on a
        on_2 = infer_request(MODEL, 8, x[3:5], start=True)
        on_2.model_version = "2"
        await expect_code(
            grpc.StatusCode.DEADLINE_EXCEEDED, kserve(ca).ModelInfer(on_2, timeout=3.0)
        )
        assert a.engine.cluster is not None
        await asyncio.gather(*a.engine.cluster.writer.deletes.values())
        assert len(backend.records) == 1  # still the version-1 copy's
        # begun again through b (a hand-over from a), then on through a (back): exact
        first = infer_output(
            await kserve(cb).ModelInfer(infer_request(MODEL, 8, x[5:7], start=True))
        )
        rest = infer_output(await kserve(ca).ModelInfer(infer_request(MODEL, 8, x[7:])))
        np.testing.assert_allclose(
            np.concatenate([first, rest]), offline_of(root, MODEL, "2", x[5:]), atol=1e-5
        )


async def test_a_replica_whose_lease_lapsed_neither_closes_nor_shows_its_stale_copy(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend) as (a, b):
        assert a.engine.cluster is not None
        info = await open_session(a, "x")
        await step(a, "x", np.ones((2, 3), np.float32))
        await a.engine.cluster.write_changed()
        # a is paused past its lease; its heartbeat has not run since it woke
        backend.leases.pop("replica-0")
        a.engine.cluster._valid_until_s = 0.0
        # meanwhile the client went on through b
        x = np.ones((1, 3), np.float32)
        await step(b, "x", x, expected_steps=2, incarnation=info.incarnation)
        async with channel(a.grpc_port) as ch:
            close = native(ch).CloseSession(pb.CloseSessionRequest(model=MODEL, session_id="x"))
            await expect_code(grpc.StatusCode.UNAVAILABLE, close)
            get = native(ch).GetSession(pb.GetSessionRequest(model=MODEL, session_id="x"))
            await expect_code(grpc.StatusCode.UNAVAILABLE, get)
        assert (await step(b, "x", x, expected_steps=3)).steps == 4  # it lives on, on b


async def test_a_claim_and_an_open_waiting_for_the_same_delete_never_hold_the_id_together(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend) as (a, b):
        assert a.engine.cluster is not None
        await a.engine.open_session(MODEL, "", "x", api="native")
        backend.deletes_held = asyncio.Event()  # the close's delete waits until released
        closing = asyncio.ensure_future(a.engine.close_session(MODEL, "", "x"))
        await eventually(lambda: bool(a.engine.cluster.writer.deletes), "the delete pending")  # type: ignore[union-attr]
        opening = asyncio.ensure_future(a.engine.open_session(MODEL, "", "x", api="native"))
        await asyncio.sleep(0)  # (the open waits for the delete)
        getting = asyncio.ensure_future(a.engine.bring(MODEL, "", "x"))  # e.g. a GetSession
        await asyncio.sleep(0)
        third = asyncio.ensure_future(a.engine.bring(MODEL, "", "x"))
        await asyncio.sleep(0)
        backend.deletes_held.set()
        await closing
        view = await opening
        await asyncio.wait_for(asyncio.gather(getting, third), 5.0)
        live = a.engine.registry.holding(MODEL, "x", "")
        assert live is not None
        record = backend.records[record_key(MODEL, "x", "")]
        assert (record.replica, record.epoch) == ("replica-0", live[1].epoch)
        x = np.ones((1, 3), np.float32)
        assert (await step(b, "x", x, expected_steps=0, incarnation=view.incarnation)).steps == 1
        assert a.engine.registry.holding(MODEL, "x", "") is None  # moved, not copied


class SlowDeletes(FaultyBackend):
    """A store whose deletes take a while (slow, or flapping); everything else is quick."""

    async def delete(self, key: str, replica: str, epoch: int) -> bool:
        await asyncio.sleep(0.5)
        return await super().delete(key, replica, epoch)


async def test_a_session_that_ended_while_its_delete_is_slow_never_comes_back(
    make_settings: Callable[..., Settings],
) -> None:
    from service.session import EndReason

    backend = SlowDeletes()
    async with cluster(make_settings, backend, cluster_handover_timeout_s=0.1) as (a, b):
        assert a.engine.cluster is not None
        view = await a.engine.open_session(MODEL, "", "x", api="native")
        await step(a, "x", np.ones((2, 3), np.float32))
        await a.engine.cluster.write_changed()
        handle, session = a.engine.registry.holding(MODEL, "x", "")  # type: ignore[misc]
        handle.store.end(session, EndReason.IDLE_TIMEOUT)  # what the TTL sweeper does
        x = np.ones((1, 3), np.float32)
        # the client, knowing nothing of the expiry, asks b (UNAVAILABLE while the delete runs)
        await expect_code(
            grpc.StatusCode.UNAVAILABLE,
            step(b, "x", x, expected_steps=2, incarnation=view.incarnation),
        )
        await asyncio.gather(*a.engine.cluster.writer.deletes.values())
        assert not backend.records
        await expect_code(
            grpc.StatusCode.NOT_FOUND,
            step(b, "x", x, expected_steps=2, incarnation=view.incarnation),
        )


async def test_a_session_moving_when_the_lease_lapsed_is_checked_too(
    make_settings: Callable[..., Settings],
) -> None:
    backend = FaultyBackend()
    async with cluster(make_settings, backend, cluster_handover_timeout_s=0.3) as (a, b):
        member = a.engine.cluster
        assert member is not None
        info = await open_session(a, "x")
        await step(a, "x", np.ones((2, 3), np.float32))
        await member.write_changed()
        handle, _ = a.engine.registry.holding(MODEL, "x", "")  # type: ignore[misc]
        computing, go_on = hold_batches(handle.batcher.runner)
        in_flight = asyncio.ensure_future(step(a, "x", np.ones((1, 3), np.float32)))
        await computing.wait()  # a chunk of x in flight on a
        key = record_key(MODEL, "x", "")
        member._inbox(Message("release", key, "replica-9"))  # someone asks a for x
        releasing = member._releases[key]  # (it waits for x's chunk)
        # a's lease lapses; b takes x from the "dead" owner and the client goes on there
        backend.leases.pop("replica-0")
        member._valid_until_s = 0.0
        await step(
            b, "x", np.ones((1, 3), np.float32), expected_steps=2, incarnation=info.incarnation
        )
        # a's heartbeat finds its lease expired: registers again, checks every session held
        began = member.clock()
        await backend.register(member.replica, member.lease_s)
        await member.write_changed(every_session=True)
        member._trust_lease(began)
        assert a.engine.registry.holding(MODEL, "x", "") is None  # dropped, moving or not
        go_on.set()
        await in_flight
        await asyncio.wait([releasing])
        assert count(a.metrics.cluster_sessions_lost) == 1


class ListenFailsOnce(FaultyBackend):
    """A store whose first inbox of replica-0 ends with a dropped connection."""

    failed = False

    async def listen(self, replica: str, inbox: Any) -> None:
        if replica == "replica-0" and not self.failed:
            self.failed = True
            raise ConnectionError("the store closed the inbox's connection")
        await super().listen(replica, inbox)


async def test_an_inbox_that_ends_is_listened_to_again(
    make_settings: Callable[..., Settings],
) -> None:
    """Without its inbox a replica keeps its lease and sessions but hands none over: every
    request for them elsewhere would wait, then fail, until it restarts."""
    backend = ListenFailsOnce()
    async with cluster(make_settings, backend) as (a, b):
        await eventually(lambda: bool(backend.inboxes.get("replica-0")), "a listens again")
        assert count(a.metrics.cluster_store_errors.labels("listen")) == 1
        sid = (await open_session(a)).session_id
        await step(a, sid, np.ones((2, 3), np.float32))
        assert (await step(b, sid, np.ones((1, 3), np.float32))).steps == 3  # handed over
