"""``rnnserve serve`` replicas of one cluster (a real Redis store) as child processes, for
tests/test_cluster_acceptance.py: each on its own gRPC and metrics ports, its metrics scraped
before it stops (a replica that exits takes its counters with it), and the cluster's figures
summed over every replica's lives (sessions moved by how, the time to move, fenced writes)."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import scrape
from service.cluster_backend import record_key
from service.snapshots import decode
from tests.server_process import ServerProcess, free_port, serve_command

# Quick leases and writes so that a crash is recovered within about a second; every replica
# one intra-op thread (the test machine may have two cores for four replicas); no idle timeout.
LEASE_S = 1.0
WRITE_INTERVAL_S = 0.2
CLUSTER_FLAGS = ("--cluster-lease-s", str(LEASE_S), "--cluster-write-interval-s",
                 str(WRITE_INTERVAL_S), "--session-ttl-s", "0", "--intra-op-threads", "1")  # fmt: skip

MOVED = "rnnserve_cluster_sessions_moved_total"
HANDED_OVER = "rnnserve_cluster_sessions_handed_over_total"
MOVE_DURATION = "rnnserve_cluster_move_duration_seconds"
FENCED = "rnnserve_cluster_fenced_writes_total"
LOST = "rnnserve_cluster_sessions_lost_total"
SHUTDOWN_LINE = re.compile(
    r"shutdown: (\d+) session\(s\) handed over to the cluster store .*?, (\d+) ended here"
)


class ClusterReplica(ServerProcess):
    """One replica: ``--cluster-redis-url``, its own replica id, gRPC port (kept across restarts)
    and metrics port; ``flags`` after the cluster defaults (a later flag wins)."""

    def __init__(
        self, repository: Path, redis_url: str, name: str, *flags: str, port: int = 0
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.last_samples: dict[str, float] = {}
        super().__init__(
            serve_command(repository, self.port, "--metrics-port", str(self.metrics_port),
                          "--cluster-redis-url", redis_url, "--cluster-replica-id", name,
                          *CLUSTER_FLAGS, *flags)
        )  # fmt: skip

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape(self) -> dict[str, float]:
        """Its Prometheus samples now (kept as :attr:`last_samples`)."""
        self.last_samples = scrape(self.metrics_port)
        return self.last_samples

    def value(self, key: str) -> float:
        """One sample now (0 if it has none yet)."""
        return self.scrape().get(key, 0.0)

    def active_sessions(self) -> float:
        """Sessions it holds now (every model)."""
        return sum(v for k, v in self.scrape().items() if k.startswith("rnnserve_active_sessions{"))

    def wait_for_value(
        self, key: str, done: Callable[[float], bool], what: str, timeout_s: float = 30.0
    ) -> float:
        """Scrape until ``done(value)`` (bounded poll)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(key)
            if done(value):
                return value
            if time.monotonic() > deadline:
                cluster = {k: v for k, v in self.last_samples.items() if "cluster" in k}
                raise AssertionError(
                    f"{self.name}: timed out waiting for {what} ({key} = {value:g}); its cluster "
                    f"metrics {cluster}; its log:\n{''.join(self.lines)[-4000:]}"
                )
            time.sleep(0.02)

    def drain(self) -> tuple[int, int]:
        """SIGTERM, then the exit (0): returns (sessions handed over, sessions ended here) as
        its shutdown line says."""
        try:
            code = self.signal(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit after SIGTERM:\n{''.join(self.lines)[-6000:]}"
            ) from None
        assert code == 0, f"{self.name} exited with {code}: {''.join(self.lines)[-3000:]}"
        found = [SHUTDOWN_LINE.search(line) for line in self.lines]
        last = [m for m in found if m is not None]
        assert last, f"{self.name}: no shutdown line in its log"
        return int(last[-1].group(1)), int(last[-1].group(2))

    def message_lines(self) -> list[str]:
        """Its log's messages (JSON lines' ``message``)."""
        messages = []
        for line in self.lines:
            if line.startswith("{"):
                messages.append(str(json.loads(line).get("message", "")))
        return messages


def labelled(samples: dict[str, float], name: str, label: str) -> dict[str, float]:
    """``name{label="value"}`` samples as {value: sample}."""
    pattern = re.compile(rf'^{re.escape(name)}\{{{label}="([^"]*)"\}}$')
    found = {}
    for key, value in samples.items():
        match = pattern.match(key)
        if match:
            found[match.group(1)] = value
    return found


def buckets(samples: dict[str, float], name: str) -> dict[float, float]:
    """A histogram's cumulative buckets as {upper bound: count}."""
    return {
        math.inf if bound == "+Inf" else float(bound): count
        for bound, count in labelled(samples, f"{name}_bucket", "le").items()
    }


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets: linear within the bucket that
    holds the q-th observation; the highest finite bound if it lies in +Inf; NaN if empty."""
    bounds = sorted(cumulative)
    total = cumulative.get(math.inf, 0.0)
    if total <= 0:
        return math.nan
    rank = q * total
    below, lower = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        below, lower = count, bound
    return lower


class ClusterFigures:
    """The cluster's counters summed over its replicas' lives: a life that ended counts with its
    last scrape (:meth:`before_exit`, taken just before it is stopped or killed), a live one
    with a scrape now. Two such sums (:meth:`now`) taken at two moments give the figures of what
    happened in between (:func:`difference`)."""

    def __init__(self) -> None:
        self.ended: dict[str, dict[str, float]] = {}  # replica name: its life's last samples

    def before_exit(self, replica: ClusterReplica) -> None:
        self.ended[replica.name] = replica.scrape()

    def now(self, live: Iterable[ClusterReplica]) -> dict[str, float]:
        lives = list(self.ended.values()) + [r.scrape() for r in live if r.name not in self.ended]
        total: dict[str, float] = {}
        for samples in lives:
            for key, value in samples.items():
                if not key.endswith("_created"):  # (a timestamp, not a count)
                    total[key] = total.get(key, 0.0) + value
        return total


def difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def summary(samples: dict[str, float]) -> dict[str, object]:
    """The cluster figures of (summed) samples: sessions moved by how, handed over by why, the
    time to move (mean, p50, p99 from the histogram), fenced writes, sessions lost."""
    cumulative = buckets(samples, MOVE_DURATION)
    count = cumulative.get(math.inf, 0.0)
    return {
        "sessions_moved": labelled(samples, MOVED, "how"),
        "sessions_handed_over": labelled(samples, HANDED_OVER, "why"),
        "moves_timed": count,
        "move_mean_s": samples.get(f"{MOVE_DURATION}_sum", 0.0) / count if count else math.nan,
        "move_p50_s": histogram_quantile(0.5, cumulative),
        "move_p99_s": histogram_quantile(0.99, cumulative),
        "fenced_writes": samples.get(FENCED, 0.0),
        "sessions_lost": samples.get(LOST, 0.0),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def shown(value: object) -> str:
    """A figure as the tables show it: floats to 4 significant digits, dicts as k=v."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={shown(v)}" for k, v in sorted(value.items())) or "-"
    return str(value)


def table(rows: list[tuple[str, object]]) -> str:
    """Rows of (figure, value) as a small aligned text table."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {shown(value)}" for name, value in rows)


@dataclass(frozen=True)
class StoreRecord:
    """A session's record in the cluster store, as the test reads it (never writes)."""

    epoch: int
    replica: str  # its owner; "" when released
    steps: int  # the step count of its last write
    confirmed: bool


class StoreView:
    """Reads session records from the cluster's Redis (service.cluster_redis' layout), to see
    who owns a session and what its last write holds."""

    def __init__(self, url: str, prefix: str = "rnnserve:cluster:") -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=10)
        self.prefix = prefix.encode()

    def record(self, model: str, session_id: str, owner: str = "") -> StoreRecord | None:
        key = self.prefix + b"s:" + record_key(model, session_id, owner).encode()
        fields: list[bytes | None] = self.redis.hmget(key, ["blob", "epoch", "replica"])  # type: ignore[assignment]
        blob, epoch, replica = fields
        if blob is None or epoch is None or replica is None:
            return None
        session = decode(blob).sessions[0]
        return StoreRecord(int(epoch), replica.decode(), session.steps, session.confirmed)

    def owner(self, model: str, session_id: str) -> str:
        record = self.record(model, session_id)
        assert record is not None, f"the cluster store has no session {session_id}"
        return record.replica

    def close(self) -> None:
        self.redis.close()


def grid(header: list[str], rows: list[list[object]]) -> str:
    """Rows under a header, as an aligned text table (see :func:`shown`)."""
    cells = [header, *([shown(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)  # fmt: skip
