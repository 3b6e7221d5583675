"""What a cluster member writes to the store: its sessions' states (fenced by epoch), their
releases, and the deletes of sessions that ended. Used by :mod:`service.cluster`.

Concurrency: on the event loop, like the session stores. A session's state is captured on the loop
between batches (so it matches its step count) and encoded in a worker thread; one lock orders
every write of state (periodic, hand-over, drain), so no two race for one session. Deletes retry
until the store answers, and anything that would bring the session back waits for its delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from service.cluster_backend import Claimed, ClusterBackend, Write, record_key
from service.durability import session_record
from service.errors import Unavailable, shown
from service.metrics import Metrics
from service.models import ModelHandle, ModelRegistry
from service.session import EndReason, Session
from service.snapshots import CorruptSnapshot, ModelSnapshot, decode, encode

logger = logging.getLogger("service.cluster")

_RETRY_FIRST_S, _RETRY_MOST_S = 0.05, 1.0  # a delete's retries back off between these


def session_snapshot(
    handle: ModelHandle, session: Session, states: Sequence[np.ndarray], confirmed: bool
) -> ModelSnapshot:
    """``session`` as the store keeps it: a snapshot of one session (``states``: its stored
    arrays, [pre, 1, post] each, copies). ``confirmed``: no step of it can come after this
    state. Captured on the loop; :func:`encode` it anywhere."""
    spec = handle.spec
    record = session_record(session, confirmed)
    return ModelSnapshot(spec.name, spec.version, spec.sha256, time.time(), [record], list(states))


def captured(
    handle: ModelHandle, sessions: list[Session], confirmed: Callable[[Session], bool]
) -> list[ModelSnapshot]:
    """``sessions`` of ``handle`` as they are now, one snapshot each (their states read in one
    gather); ``confirmed(session)``: whether no step of it can follow."""
    if not sessions:
        return []
    states = handle.store.read_states(sessions)
    return [
        session_snapshot(handle, s, [a[:, i : i + 1, :] for a in states], confirmed(s))
        for i, s in enumerate(sessions)
    ]


def unconfirmed_blob(blob: bytes) -> bytes:
    """``blob`` with its session marked unconfirmed (steps may have followed it)."""
    snapshot = decode(blob)
    sessions = [dataclasses.replace(r, confirmed=False) for r in snapshot.sessions]
    return encode(dataclasses.replace(snapshot, sessions=sessions))


async def encoded(snapshots: list[ModelSnapshot]) -> list[bytes]:
    """The snapshots' blobs, encoded (and checksummed) in a worker thread: a write of thousands
    of sessions keeps the loop free."""
    return await asyncio.to_thread(lambda: [encode(s) for s in snapshots])


class SessionWriter:
    """Writes of one member (``replica``) to its cluster store."""

    def __init__(
        self,
        backend: ClusterBackend,
        metrics: Metrics,
        registry: ModelRegistry,
        replica: str,
        record_ttl_s: float,
        on_failure: Callable[[str, Exception], None],
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.registry = registry
        self.replica = replica
        self.record_ttl_s = record_ttl_s
        self.on_failure = on_failure
        self.lock = asyncio.Lock()  # made on the loop: the member is built in engine.start()
        self.deletes: dict[str, asyncio.Task[None]] = {}

    def held(self, *, moving: bool = False) -> list[tuple[ModelHandle, list[Session]]]:
        """Every session held here, by model version: live, not closing; ``moving`` ones (a
        hand-over waits for them) only if asked."""
        held = []
        for handle in self.registry.every_handle():
            sessions = [
                s
                for s in handle.store.sessions.values()
                if s.epoch and (moving or not s.moving) and s.close_when_idle is None
            ]
            if sessions:
                held.append((handle, sessions))
        return held

    # ----- state -----------------------------------------------------------------------------
    async def write_changed(self, every_session: bool = False) -> int:
        """Write every session held here that changed since its last write (``every_session``:
        and check that the others are still this replica's). A write the store refuses means
        another replica took the session: it is dropped here (counted). Returns how many
        writes landed."""
        async with self.lock:
            changed_rows: list[tuple[ModelHandle, Session, int, int, int]] = []
            checked_rows: list[tuple[ModelHandle, Session, int, int, int]] = []
            snapshots: list[ModelSnapshot] = []
            for handle, group in self.held(moving=every_session):
                changed = [
                    s
                    for s in group
                    if s.steps != s.durable_steps or s.incarnation != s.written_incarnation
                ]
                snapshots += captured(handle, changed, lambda s: False)
                changed_rows += [(handle, s, s.epoch, s.incarnation, s.steps) for s in changed]
                if every_session:
                    checked_rows.extend(
                        (handle, s, s.epoch, s.incarnation, s.steps)
                        for s in group
                        if s not in changed
                    )
            if not changed_rows and not checked_rows:
                return 0
            blobs: list[bytes | None] = [*await encoded(snapshots), *(None for _ in checked_rows)]
            rows = changed_rows + checked_rows
            writes = [
                Write(record_key(h.spec.name, s.session_id, s.owner), self.replica, epoch, blob)
                for (h, s, epoch, _, _), blob in zip(rows, blobs, strict=True)
            ]
            landed = await self.backend.write(writes, self.record_ttl_s)
            for ok, write, (handle, session, epoch, incarnation, steps) in zip(
                landed, writes, rows, strict=True
            ):
                if ok:
                    if session.incarnation == incarnation:  # (not restarted since: a START)
                        session.durable_steps = steps
                        session.written_incarnation = incarnation
                elif session.epoch == epoch and session.ended is None:
                    if write.blob is not None:
                        self.metrics.cluster_fenced_writes.inc()
                    self._lost(handle, session)
                # (else it ended here meanwhile: closed, its record deleted)
            return sum(landed)

    def _lost(self, handle: ModelHandle, session: Session) -> None:
        self.metrics.cluster_sessions_lost.inc()
        logger.warning(
            "session %s is owned by another replica now: dropped here", shown(session.session_id)
        )
        handle.store.end(session, EndReason.MOVED)

    async def release(self, held: list[tuple[ModelHandle, list[Session]]], why: str) -> int:
        """Write ``held`` sessions (nothing in flight) and release them in the store, then end
        them here (MOVED; SHUTDOWN at a drain). Returns how many releases landed.

        Ended here whatever the store answers: a refused release (fenced) means another replica
        owns the session; a release whose answer was lost may have landed. Either way this copy
        may be stale, so it must not serve again. If the release did not land, this replica
        still owns the record (its last periodic write): the next request for the session takes
        it from there, unconfirmed (:meth:`disown`), and its client replays."""
        async with self.lock:
            rows: list[tuple[ModelHandle, Session]] = []
            snapshots: list[ModelSnapshot] = []
            for handle, group in held:
                alive = [s for s in group if s.ended is None]
                rows += [(handle, s) for s in alive]
                # Confirmed unless a chunk may still apply after it (one that outlived the
                # drain), or its client has not yet confirmed where it stands.
                snapshots += captured(handle, alive, lambda s: not s.unconfirmed and not s.busy)
            if not rows:
                return 0
            writes = [
                Write(
                    record_key(h.spec.name, s.session_id, s.owner), self.replica, s.epoch, b, True
                )
                for (h, s), b in zip(rows, await encoded(snapshots), strict=True)
            ]
            reason = EndReason.SHUTDOWN if why == "drain" else EndReason.MOVED
            answered = True
            try:
                landed = await self.backend.write(writes, self.record_ttl_s)
            except Exception as error:
                self.on_failure("release", error)
                answered, landed = False, [False] * len(rows)
                logger.error(
                    "%d session(s) could not be handed over (%s: %s); their clients go on from "
                    "their last write", len(rows), type(error).__name__, error,
                )  # fmt: skip
            for ok, (handle, session) in zip(landed, rows, strict=True):
                if ok:
                    self.metrics.cluster_handed_over.labels(why).inc()
                elif answered:  # refused: another replica took it (this one was paused)
                    self.metrics.cluster_fenced_writes.inc()
                    self.metrics.cluster_sessions_lost.inc()
                if session.ended is None:
                    handle.store.end(session, reason)
            return sum(landed)

    async def disown(self, key: str) -> None:
        """Give up ``key`` if the store says this replica owns it while it has no copy here (a
        release that failed, a record taken but not served): released, marked unconfirmed, so
        whoever takes it next has its client state where it stands."""
        try:
            claimed = await self.backend.acquire(key, self.replica, self.record_ttl_s)
            if isinstance(claimed, Claimed):
                await self.give_back(key, claimed)
        except Exception as error:
            self.on_failure("release", error)

    async def give_back(self, key: str, claimed: Claimed) -> None:
        """Release a record taken but not served here. One taken from a dead owner goes back
        marked unconfirmed: it is no later than that owner's last write, and released, it must
        not pass for a state written after the session's last chunk."""
        blob = None
        if not claimed.released:
            with contextlib.suppress(CorruptSnapshot):
                blob = unconfirmed_blob(claimed.blob)
        write = Write(key, self.replica, claimed.epoch, blob, release=True)
        try:
            await self.backend.write([write], self.record_ttl_s if blob else 0)
        except Exception as error:  # still ours in the store: disown() when asked for it
            self.on_failure("release", error)

    # ----- deletes ---------------------------------------------------------------------------
    def delete_later(self, key: str, epoch: int) -> None:
        """Delete ``key`` (a session that ended here), retrying until the store answers."""
        task = asyncio.ensure_future(self._delete(key, epoch))
        self.deletes[key] = task
        task.add_done_callback(
            lambda _: self.deletes.pop(key, None) if self.deletes.get(key) is task else None
        )

    async def _delete(self, key: str, epoch: int) -> None:
        wait_s = _RETRY_FIRST_S
        while True:
            try:
                await self.backend.delete(key, self.replica, epoch)
                return
            except Exception as error:
                self.on_failure("delete", error)
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, _RETRY_MOST_S)

    async def settled(self, key: str, timeout_s: float) -> None:
        """Wait until the store has forgotten a session that ended here; UNAVAILABLE if it has
        not answered within ``timeout_s`` (the delete goes on)."""
        task = self.deletes.get(key)
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            raise Unavailable(
                "the cluster store has not confirmed that this session ended; retry"
            ) from None

    async def stop(self, timeout_s: float) -> None:
        """Let pending deletes finish (at most ``timeout_s``), then cancel what is left."""
        pending = list(self.deletes.values())
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for task in pending:
            task.cancel()
