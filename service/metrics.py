"""Prometheus metrics, on a registry of their own (one per server, so tests can run several).

Names end in their unit (``_seconds``) and labels stay low-cardinality: model, version, api,
reason, code. Never a session id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the service exports. Built once per server and handed to the core and adapters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "rnnserve_request_latency_seconds",
            "End-to-end time of one chunk request, from arrival to reply.",
            ["model", "version", "api"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rnnserve_queue_wait_seconds",
            "Time a chunk waited in its model's queue before its batch started.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute = Histogram(
            "rnnserve_compute_seconds",
            "Time of one batched onnxruntime call.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
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
            "Failed requests by status code.",
            ["api", "code"],
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
