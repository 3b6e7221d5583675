"""Durable sessions: snapshot every model's sessions, and restore them when the server starts.

When: at shutdown always (after in-flight chunks drained), every ``snapshot_interval_s``, and once
the server has gone ``snapshot_when_idle_s`` without a chunk after changes; each only if something
changed since the last snapshot. Where: a :class:`~service.snapshots.SnapshotBackend`.

Concurrency: a snapshot is *captured* on the event loop thread, between batches, which is the only
thread that touches session stores, so every captured (state, step count) pair is consistent: a
session with a chunk in flight is captured as it was before that chunk. Encoding and writing happen
in a worker thread; an asyncio lock keeps two snapshots from being written at once. A session's
``durable_steps`` moves forward only after its snapshot is safely written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import ServiceError
from service.metrics import Metrics
from service.session import Session, incarnation_text
from service.session_store import SessionStore
from service.settings import Settings
from service.snapshots import (
    CorruptSnapshot,
    DirectorySnapshots,
    ModelSnapshot,
    RedisSnapshots,
    SessionRecord,
    SnapshotBackend,
    decode,
    encode,
    snapshot_key,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DurableModel:
    """What durability needs of one loaded model version (the engine's handle, reduced)."""

    name: str
    version: str
    sha256: str
    store: SessionStore


@dataclass(frozen=True)
class RestoreReport:
    restored: int
    rejected: dict[str, str]  # model key -> why its snapshot was not loaded


class Durability:
    def __init__(
        self,
        backend: SnapshotBackend,
        models: Callable[[], list[DurableModel]],
        metrics: Metrics,
        *,
        interval_s: float,
        when_idle_s: float,
    ) -> None:
        self.backend = backend
        self.models = models
        self.metrics = metrics
        self.interval_s = interval_s
        self.when_idle_s = when_idle_s
        self._lock = asyncio.Lock()
        self._changes = 0  # chunks and session changes since the last snapshot was captured
        self._last_change_s = time.monotonic()
        self._last_snapshot_s = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._failed_in_a_row = 0  # snapshots failed since the last that succeeded

    def changed(self) -> None:
        """Something a snapshot holds changed (a chunk applied, a session opened or ended)."""
        self._changes += 1
        self._last_change_s = time.monotonic()

    # ----- restore --------------------------------------------------------------------------
    def restore(self, models: list[DurableModel] | None = None) -> RestoreReport:
        """Load every model's snapshot (or those of ``models``: versions loaded while serving)
        into its (empty) store. A snapshot that is corrupt, or was taken with a different model
        file, is moved aside and reported, never loaded."""
        restored, rejected = 0, {}
        for model in self.models() if models is None else models:
            key = snapshot_key(model.name, model.version)
            blob = self.backend.read(key)
            if blob is None:
                continue
            try:
                snapshot = decode(blob)
                if snapshot.model_sha256 != model.sha256:
                    raise ValueError(
                        f"it was taken with model sha256 {snapshot.model_sha256[:12]}, the loaded "
                        f"model is {model.sha256[:12]}"
                    )
            except (CorruptSnapshot, ValueError) as error:
                reason = "corrupt" if isinstance(error, CorruptSnapshot) else "model_mismatch"
                moved = self.backend.quarantine(key)
                rejected[key] = f"{reason}: {error}"
                self.metrics.snapshots_rejected.labels(model.name, model.version, reason).inc()
                logger.error(
                    "snapshot of %s not restored (%s: %s); moved to %s; its sessions are lost",
                    key, reason, error, moved,
                )  # fmt: skip
                continue
            final = snapshot.final and self._spend_final(snapshot)
            count = 0
            for i, record in enumerate(snapshot.sessions):
                state = [s[:, i, :] for s in snapshot.states]
                try:
                    model.store.restore(record, state, confirmed=final and record.confirmed)
                except ServiceError as error:  # e.g. more sessions than max_sessions allows now
                    dropped = len(snapshot.sessions) - count
                    rejected[key] = f"{dropped} session(s) not restored: {error.message}"
                    logger.error("snapshot of %s: %s", key, rejected[key])
                    break
                count += 1
            restored += count
            self.metrics.sessions_restored.labels(model.name, model.version).inc(count)
            logger.info("restored %d session(s) of %s from %s", count, key, self.backend.describe())
        return RestoreReport(restored, rejected)

    def _spend_final(self, snapshot: ModelSnapshot) -> bool:
        """A final snapshot vouches for its sessions only until this server applies a chunk: mark
        it spent on the backend before serving, so that a crash later cannot restore its sessions
        as current. True if done; if it cannot be, its sessions are restored unconfirmed (their
        clients then state their step counts) rather than trusted twice."""
        spent = dataclasses.replace(
            snapshot,
            final=False,
            sessions=[dataclasses.replace(r, confirmed=False) for r in snapshot.sessions],
        )
        try:
            self.backend.write(snapshot.key, encode(spent))
        except Exception as error:
            logger.error(
                "could not mark the final snapshot of %s as read (%s: %s); its sessions are "
                "restored unconfirmed", snapshot.key, type(error).__name__, error,
            )  # fmt: skip
            return False
        return True

    # ----- snapshot -------------------------------------------------------------------------
    def _capture(
        self, model: DurableModel, final: bool
    ) -> tuple[ModelSnapshot, list[Session], list[int]]:
        """The model's sessions as a snapshot, the sessions, and their incarnations (a session
        restarted while the snapshot is written gains nothing from it). In a ``final`` snapshot a
        session with nothing in flight is confirmed: no later step of it can exist."""
        # A session closing (its close waits for its chunk in flight) is not saved: it must not
        # come back after a restart.
        sessions = [s for s in model.store.sessions.values() if s.close_when_idle is None]
        states = model.store.read_states(sessions)  # host copies
        records = [
            session_record(s, confirmed=final and not s.busy and not s.unconfirmed)
            for s in sessions
        ]
        snapshot = ModelSnapshot(
            model.name, model.version, model.sha256, time.time(), records, states, final
        )
        return snapshot, sessions, [s.incarnation for s in sessions]

    async def snapshot(self, force: bool = False, final: bool = False) -> int:
        """Capture and write every model's sessions; returns how many were written.

        Skipped (returns 0) when nothing changed since the last snapshot, unless ``force``.
        ``final``: the graceful shutdown's, after which nothing is applied (see
        :meth:`_capture`). A failure is logged once, when snapshots start failing, and counted
        every time; the next scheduled snapshot tries again.
        """
        async with self._lock:
            if not force and not self._changes:
                return 0
            self._changes = 0
            started = time.perf_counter()
            captured = [self._capture(m, final) for m in self.models()]
            try:
                await asyncio.to_thread(self._write_all, [c[0] for c in captured])
            except Exception as error:
                self._changes += 1  # try again next time
                self.metrics.snapshots.labels("failed").inc()
                self._failed_in_a_row += 1
                if self._failed_in_a_row == 1:
                    logger.error(
                        "snapshots to %s are failing (%s: %s); retrying at every snapshot "
                        "interval, logged again once they succeed",
                        self.backend.describe(), type(error).__name__, error, exc_info=error,
                    )  # fmt: skip
                raise
            if self._failed_in_a_row:
                logger.warning(
                    "snapshots to %s succeed again after %d failure(s)",
                    self.backend.describe(), self._failed_in_a_row,
                )  # fmt: skip
                self._failed_in_a_row = 0
            for snapshot, sessions, incarnations in captured:
                for record, session, incarnation in zip(
                    snapshot.sessions, sessions, incarnations, strict=True
                ):
                    if session.incarnation == incarnation:
                        session.durable_steps = max(session.durable_steps, record.steps)
            self._last_snapshot_s = time.monotonic()
            self.metrics.snapshots.labels("ok").inc()
            self.metrics.snapshot_duration.observe(time.perf_counter() - started)
            count = sum(len(s.sessions) for s, _, _ in captured)
            logger.debug("snapshot of %d session(s) written", count)
            return count

    async def forget(self, model: DurableModel) -> None:
        """Write ``model``'s snapshot as it is now, without sessions: it is about to be released
        (unloaded or removed, its sessions all ended), and if the same version is loaded again,
        none of the sessions that ended must come back from an older snapshot. (A version that
        goes while sessions live keeps them: the server serves them until they end.)"""
        async with self._lock:
            snapshot, _, _ = self._capture(model, final=False)
            try:
                await asyncio.to_thread(self.backend.write, snapshot.key, encode(snapshot))
            except Exception as error:
                self.metrics.snapshots.labels("failed").inc()
                logger.error(
                    "could not clear the snapshot of %s (%s: %s): if that version is loaded "
                    "again, the sessions it held at its last snapshot come back unconfirmed",
                    snapshot.key, type(error).__name__, error,
                )  # fmt: skip

    def _write_all(self, snapshots: list[ModelSnapshot]) -> None:
        for snapshot in snapshots:
            self.backend.write(snapshot.key, encode(snapshot))

    # ----- schedule -------------------------------------------------------------------------
    def start(self) -> None:
        if self.interval_s > 0 or self.when_idle_s > 0:
            self._task = asyncio.create_task(self._run_forever(), name="snapshots")

    async def _run_forever(self) -> None:
        tick_s = min(t for t in (self.interval_s, self.when_idle_s) if t > 0) / 4
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            due = self.interval_s > 0 and now - self._last_snapshot_s >= self.interval_s
            idle = self.when_idle_s > 0 and now - self._last_change_s >= self.when_idle_s
            if self._changes and (due or idle):
                with contextlib.suppress(Exception):  # logged and counted in snapshot()
                    await self.snapshot()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def session_record(session: Session, confirmed: bool) -> SessionRecord:
    s = session
    return SessionRecord(
        s.session_id,
        s.steps,
        s.owner,
        s.last_output,
        s.client,
        incarnation_text(s.incarnation),
        confirmed,
        s.broken,
    )


def make_durability(
    settings: Settings, metrics: Metrics, models: Callable[[], list[DurableModel]]
) -> Durability | None:
    """The durability the settings ask for, or None (snapshot_backend none)."""
    backend: SnapshotBackend
    if settings.snapshot_backend == "none":
        return None
    if settings.snapshot_backend == "redis":
        backend = RedisSnapshots(settings.snapshot_redis_url, settings.snapshot_redis_prefix)
    else:
        backend = DirectorySnapshots(settings.snapshot_dir)
    return Durability(
        backend,
        models,
        metrics,
        interval_s=settings.snapshot_interval_s,
        when_idle_s=settings.snapshot_when_idle_s,
    )
