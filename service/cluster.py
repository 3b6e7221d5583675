"""This replica as a member of a cluster: it serves any session of the cluster, exactly.

Sessions live in the cluster store (:mod:`service.cluster_backend`: Redis, or the embedded store
of ``serve --workers N``); a replica owns the sessions it serves, each under a fencing epoch, for
as long as its lease lasts. What happens (docs/SCALING.md):

- **A request for a session owned elsewhere** (:meth:`ClusterMember.claim`): the store says who
  owns it; this replica asks the owner to release it and waits (at most
  ``cluster_handover_timeout_s``). The owner stops taking chunks of it, lets the chunks it has
  in flight and waiting finish, writes the state with its step count and releases it; this
  replica takes it under a higher epoch and goes on: nothing to replay.
- **A dead owner** (its lease expired): the session is taken from its last write; it is
  restored *unconfirmed*, so its client states its step count and replays what came after
  (the durable-steps protocol of snapshots). Writes happen every ``cluster_write_interval_s``
  for the sessions that changed.
- **Fencing**: every write names the epoch it owns the session under; the store refuses a stale
  one (counted), and the session is dropped here. A replica that was paused past its lease
  (SIGSTOP, a long GC, a partition) applies no chunk until it has renewed its lease and
  re-checked each session it holds (:meth:`_heartbeat_forever`).
- **A drain** (:meth:`release_all`): every session written and released; clients reconnect
  and continue on another replica with nothing to replay.
- **One source of truth**: in a cluster, no local snapshots are kept or restored.

Concurrency: everything runs on the event loop thread, like the engine; sessions and stores are
touched only there (state is captured on the loop between batches, so each captured state
matches its step count; encoding runs in a thread). At most one claim per session key runs at a
time (later requests for the key wait for it), and at most one hand-over out per key; writes
are serialised by one lock so that a drain never races the periodic write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.cluster_backend import Claimed, ClusterBackend, Message, record_key
from service.cluster_writes import SessionWriter, session_snapshot
from service.errors import AlreadyExists, FailedPrecondition, ServiceError, Unavailable, shown
from service.metrics import Metrics
from service.models import ModelHandle, ModelRegistry
from service.session import EndReason, Session
from service.settings import Settings
from service.snapshots import CorruptSnapshot, decode, encode

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Ends after which the session is gone from the cluster too (a drain or a move keeps it).
_GONE = (EndReason.CLOSED, EndReason.IDLE_TIMEOUT, EndReason.EVICTED, EndReason.FAILED)
# The part of a lease this replica counts on: the store's expiry starts after our clock reads
# the start of the renewal, so this margin covers a chunk taken just before the end.
_LEASE_TRUST = 0.8


def default_replica_id() -> str:
    """host-pid-6 random hex digits: unique across restarts, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def make_backend(settings: Settings) -> ClusterBackend:
    """The cluster store the settings name: Redis, or the embedded store of ``--workers``."""
    if settings.cluster_redis_url:
        from service.cluster_redis import RedisBackend

        return RedisBackend(settings.cluster_redis_url, settings.cluster_redis_prefix)
    from service.cluster_embedded import SocketBackend

    assert settings.cluster_embedded_socket is not None
    return SocketBackend(settings.cluster_embedded_socket)


@dataclass(frozen=True)
class Reservation:
    """A new session's id, taken in the cluster store for this replica (its first epoch) before
    the session is created here, with the incarnation it was registered with. ``new`` False: the
    record of the id's older copy here (another version), passed to the new one."""

    epoch: int
    incarnation: int
    new: bool = True


class ClusterMember:
    """This replica's lease, the sessions it brings here and hands over, and its writes
    (:class:`service.cluster_writes.SessionWriter`)."""

    def __init__(
        self,
        backend: ClusterBackend,
        settings: Settings,
        metrics: Metrics,
        registry: ModelRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Built on the serving loop (engine.start)."""
        self.backend = backend
        self.metrics = metrics
        self.registry = registry
        self.clock = clock
        self.replica = settings.cluster_replica_id or default_replica_id()
        self.lease_s = settings.cluster_lease_s
        self.write_interval_s = settings.cluster_write_interval_s
        self.handover_timeout_s = settings.cluster_handover_timeout_s
        ttl = settings.session_ttl_s
        # A record outlives its session's idle timeout on its owner (which deletes it) by the
        # writes' delay and a lease: the store forgets only sessions nobody serves.
        record_ttl_s = ttl + 2 * self.write_interval_s + self.lease_s if ttl > 0 else 0.0
        self.record_ttl_s = record_ttl_s
        self.writer = SessionWriter(backend, metrics, registry, self.replica, record_ttl_s,
                                    self._failed)  # fmt: skip
        self._valid_until_s = 0.0
        self._claims: dict[str, asyncio.Future[None]] = {}  # keys being brought here (or made)
        self._asked: dict[str, asyncio.Future[None]] = {}  # "release" sent, awaiting "released"
        self._releases: dict[str, asyncio.Task[None]] = {}  # hand-overs out under way
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._failing: set[str] = set()  # operations failing now (logged once each)

    # ----- lifetime --------------------------------------------------------------------------
    async def start(self) -> None:
        """Join: take the lease, then renew it, write changed sessions and answer hand-over
        requests in the background."""
        began = self.clock()
        await self.backend.register(self.replica, self.lease_s)
        self._trust_lease(began)
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever(), name="cluster-lease"),
            asyncio.create_task(self._write_forever(), name="cluster-writes"),
            asyncio.create_task(self._listen_forever(), name="cluster-inbox"),
        ]
        logger.info("joined the cluster at %s as %s", self.backend.describe(), self.replica)

    async def stop(self) -> None:
        """Leave: pending deletes finish (bounded), background work stops, the lease ends, the
        store's connection closes."""
        await self.writer.stop(self.handover_timeout_s)
        work = [*self._tasks, *self._releases.values(), *self._background]
        for task in work:
            task.cancel()
        for task in work:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.backend.leave(self.replica)
        await self.backend.close()

    def lease_valid(self) -> bool:
        """Whether this replica may apply chunks: its lease is known to hold."""
        return self.clock() < self._valid_until_s

    def _trust_lease(self, began_s: float) -> None:
        self._valid_until_s = began_s + _LEASE_TRUST * self.lease_s
        self.metrics.cluster_lease_valid.set(1)

    async def _heartbeat_forever(self) -> None:
        """Renew the lease every third of it. A renewal that finds it expired (this process was
        paused or cut off for longer than a lease) takes it again, then writes or checks every
        session held here: those another replica took meanwhile are refused and dropped. Until
        then, no chunk is applied (:meth:`lease_valid` is false). Never stops on an error."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            began = self.clock()
            try:
                if await self.backend.renew(self.replica, self.lease_s):
                    self._trust_lease(began)
                else:
                    self._valid_until_s = 0.0
                    self.metrics.cluster_lease_valid.set(0)
                    logger.warning(
                        "the cluster lease of %s had expired (paused or cut off for longer than "
                        "cluster_lease_s): checking every session held here", self.replica,
                    )  # fmt: skip
                    await self.backend.register(self.replica, self.lease_s)
                    await self.writer.write_changed(every_session=True)
                    self._trust_lease(began)
                self._recovered("lease")
            except Exception as error:
                self._failed("lease", error)

    async def _listen_forever(self) -> None:
        """Answer hand-over requests for as long as this replica is a member: a listener that
        ends (its connection dropped and the backend gave up, an error of the store) is logged
        and started again, with a backoff. Without it, this replica would keep its lease and
        its sessions but never hand one over."""
        wait_s = 0.05
        while True:
            try:
                await self.backend.listen(self.replica, self._inbox)
                error: Exception = ConnectionError("the inbox ended")
            except Exception as failure:
                error = failure
            self._failed("listen", error)
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, 2.0)

    async def _write_forever(self) -> None:
        while True:
            await asyncio.sleep(self.write_interval_s)
            try:
                await self.writer.write_changed()
                self._recovered("write")
            except Exception as error:
                self._failed("write", error)

    async def write_changed(self, every_session: bool = False) -> int:
        """Write the sessions that changed now (see :meth:`SessionWriter.write_changed`)."""
        return await self.writer.write_changed(every_session)

    def _failed(self, operation: str, error: Exception) -> None:
        self.metrics.cluster_store_errors.labels(operation).inc()
        if operation not in self._failing:
            self._failing.add(operation)
            logger.error("cluster store %s failing: %s: %s (retrying)", operation,
                         type(error).__name__, error)  # fmt: skip

    def _recovered(self, operation: str) -> None:
        if operation in self._failing:
            self._failing.discard(operation)
            logger.warning("cluster store %s works again", operation)

    async def _store(self, operation: str, call: Awaitable[T]) -> T:
        """Await a store call a request waits on: UNAVAILABLE (retry) if the store fails."""
        try:
            result = await call
        except Exception as error:
            self._failed(operation, error)
            raise Unavailable(
                f"the cluster store is unavailable ({type(error).__name__}: {error}); retry"
            ) from None
        self._recovered(operation)
        return result

    # ----- sessions ending here ----------------------------------------------------------------
    def session_ended(self, model: str, session: Session, reason: EndReason) -> None:
        """A session held here ended: closed, expired, evicted or failed, it is gone from the
        cluster too (its record deleted; a close waits for that, :meth:`settled`). Moved or
        shut down, it lives on in the store."""
        if reason in _GONE and session.epoch:
            key = record_key(model, session.session_id, session.owner)
            self.writer.delete_later(key, session.epoch)

    def forget(self, model: str, session_id: str, owner: str, epoch: int) -> None:
        """A session reserved here could not be made after all: its record goes."""
        self.writer.delete_later(record_key(model, session_id, owner), epoch)

    async def settled(self, model: str, session_id: str, owner: str) -> None:
        """Wait until the store has forgotten a session that ended here (a close returns only
        then, so that the id can be opened again at once, anywhere); UNAVAILABLE if the store
        does not answer within the hand-over timeout."""
        await self.writer.settled(record_key(model, session_id, owner), self.handover_timeout_s)

    # ----- new sessions ----------------------------------------------------------------------
    async def reserve(
        self,
        handle: ModelHandle,
        session_id: str,
        owner: str,
        client: str,
        incarnation: int,
        initial_state: Sequence[np.ndarray] | None = None,
    ) -> Reservation:
        """Register a new session in the store, owned here (ALREADY_EXISTS if the cluster has
        the id: the store decides, so two replicas can never open one id twice). The caller
        creates the session here right after, before any other request for the id can look
        (claims of the id wait for the reservation)."""
        key = record_key(handle.spec.name, session_id, owner)
        await self.settled(handle.spec.name, session_id, owner)
        specs = handle.store.state_specs
        values = initial_state or [s.initial_value() for s in specs]
        states = [
            s.stored(np.asarray(v, np.float32))[:, None, :]
            for s, v in zip(specs, values, strict=True)
        ]
        draft = Session(session_id, -1, incarnation, 0.0, owner=owner, client=client or owner)
        blob = encode(session_snapshot(handle, draft, states, confirmed=True))
        async with self._claiming(key):
            epoch = await self._store(
                "create", self.backend.create(key, self.replica, blob, self.record_ttl_s)
            )
        if epoch is None:
            raise AlreadyExists(
                f"session {shown(session_id)} already exists in the cluster; close it first, or "
                "choose another id"
            )
        return Reservation(epoch, incarnation)

    async def _wait_for_claims(self, key: str) -> None:
        while key in self._claims:
            await asyncio.shield(self._claims[key])

    @contextlib.asynccontextmanager
    async def _claiming(self, key: str) -> AsyncIterator[None]:
        """Hold ``key`` for one claim or reservation, once no other holds it: others of the key
        wait until it is done. (Released synchronously: the waiters run only after the caller's
        next await, so a session made here right after is there when they look.)"""
        await self._wait_for_claims(key)
        claiming: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._claims[key] = claiming
        try:
            yield
        finally:
            del self._claims[key]
            claiming.set_result(None)

    # ----- sessions coming here ----------------------------------------------------------------
    async def claim(self, model: str, session_id: str, owner: str) -> Session | None:
        """Make this replica the owner of ``owner``'s session ``session_id`` of ``model``: from
        its live owner (a hand-over), from the store (released, or its owner dead), or nothing
        to do (held here). None if the cluster has no such session. UNAVAILABLE if its owner
        did not hand it over in time, or the store cannot be reached."""
        key = record_key(model, session_id, owner)
        began = self.clock()
        while True:
            if self._releasing(key):  # leaving this replica: let it go, then ask for it back
                await asyncio.wait([self._releases[key]])
            async with self._claiming(key):  # (after any other claim or reservation of it)
                if self._releasing(key):
                    continue  # a hand-over out began meanwhile
                found = self._local(key)
                if found is not None:
                    found[1].moving = False  # (nothing hands it over: it stays)
                    return found[1]
                try:
                    return await self._take(key, session_id, began)
                finally:
                    self._asked.pop(key, None)

    def _releasing(self, key: str) -> bool:
        """Whether a hand-over of ``key`` to another replica is under way here."""
        task = self._releases.get(key)
        return task is not None and not task.done()

    def _local(self, key: str) -> tuple[ModelHandle, Session] | None:
        """The session of ``key`` held here (any version of its model), or None."""
        model, session_id, owner = _parts(key)
        found = self.registry.holding(model, session_id, owner, closing=True)
        if found is None or found[1].ended is not None:
            return None
        return found

    async def _take(self, key: str, session_id: str, began: float) -> Session | None:
        await self.settled(*_parts(key))
        deadline = began + self.handover_timeout_s
        asked = False
        while True:
            result = await self._store(
                "acquire", self.backend.acquire(key, self.replica, self.record_ttl_s)
            )
            if result is None:
                return None
            if isinstance(result, Claimed):
                session = await self._install(key, result)
                how = "restored" if not result.released else "handover" if asked else "released"
                self.metrics.cluster_moves.labels(how).inc()
                self.metrics.cluster_move_duration.observe(self.clock() - began)
                return session
            left = deadline - self.clock()
            if left <= 0:
                raise Unavailable(
                    f"session {shown(session_id)} is held by replica {shown(result.replica)}, "
                    f"which did not hand it over within {self.handover_timeout_s:g} s; retry"
                )
            waiter = self._asked.get(key)
            if waiter is None or waiter.done():
                waiter = self._asked[key] = asyncio.get_running_loop().create_future()
            await self._store(
                "send", self.backend.send(result.replica, Message("release", key, self.replica))
            )
            asked = True
            # Woken by its "released"; else try again (a message may be lost, and a dead
            # owner's lease runs out by itself).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), min(left, self.lease_s / 2))

    async def _install(self, key: str, claimed: Claimed) -> Session:
        """The session of a claimed record, made live here under its new epoch (given back if
        it cannot be)."""
        try:
            snapshot = decode(claimed.blob)
        except CorruptSnapshot as error:
            await self.writer.give_back(key, claimed)
            raise FailedPrecondition(
                f"the cluster store's record of this session is corrupt ({error})"
            ) from None
        handle = self.registry.find(snapshot.model, snapshot.version)
        if handle is None or handle.spec.sha256 != snapshot.model_sha256:
            await self.writer.give_back(key, claimed)
            raise FailedPrecondition(
                f"this session lives on model {shown(snapshot.model)} version "
                f"{shown(snapshot.version)} (sha256 {snapshot.model_sha256[:12]}), which this "
                "replica does not serve: every member of a cluster must serve the same repository"
            )
        record = snapshot.sessions[0]
        state = [s[:, 0, :] for s in snapshot.states]
        try:
            session = handle.store.restore(
                record, state, confirmed=claimed.released and record.confirmed
            )
        except ServiceError:
            await self.writer.give_back(key, claimed)
            raise
        session.epoch = claimed.epoch
        session.written_incarnation = session.incarnation
        self.metrics.active_sessions.labels(handle.spec.name, handle.spec.version).inc()
        return session

    # ----- sessions leaving --------------------------------------------------------------------
    def _inbox(self, message: Message) -> None:
        """A message from another replica (never blocks: a release runs as its own task)."""
        if message.kind == "release":
            key = message.key
            if key not in self._releases:
                task = asyncio.ensure_future(self._hand_over(key))
                self._releases[key] = task
                task.add_done_callback(lambda _: self._releases.pop(key, None))
            self._spawn(self._answer_when_released(message))
        elif message.kind == "released":
            waiter = self._asked.get(message.key)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _answer_when_released(self, message: Message) -> None:
        task = self._releases.get(message.key)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        with contextlib.suppress(Exception):
            await self.backend.send(message.sender, Message("released", message.key, self.replica))

    async def _hand_over(self, key: str) -> None:
        """Another replica asks for ``key``: take no new chunks of it, let those in flight and
        waiting finish, write it and release it, then end it here (MOVED). A key ending here
        is deleted first; one the store says is ours without a copy here is disowned."""
        try:
            try:
                await self.writer.settled(key, self.handover_timeout_s)
            except Unavailable:
                return  # ended here, its delete not through yet: the asker retries
            await self._wait_for_claims(key)
            found = self._local(key)
            if found is None:
                if key not in self.writer.deletes:
                    await self.writer.disown(key)
                return
            handle, session = found
            if session.close_when_idle is not None or not session.epoch:
                return  # closing: its delete follows
            session.moving = True
            try:
                if session.busy and not await self._idle(session):
                    return
                if session.ended is None and session.close_when_idle is None:
                    await self.writer.release([(handle, [session])], why="asked")
            finally:
                if session.ended is None:
                    session.moving = False  # (not handed over: it stays)
        except Exception as error:
            self._failed("release", error)

    async def _idle(self, session: Session) -> bool:
        """Wait until ``session``'s chunks in flight and waiting are done (False: not within
        the hand-over timeout)."""
        idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.on_idle = lambda: None if idle.done() else idle.set_result(None)
        try:
            await asyncio.wait_for(asyncio.shield(idle), self.handover_timeout_s)
            return True
        except TimeoutError:
            session.on_idle = None
            logger.warning(
                "session %s: its chunks did not finish in time for a hand-over",
                shown(session.session_id),
            )
            return False

    async def release_all(self) -> int:
        """The drain: write and release every session held here (their chunks have drained),
        those a hand-over waits for included. Returns how many were handed over."""
        self._tasks[1].cancel()  # the periodic writes: this write is the last
        return await self.writer.release(self.writer.held(moving=True), why="drain")


def _parts(key: str) -> tuple[str, str, str]:
    """(model, session id, owner) of a record key."""
    model, _, scoped = key.partition("\0")
    owner, _, session_id = scoped.rpartition("\0")
    return model, session_id, owner
