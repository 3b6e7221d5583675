"""Prometheus metrics, on a registry of their own (one per server, so tests can run several).

Names end in their unit (``_seconds``) and labels stay low-cardinality: model, version, api,
reason, code. Never a session id.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def go_float(value: float) -> str:
    """A bucket bound as Prometheus writes it ("+Inf", "0.005"): prometheus_client's untyped
    helper, typed."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


class LoopHistogramChild:
    """One label set of a :class:`LoopHistogram`: bucket counts and a sum, nothing else."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is the +Inf bucket
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.total += value


class LoopHistogram(Collector):
    """A Prometheus histogram for per-request observations, about ten times cheaper than
    ``prometheus_client.Histogram`` (a bisect and two additions: no lock, no per-bucket loop).

    Concurrency: each label set must be observed from one thread at a time: all of them are
    observed on the event loop thread (model calls are timed in the worker thread and observed
    once the batch is back). The scrape (another thread) copies a child's counts in one list
    copy, which the GIL makes atomic, so ``_count`` always equals the ``+Inf`` bucket; the sum may
    be at most one observation ahead of or behind the counts.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str, **named: str) -> LoopHistogramChild:
        key = tuple(str(v) for v in values) or tuple(str(named[n]) for n in self.labelnames)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, LoopHistogramChild(self.bounds))
        return child

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            counts, total = list(child.counts), child.total
            cumulative, running = [], 0
            for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
                running += count
                cumulative.append((go_float(bound), float(running)))
            family.add_metric(list(key), cumulative, sum_value=total)
        yield family


class Metrics:
    """Every metric the service exports. Built once per server and handed to the core and adapters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_latency = LoopHistogram(
            "rnnserve_request_latency_seconds",
            "End-to-end time of one chunk request, from arrival to reply.",
            ["model", "version", "api"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = LoopHistogram(
            "rnnserve_queue_wait_seconds",
            "Time a chunk waited in its model's queue before its batch started.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # Observed on the loop thread once the batch is back (the worker thread only times).
        self.compute = LoopHistogram(
            "rnnserve_compute_seconds",
            "Time of one batched onnxruntime call.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = LoopHistogram(
            "rnnserve_batch_size",
            "Chunks (sessions) in one batched model call.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.active_sessions = Gauge(
            "rnnserve_active_sessions", "Live sessions.", ["model", "version"], registry=r
        )
        self.session_capacity = Gauge(
            "rnnserve_session_capacity",
            "Most sessions the model version accepts (the max_sessions setting).",
            ["model", "version"],
            registry=r,
        )
        self.state_bytes = Gauge(
            "rnnserve_state_bytes",
            "Bytes allocated for session state.",
            ["model", "version"],
            registry=r,
        )
        self.steps = Counter(
            "rnnserve_steps", "Time steps computed.", ["model", "version"], registry=r
        )
        self.sessions_started = Counter(
            "rnnserve_sessions_started",
            "Sessions started.",
            ["model", "version", "api"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "rnnserve_sessions_ended",
            "Sessions ended, by reason (closed, idle_timeout, evicted, shutdown).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.failures = Counter(
            "rnnserve_failures",
            "Failed requests by status code and the model the request named (empty when it named"
            " no model that is served).",
            ["api", "code", "model"],
            registry=r,
        )
        self.snapshots = Counter(
            "rnnserve_snapshots_total",
            "Session snapshots written (outcome ok) or failed.",
            ["outcome"],
            registry=r,
        )
        self.snapshot_duration = Histogram(
            "rnnserve_snapshot_duration_seconds",
            "Time to capture and write one snapshot of every model's sessions.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0),
            registry=r,
        )
        self.sessions_restored = Counter(
            "rnnserve_sessions_restored_total",
            "Sessions brought back from a snapshot at start-up.",
            ["model", "version"],
            registry=r,
        )
        self.snapshots_rejected = Counter(
            "rnnserve_snapshots_rejected_total",
            "Snapshots not restored: corrupt, or taken with a different model file.",
            ["model", "version", "reason"],
            registry=r,
        )
        self.cluster_moves = Counter(
            "rnnserve_cluster_sessions_moved_total",
            "Sessions this replica took from the cluster store: handover (a live owner released"
            " it on request), released (its owner had released it: a drain), restored (its owner"
            " died: the last write, its client replays what was after it).",
            ["how"],
            registry=r,
        )
        self.cluster_handed_over = Counter(
            "rnnserve_cluster_sessions_handed_over_total",
            "Sessions this replica wrote and released: asked by another replica, or at a drain.",
            ["why"],
            registry=r,
        )
        self.cluster_move_duration = Histogram(
            "rnnserve_cluster_move_duration_seconds",
            "Time a request waited for its session to move to this replica.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
            registry=r,
        )
        self.cluster_fenced_writes = Counter(
            "rnnserve_cluster_fenced_writes_total",
            "Writes of session state refused by the cluster store: this replica no longer owned"
            " the session (it was paused or cut off and another replica took it).",
            registry=r,
        )
        self.cluster_sessions_lost = Counter(
            "rnnserve_cluster_sessions_lost_total",
            "Sessions this replica dropped on finding that another replica owns them now.",
            registry=r,
        )
        self.cluster_store_errors = Counter(
            "rnnserve_cluster_store_errors_total",
            "Cluster store operations that failed (unreachable, timed out), by operation.",
            ["operation"],
            registry=r,
        )
        # Every label value exists from the start (at 0): a fresh replica shows them all.
        for how in ("handover", "released", "restored"):
            self.cluster_moves.labels(how)
        for why in ("asked", "drain"):
            self.cluster_handed_over.labels(why)
        for operation in (
            "lease", "write", "create", "acquire", "send", "release", "delete", "listen"
        ):  # fmt: skip
            self.cluster_store_errors.labels(operation)
        self.cluster_lease_valid = Gauge(
            "rnnserve_cluster_lease_valid",
            "1 while this replica's cluster lease is known valid (it applies chunks), else 0.",
            registry=r,
        )
        self.deadline_dropped = Counter(
            "rnnserve_deadline_dropped_total",
            "Chunks not computed because their caller's deadline passed while they were queued.",
            ["model", "version"],
            registry=r,
        )
        self.batch_failures = Counter(
            "rnnserve_batch_failures_total",
            "Batches that failed outside the model call (their chunks answered INTERNAL).",
            ["model", "version"],
            registry=r,
        )
        self.model_ready = Gauge(
            "rnnserve_model_ready",
            "1 while the model version serves, 0 once it cannot go on (its requests fail fast).",
            ["model", "version"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "rnnserve_queue_depth", "Chunks waiting for a batch.", ["model", "version"], registry=r
        )
        self.health_watchers = Gauge(
            "rnnserve_health_watchers",
            "grpc.health.v1 Watch streams open (at most the max_health_watchers setting).",
            registry=r,
        )
        self.health_watch_refused = Counter(
            "rnnserve_health_watch_refused_total",
            "grpc.health.v1 Watch streams refused (RESOURCE_EXHAUSTED): max_health_watchers open.",
            registry=r,
        )
        self.gc_pause = Histogram(
            "rnnserve_gc_pause_seconds",
            "Time the Python garbage collector stopped the process, per collection.",
            ["generation"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )

    def series_names(self) -> set[str]:
        """Every series name the exposition can hold (``_total`` counters, histogram series)."""
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
        }
        return {
            family.name + suffix
            for family in self.registry.collect()
            for suffix in suffixes.get(family.type, ("",))
        }
