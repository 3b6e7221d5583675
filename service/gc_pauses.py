"""Python's cyclic garbage collector, seen from a latency-sensitive server.

A collection stops every Python thread, the event loop's included, for as long as it scans: a
full one walks every tracked object, so its pause grows with what the process holds (the server
holds about 50,000 after start-up, and each session adds one; docs/PERFORMANCE.md has the
measured pauses). Two things keep that in check and in view:

- :func:`freeze_start_up_objects` moves everything alive once the models are loaded (modules,
  onnxruntime sessions, gRPC and protobuf machinery) out of the collector's reach, so full
  collections scan only what serving created since. It is a process-wide decision, made by the
  ``rnnserve serve`` entry point, not by :class:`service.server.RnnServer` (which tests and
  embedders run inside their own processes).
- :class:`GcPauseObserver` times every collection into ``rnnserve_gc_pause_seconds``, so an
  operator can tell a collector pause from a slow model when a latency spike shows up.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Histogram

logger = logging.getLogger(__name__)


def freeze_start_up_objects() -> int:
    """Collect once, then move every surviving object into the permanent generation, which
    collections skip. Returns how many objects were frozen.

    Objects frozen here are never examined for cycles again; they are start-up objects that live
    as long as the process, and the collection first frees whatever start-up left in cycles.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "froze %d start-up objects out of the garbage collector's scans (%.0f ms)",
        frozen,
        1e3 * (time.perf_counter() - started),
    )
    return frozen


class GcPauseObserver:
    """Times each garbage collection into ``pause`` (the ``rnnserve_gc_pause_seconds``
    histogram, labelled by generation) while installed.

    Concurrency: the collector calls back on whichever Python thread triggered the collection,
    holding the GIL for the whole collection, so two collections never overlap and one start time
    suffices. The histogram is ``prometheus_client``'s, which is safe to observe from any thread
    (collections are a few per second: its lock costs nothing that matters here).
    """

    def __init__(self, pause: Histogram) -> None:
        self.pause = pause
        self._started_s = 0.0

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_s = time.perf_counter()
        else:
            elapsed_s = time.perf_counter() - self._started_s
            self.pause.labels(str(info["generation"])).observe(elapsed_s)

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
