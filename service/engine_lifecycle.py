"""The engine's chores off the per-chunk path: sessions counted as they end, idle sessions swept,
and the shutdown drain.

:class:`~service.engine.InferenceEngine` uses these; nothing here runs for a chunk.

Concurrency: everything here runs on the event loop thread, like the engine (the session stores
are mutated from that thread only). The idle sweeper is one task on the loop; the drain waits on
the batchers, whose model calls run in their worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from service.cluster import ClusterMember
from service.durability import Durability
from service.metrics import Metrics
from service.model_control import ModelControl
from service.models import EndHook, ModelRegistry
from service.repository import ModelSpec
from service.session import EndReason, Session
from service.settings import Settings

logger = logging.getLogger("service.engine")  # the name its lines always had (logs show it)


def session_end_hook(
    metrics: Metrics, spec: ModelSpec, on_ended: Callable[[ModelSpec], None]
) -> EndHook:
    """What a session of ``spec`` does as it ends: counted by reason, no longer active, and,
    unless it ends with the server (its snapshot already taken), ``on_ended`` (a change to
    snapshot; a retired version's last session lets it be released). Called on the loop, by the
    session store that ends it."""
    ended = metrics.sessions_ended
    active = metrics.active_sessions.labels(spec.name, spec.version)

    def on_end(session: Session, reason: EndReason) -> None:
        ended.labels(spec.name, spec.version, reason.value).inc()
        active.dec()
        if reason != EndReason.SHUTDOWN:
            on_ended(spec)

    return on_end


class IdleSweeper:
    """Ends the sessions idle for longer than ``session_ttl_s`` (every ``ttl_check_interval_s``)
    and updates each version's ``rnnserve_state_bytes``.

    Concurrency: one task on the event loop, so it ends sessions from the loop thread like every
    other change to a store; a session with a chunk in flight is never expired (the store skips
    it). :meth:`stop` cancels the task and waits for it, so no sweep runs during shutdown."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def expire(self) -> int:
        """End every session idle for longer than the TTL; returns how many ended."""
        ttl = self.settings.session_ttl_s
        if ttl <= 0:
            return 0
        return sum(len(h.store.expire_idle(ttl)) for h in self.registry.every_handle())

    def start(self) -> None:
        """Start sweeping, on the running loop (nothing with the TTL off)."""
        if self.settings.session_ttl_s > 0:
            self._task = asyncio.create_task(self._sweep_forever(), name="ttl-sweeper")

    async def stop(self) -> None:
        """Stop sweeping: the task cancelled and awaited."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ttl_check_interval_s)
            expired = self.expire()
            if expired:
                logger.info("ended %d idle session(s)", expired)
            for handle in self.registry.every_handle():
                self.metrics.state_bytes.labels(handle.spec.name, handle.spec.version).set(
                    handle.store.state_bytes
                )


async def drain_and_stop(
    registry: ModelRegistry,
    control: ModelControl,
    durability: Durability | None,
    drain_timeout_s: float,
    cluster: ClusterMember | None = None,
) -> dict[str, int]:
    """The shutdown, once the engine takes no new work: model control stopped (a load or a
    release under way finishes first), in-flight chunks drained (up to ``drain_timeout_s`` per
    model, failed or not), the final snapshot, every session ended, the batchers stopped.
    Returns what it did (sessions saved and ended, models not drained). In a ``cluster``, the
    sessions are written and released in the cluster store instead of snapshotted (other
    replicas take them without a replay), and this replica leaves the cluster last.

    Concurrency: on the loop; the drains of every model run together, so the whole drain takes
    at most ``drain_timeout_s``. The snapshot is taken after the drain, so it holds every chunk
    applied, and before the sessions end."""
    await control.stop()
    report = {"sessions_ended": 0, "models_not_drained": 0, "sessions_saved": 0}
    started = [h for h in registry.every_handle() if h.started]
    drained = await asyncio.gather(*(h.batcher.drain(drain_timeout_s) for h in started))
    report["models_not_drained"] = drained.count(False)
    if durability is not None:
        await durability.stop()
        try:
            report["sessions_saved"] = await durability.snapshot(force=True, final=True)
        except Exception:
            logger.error("the shutdown snapshot failed: sessions will not be restored")
    if cluster is not None:
        report["sessions_saved"] = await cluster.release_all()
    for handle in registry.every_handle():
        report["sessions_ended"] += handle.store.end_all(EndReason.SHUTDOWN)
    for handle in started:
        await handle.batcher.close()
    if cluster is not None:
        await cluster.stop()
    where = (
        f"handed over to the cluster store ({cluster.backend.describe()})"
        if cluster is not None
        else "saved for the next start"
    )
    logger.info(
        "shutdown: %d session(s) %s, %d ended here; %d model(s) did not drain in time",
        report["sessions_saved"], where, report["sessions_ended"], report["models_not_drained"],
    )  # fmt: skip
    return report
