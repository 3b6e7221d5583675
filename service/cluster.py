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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.cluster_backend import Claimed, ClusterBackend, Message, Write, record_key
from service.durability import session_record
from service.errors import AlreadyExists, FailedPrecondition, ServiceError, Unavailable, shown
from service.metrics import Metrics
from service.models import ModelHandle, ModelRegistry
from service.session import EndReason, Session
from service.settings import Settings
from service.snapshots import CorruptSnapshot, ModelSnapshot, decode, encode

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
    the session is created here, with the incarnation it was registered with."""

    epoch: int
    incarnation: int


def session_snapshot(
    handle: ModelHandle, session: Session, states: Sequence[np.ndarray], confirmed: bool
) -> ModelSnapshot:
    """``session`` as the store keeps it: a snapshot of one session (``states``: its stored
    arrays, [pre, 1, post] each, copies). ``confirmed``: no step of it can come after this
    state. Captured on the loop; :func:`encode` it anywhere."""
    spec = handle.spec
    record = session_record(session, confirmed)
    return ModelSnapshot(spec.name, spec.version, spec.sha256, time.time(), [record], list(states))


async def encoded(snapshots: list[ModelSnapshot]) -> list[bytes]:
    """The snapshots' blobs, encoded (and checksummed) in a worker thread: a write of thousands
    of sessions keeps the loop free."""
    return await asyncio.to_thread(lambda: [encode(s) for s in snapshots])


class ClusterMember:
    """This replica's lease, the hand-overs in and out, and the writes of its sessions."""

    def __init__(
        self,
        backend: ClusterBackend,
        settings: Settings,
        metrics: Metrics,
        registry: ModelRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        self.record_ttl_s = ttl + 2 * self.write_interval_s + self.lease_s if ttl > 0 else 0.0
        self._valid_until_s = 0.0
        self._claims: dict[str, asyncio.Future[None]] = {}
        self._asked: dict[str, asyncio.Future[None]] = {}  # "release" sent, awaiting "released"
        self._releases: dict[str, asyncio.Task[None]] = {}  # hand-overs out under way
        self._deletes: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._writing: asyncio.Lock | None = None  # made on the loop, in start()
        self._failing: set[str] = set()  # operations failing now (logged once each)

    # ----- lifetime --------------------------------------------------------------------------
    async def start(self) -> None:
        """Join: take the lease, then renew it, write changed sessions and answer hand-over
        requests in the background."""
        self._writing = asyncio.Lock()
        began = self.clock()
        await self.backend.register(self.replica, self.lease_s)
        self._trust_lease(began)
        self._tasks = [
            asyncio.create_task(self._heartbeat_forever(), name="cluster-lease"),
            asyncio.create_task(self._write_forever(), name="cluster-writes"),
            asyncio.create_task(
                self.backend.listen(self.replica, self._inbox), name="cluster-inbox"
            ),
        ]
        logger.info("joined the cluster at %s as %s", self.backend.describe(), self.replica)

    async def stop(self) -> None:
        """Leave: end the lease, stop the background tasks, close the store's connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(ConnectionError):
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
        then, no chunk is applied (:meth:`lease_valid` is false)."""
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
                    await self.write_changed(every_session=True)
                    self._trust_lease(began)
                self._recovered("lease")
            except ConnectionError as error:
                self._failed("lease", error)

    async def _write_forever(self) -> None:
        while True:
            await asyncio.sleep(self.write_interval_s)
            try:
                await self.write_changed()
                self._recovered("write")
            except ConnectionError as error:
                self._failed("write", error)

    def _failed(self, operation: str, error: Exception) -> None:
        self.metrics.cluster_store_errors.labels(operation).inc()
        if operation not in self._failing:
            self._failing.add(operation)
            logger.error("cluster store %s failing: %s (retrying)", operation, error)

    def _recovered(self, operation: str) -> None:
        if operation in self._failing:
            self._failing.discard(operation)
            logger.warning("cluster store %s works again", operation)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----- sessions here ---------------------------------------------------------------------
    def key(self, model: str, session: Session) -> str:
        return record_key(model, session.session_id, session.owner)

    def _local(self, key: str) -> tuple[ModelHandle, Session] | None:
        """The session of ``key`` held here (any version of its model), or None."""
        model, _, scoped = key.partition("\0")
        owner, _, session_id = scoped.rpartition("\0")
        found = self.registry.holding(model, session_id, owner, closing=True)
        if found is None or found[1].ended is not None:
            return None
        return found

    def _held(self) -> list[tuple[ModelHandle, list[Session]]]:
        """Every session held here, by model version: live, not closing, not moving."""
        held = []
        for handle in self.registry.every_handle():
            sessions = [
                s
                for s in handle.store.sessions.values()
                if s.epoch and not s.moving and s.close_when_idle is None
            ]
            if sessions:
                held.append((handle, sessions))
        return held

    def session_ended(self, model: str, session: Session, reason: EndReason) -> None:
        """A session held here ended: closed, expired, evicted or failed, it is gone from the
        cluster too (its record deleted; a close waits for that, :meth:`settled`). Moved or
        shut down, it lives on in the store."""
        if reason not in _GONE or not session.epoch:
            return
        key = self.key(model, session)
        task = asyncio.ensure_future(self._delete(key, session.epoch))
        self._deletes[key] = task
        task.add_done_callback(
            lambda _: self._deletes.pop(key, None) if self._deletes.get(key) is task else None
        )

    def forget(self, model: str, session_id: str, owner: str, epoch: int) -> None:
        """A session reserved here could not be made after all: its record goes."""
        key = record_key(model, session_id, owner)
        task = asyncio.ensure_future(self._delete(key, epoch))
        self._deletes[key] = task
        task.add_done_callback(
            lambda _: self._deletes.pop(key, None) if self._deletes.get(key) is task else None
        )

    async def _delete(self, key: str, epoch: int) -> None:
        try:
            await self.backend.delete(key, self.replica, epoch)
            self._recovered("delete")
        except ConnectionError as error:  # the record expires by itself (its ttl)
            self._failed("delete", error)

    async def settled(self, model: str, session_id: str, owner: str) -> None:
        """Wait until the store has forgotten a session that ended here (a close returns only
        then, so that the id can be opened again at once, anywhere)."""
        task = self._deletes.get(record_key(model, session_id, owner))
        if task is not None:
            await asyncio.shield(task)

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
        the id: the store decides, so two replicas can never open one id twice)."""
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
        epoch = await self._store(
            "create", self.backend.create(key, self.replica, blob, self.record_ttl_s)
        )
        if epoch is None:
            raise AlreadyExists(
                f"session {shown(session_id)} already exists in the cluster; close it first, or "
                "choose another id"
            )
        return Reservation(epoch, incarnation)

    async def _store(self, operation: str, call: Awaitable[T]) -> T:
        """Await a store call a request waits on: UNAVAILABLE (retry) if the store fails."""
        try:
            result = await call
        except ConnectionError as error:
            self._failed(operation, error)
            raise Unavailable(f"the cluster store is unavailable ({error}); retry") from None
        self._recovered(operation)
        return result

    # ----- sessions coming here ----------------------------------------------------------------
    async def claim(self, model: str, session_id: str, owner: str) -> Session | None:
        """Make this replica the owner of ``owner``'s session ``session_id`` of ``model``: from
        its live owner (a hand-over), from the store (released, or its owner dead), or nothing
        to do (held here). None if the cluster has no such session. UNAVAILABLE if its owner
        did not hand it over in time, or the store cannot be reached."""
        key = record_key(model, session_id, owner)
        while True:
            if key in self._releases:  # leaving this replica: let it go, then ask for it back
                await asyncio.shield(self._releases[key])
            if key in self._claims:  # another request already brings it: wait for that one
                await asyncio.shield(self._claims[key])
                continue
            found = self._local(key)
            if found is not None and not found[1].moving:
                return found[1]
            if found is None:
                break
        claiming: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._claims[key] = claiming
        began = self.clock()
        try:
            return await self._take(key, session_id, began)
        finally:
            del self._claims[key]
            claiming.set_result(None)

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
        """The session of a claimed record, made live here under its new epoch."""
        try:
            snapshot = decode(claimed.blob)
        except CorruptSnapshot as error:
            await self._give_back(key, claimed.epoch)
            raise FailedPrecondition(
                f"the cluster store's record of this session is corrupt ({error})"
            ) from None
        handle = self.registry.find(snapshot.model, snapshot.version)
        if handle is None or handle.spec.sha256 != snapshot.model_sha256:
            await self._give_back(key, claimed.epoch)
            raise FailedPrecondition(
                f"this session lives on model {shown(snapshot.model)} version "
                f"{shown(snapshot.version)} (sha256 {snapshot.model_sha256[:12]}), which this "
                "replica does not serve: every member of a cluster must serve the same repository"
            )
        record = snapshot.sessions[0]
        state = [s[:, 0, :] for s in snapshot.states]
        confirmed = claimed.released and record.confirmed
        try:
            session = handle.store.restore(record, state, confirmed=confirmed)
        except ServiceError:
            await self._give_back(key, claimed.epoch)
            raise
        session.epoch = claimed.epoch
        session.written_incarnation = session.incarnation
        self.metrics.active_sessions.labels(handle.spec.name, handle.spec.version).inc()
        return session

    async def _give_back(self, key: str, epoch: int) -> None:
        """Release a record taken but not served here, unchanged."""
        with contextlib.suppress(ConnectionError):
            await self.backend.write([Write(key, self.replica, epoch, None, release=True)], 0)

    # ----- sessions leaving --------------------------------------------------------------------
    def _inbox(self, message: Message) -> None:
        """A message from another replica (never blocks: a release runs as its own task)."""
        if message.kind == "release":
            if message.key not in self._releases:
                task = asyncio.ensure_future(self._hand_over(message.key))
                self._releases[message.key] = task
                task.add_done_callback(lambda _: self._releases.pop(message.key, None))
            self._spawn(self._answer_when_released(message))
        elif message.kind == "released":
            waiter = self._asked.get(message.key)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _answer_when_released(self, message: Message) -> None:
        task = self._releases.get(message.key)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        with contextlib.suppress(ConnectionError):
            await self.backend.send(message.sender, Message("released", message.key, self.replica))

    async def _hand_over(self, key: str) -> None:
        """Another replica asks for ``key``: take no new chunks of it, let those in flight and
        waiting finish, write it and release it, then end it here (MOVED)."""
        if key in self._deletes:
            await asyncio.shield(self._deletes[key])
        found = self._local(key)
        if found is None or found[1].close_when_idle is not None or not found[1].epoch:
            return
        handle, session = found
        session.moving = True
        if session.busy:
            idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            session.on_idle = lambda: None if idle.done() else idle.set_result(None)
            try:
                await asyncio.wait_for(asyncio.shield(idle), self.handover_timeout_s)
            except TimeoutError:
                session.moving = False
                session.on_idle = None
                logger.warning(
                    "session %s: its chunks did not finish in time for a hand-over",
                    shown(session.session_id),
                )
                return
            if session.ended is not None or session.close_when_idle is not None:
                return  # ended meanwhile (an END, a close): gone, not moved
        assert self._writing is not None
        try:
            async with self._writing:
                await self._write_and_release([(handle, [session])], why="asked")
        except ConnectionError as error:  # kept here: the one asking tries again, or times out
            session.moving = False
            self._failed("release", error)

    async def _write_and_release(
        self, held: list[tuple[ModelHandle, list[Session]]], why: str
    ) -> int:
        """Write ``held`` sessions (idle: nothing in flight) and release them in the store, then
        end them here (MOVED; SHUTDOWN at a drain). Returns how many were released."""
        snapshots, sessions = [], []
        for handle, group in held:
            states = handle.store.read_states(group)
            for i, session in enumerate(group):
                mine = [s[:, i : i + 1, :] for s in states]
                # Confirmed unless a chunk may still apply after it (one that outlived the
                # drain), or its client has not yet confirmed where it stands.
                confirmed = not session.unconfirmed and not session.busy
                snapshots.append(session_snapshot(handle, session, mine, confirmed))
                sessions.append((handle, session))
        if not snapshots:
            return 0
        writes = [
            Write(self.key(h.spec.name, s), self.replica, s.epoch, blob, release=True)
            for (h, s), blob in zip(sessions, await encoded(snapshots), strict=True)
        ]
        landed = await self.backend.write(writes, self.record_ttl_s)
        released = 0
        reason = EndReason.SHUTDOWN if why == "drain" else EndReason.MOVED
        for ok, (handle, session) in zip(landed, sessions, strict=True):
            if ok:
                released += 1
                self.metrics.cluster_handed_over.labels(why).inc()
            else:
                self.metrics.cluster_fenced_writes.inc()
                self.metrics.cluster_sessions_lost.inc()
            if session.ended is None:
                handle.store.end(session, reason)
        return released

    async def release_all(self) -> int:
        """The drain: write and release every session held here (their chunks have drained).
        Returns how many were handed over; the engine then ends them here."""
        for task in self._tasks[1:2]:  # the periodic writes: this write is the last
            task.cancel()
        assert self._writing is not None
        async with self._writing:
            try:
                return await self._write_and_release(self._held(), why="drain")
            except ConnectionError as error:
                self._failed("drain", error)
                logger.error(
                    "the drain could not hand sessions over: %s; their clients replay from the last write",
                    error,
                )
                return 0

    # ----- writes ------------------------------------------------------------------------------
    async def write_changed(self, every_session: bool = False) -> int:
        """Write every session held here that changed since its last write (``every_session``:
        and check that the others are still this replica's). A write the store refuses means
        another replica took the session: it is dropped here (counted). Returns how many
        writes landed."""
        assert self._writing is not None
        async with self._writing:
            # (handle, session, epoch, incarnation, steps) as captured; changed ones first
            captured: list[tuple[ModelHandle, Session, int, int, int]] = []
            checked: list[tuple[ModelHandle, Session, int, int, int]] = []
            snapshots: list[ModelSnapshot] = []
            for handle, group in self._held():
                changed = [
                    s
                    for s in group
                    if s.steps != s.durable_steps or s.incarnation != s.written_incarnation
                ]
                states = handle.store.read_states(changed) if changed else []
                for i, session in enumerate(changed):
                    mine = [s[:, i : i + 1, :] for s in states]
                    snapshots.append(session_snapshot(handle, session, mine, confirmed=False))
                    captured.append(
                        (handle, session, session.epoch, session.incarnation, session.steps)
                    )
                if every_session:
                    checked.extend(
                        (handle, s, s.epoch, s.incarnation, s.steps)
                        for s in group
                        if s not in changed
                    )
            if not captured and not checked:
                return 0
            blobs: list[bytes | None] = [*await encoded(snapshots), *(None for _ in checked)]
            captured += checked
            writes = [
                Write(self.key(h.spec.name, s), self.replica, epoch, blob)
                for (h, s, epoch, _, _), blob in zip(captured, blobs, strict=True)
            ]
            landed = await self.backend.write(writes, self.record_ttl_s)
            for ok, write, (handle, session, epoch, incarnation, steps) in zip(
                landed, writes, captured, strict=True
            ):
                if ok:
                    if session.incarnation == incarnation:  # (not restarted since: a START)
                        session.durable_steps = steps
                        session.written_incarnation = incarnation
                    continue
                if session.epoch != epoch or session.ended is not None:
                    continue  # ended here meanwhile (closed: its record deleted)
                if write.blob is not None:
                    self.metrics.cluster_fenced_writes.inc()
                self.metrics.cluster_sessions_lost.inc()
                logger.warning(
                    "session %s is owned by another replica now: dropped here",
                    shown(session.session_id),
                )
                handle.store.end(session, EndReason.MOVED)
            return sum(landed)


def _parts(key: str) -> tuple[str, str, str]:
    """(model, session id, owner) of a record key."""
    model, _, scoped = key.partition("\0")
    owner, _, session_id = scoped.rpartition("\0")
    return model, session_id, owner
