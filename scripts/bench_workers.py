"""Throughput through one address: ``rnnserve serve`` (N=1) against ``serve --workers N``.

Each run starts a fresh server on loopback (port 0), drives the benchmark's closed-loop load
(bench.loadgen: every session streams one chunk at a time over the native API, the sessions
spread over ``--channels`` HTTP/2 connections, so that the kernel can spread them over the
workers) and stops it. Variants take turns (1, N, 1, N, ...: the machine's speed drifts between
runs) and the table gives each one's medians. Server CPU counts the supervisor and every worker;
"share" is each worker's part of the requests answered (from each worker's own metrics port).

python scripts/bench_workers.py                                   # 256 sessions, N=1 vs N=2, 3 turns
python scripts/bench_workers.py --workers 1 2 4 --runs 5 --duration-s 6
python scripts/bench_workers.py --model timer_lstm --chunk 16

Each run is bounded: the load lasts its warm-up plus ``--duration-s`` (bench.loadgen bounds its
set-up too), and a server that does not stop within 30 s of SIGTERM is killed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: bench, service

from bench.harness import CLOCK_TICKS, ServerProcess, _start, scrape, start_server
from bench.loadgen import LoadConfig
from bench.sweep import measure
from service.repository import read_spec
from service.settings import BUNDLED_MODELS

SUPERVISOR_READY = "workers serving on"  # the supervisor's line once every worker serves
REQUESTS = "rnnserve_request_latency_seconds_count"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class WorkersServer(ServerProcess):
    """``serve --workers N``: its CPU time is the supervisor's and every worker's."""

    worker_pids: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        return sum(map(process_cpu_seconds, [self.process.pid, *self.worker_pids]))


def start(workers: int, repository: Path, settings: dict[str, str]) -> ServerProcess:
    """A fresh server of ``workers`` worker processes (1: the plain server) on loopback."""
    if workers == 1:
        server = start_server(repository, **settings)
        server.metrics_port = None  # measured alike for every variant (shares are scraped here)
        return server
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
               "--grpc-port", "0", "--metrics-port", "0", "--model-repository",
               str(repository.resolve()), "--session-ttl-s", "0", "--snapshot-backend", "none",
               "--workers", str(workers)]  # fmt: skip
    for name, value in settings.items():
        command += [f"--{name.replace('_', '-')}", value]
    process, ports = _start(command, SUPERVISOR_READY)  # the harness's start, not its marker
    return WorkersServer(process, ports["grpc_port"], None, ports["worker_pids"],
                         ports["metrics_ports"])  # fmt: skip


def answered(server: ServerProcess) -> list[float]:
    """Requests each worker has answered so far (from its metrics)."""
    ports = server.metrics_ports if isinstance(server, WorkersServer) else []
    return [sum(v for k, v in scrape(p).items() if k.startswith(REQUESTS)) for p in ports]


def parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise SystemExit(f"expected setting=value, got {pair!r}")
        settings[name] = value
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="variants: N")
    parser.add_argument("--model-repository", type=Path, default=BUNDLED_MODELS)
    parser.add_argument("--model", default="adding_lstm")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--channels", type=int, default=16, help="client HTTP/2 connections")
    parser.add_argument("--chunk", type=int, default=1, help="steps per chunk")
    parser.add_argument("--runs", type=int, default=3, help="turns per variant")
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("settings", nargs="*", help="setting=value for every server")
    args = parser.parse_args()
    settings = parse_settings(args.settings)

    spec = read_spec(args.model_repository / args.model / "1")
    rows: dict[int, list[dict[str, Any]]] = {n: [] for n in args.workers}
    for turn in range(args.runs):
        for workers in args.workers:
            server = start(workers, args.model_repository, settings)
            try:
                cfg = LoadConfig(target=server.target, model=args.model, features=spec.input_size,
                                 sessions=args.sessions, chunk_steps=args.chunk,
                                 channels=args.channels, duration_s=args.duration_s,
                                 warmup_s=args.warmup_s)  # fmt: skip
                before = answered(server)
                row = measure(server, cfg)
                after = answered(server)
            finally:
                server.stop()
            done = [b - a for a, b in zip(before, after, strict=True)]
            row["shares"] = [d / sum(done) for d in done] if sum(done) else []
            rows[workers].append(row)
            shares = "/".join(f"{s:.0%}" for s in row["shares"]) or "-"
            print(f"turn {turn + 1}/{args.runs} N={workers}: steps/s={row['steps_per_s']:,.0f} "
                  f"p50={row['p50_ms']:.2f} ms p99={row['p99_ms']:.2f} ms "
                  f"cpu/request={row['server_cpu_per_request_us']:.0f} us errors={row['errors']:.0f} "
                  f"steal={row['machine_steal']:.1%} share={shares}", flush=True)  # fmt: skip
    print(f"\n{args.sessions} sessions, chunk {args.chunk}, model {args.model}, "
          f"{args.channels} connections, {args.runs} turns of {args.duration_s:g} s")  # fmt: skip
    print("\n| N | median steps/s | median p50 ms | median p99 ms | server CPU us/request "
          "| worker shares | all steps/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for workers, measured in rows.items():
        median = {c: statistics.median(r[c] for r in measured)
                  for c in ("steps_per_s", "p50_ms", "p99_ms", "server_cpu_per_request_us")}  # fmt: skip
        shares = "; ".join(
            "/".join(f"{s:.0%}" for s in r["shares"]) for r in measured if r["shares"]
        )
        shares = shares or "-"
        every = ", ".join(f"{r['steps_per_s']:,.0f}" for r in measured)
        print(f"| {workers} | {median['steps_per_s']:,.0f} | {median['p50_ms']:.2f} | "
              f"{median['p99_ms']:.2f} | {median['server_cpu_per_request_us']:.0f} | {shares} "
              f"| {every} |")  # fmt: skip


if __name__ == "__main__":
    main()
