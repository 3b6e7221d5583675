"""The comparison: this server batched, batching off, the transport limit and the compute limit,
over a sweep of concurrent sessions, written as a table (markdown + JSON) and a plot (PNG)."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import (
    RunningServer,
    ServerProcess,
    WindowCounters,
    batch_sizes,
    compute_limit,
    scrape,
    served_input_size,
    start_noop_server,
    start_server,
)
from bench.loadgen import Api, LoadConfig, drive
from service.repository import read_spec

logger = logging.getLogger(__name__)
VARIANTS = ("batched", "unbatched", "noop")


@dataclass(frozen=True)
class SweepPlan:
    """What to measure. ``models`` get the whole sweep (every session count x chunk length);
    ``spot_models`` only the headline point (``spot_sessions`` sessions, chunk 1)."""

    repository: Path
    models: tuple[str, ...]
    api: Api = "native"
    sessions: tuple[int, ...] = (1, 16, 64, 256, 1024)
    chunks: tuple[int, ...] = (1, 16)
    duration_s: float = 2.5
    warmup_s: float = 0.75
    compare: bool = True
    spot_models: tuple[str, ...] = ()
    spot_sessions: int = 256

    def points(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(model, chunk, session counts) in the order they run."""
        full = [(m, c, self.sessions) for m in self.models for c in self.chunks]
        return full + [(m, 1, (self.spot_sessions,)) for m in self.spot_models]


def measure(server: ServerProcess | RunningServer, cfg: LoadConfig) -> dict[str, Any]:
    """One point: the load's summary, plus the server's CPU time (None for a server this
    benchmark did not start) and the machine's idle and steal fractions read over exactly the
    measured window (warm-up excluded)."""
    before = scrape(server.metrics_port) if server.metrics_port else {}
    process = server if isinstance(server, ServerProcess) else None
    counters = WindowCounters(process)
    result = drive(cfg, counters.record)
    cpu = counters.server_cpu_s if process is not None else None
    row: dict[str, Any] = {**result.summary(), "server_cpu_s": cpu}
    row["server_cpu_per_request_us"] = None if cpu is None else 1e6 * cpu / max(result.requests, 1)
    row["machine_idle"], row["machine_steal"] = counters.idle_and_steal
    if server.metrics_port:
        calls, mean_batch = batch_sizes(before, scrape(server.metrics_port), cfg.model)
        row["model_calls"], row["mean_batch"] = calls, mean_batch
    if result.error_samples:
        row["error_samples"] = result.error_samples
    return row


DISTURBED_STEAL = 0.10  # a point during which the hypervisor took more than this is measured again


def measure_calm(server: ServerProcess | RunningServer, cfg: LoadConfig) -> dict[str, Any]:
    """:func:`measure`, once more if a neighbouring VM stole more than ``DISTURBED_STEAL`` of the
    machine's CPU during the window; the calmer of the two is kept (``remeasured`` marks it)."""
    row = measure(server, cfg)
    if row["machine_steal"] <= DISTURBED_STEAL:
        return row
    logger.warning("%.0f%% of the CPU was stolen during this point; measuring it again",
                   100 * row["machine_steal"])  # fmt: skip
    calmer = min(row, measure(server, cfg), key=lambda r: r["machine_steal"])
    return {**calmer, "remeasured": True}


def steal_cell(row: dict[str, Any], prefix: str = "") -> str:
    """A point's stolen CPU share (``<prefix>machine_steal``) as a table cell, in percent, marked
    if it was measured again (``<prefix>remeasured``)."""
    again = " (2nd try)" if row.get(prefix + "remeasured") else ""
    return f"{100 * row.get(prefix + 'machine_steal', 0.0):.0f}{again}"


def run_sweep(plan: SweepPlan, running: RunningServer | None = None) -> list[dict[str, Any]]:
    """Every point of ``plan`` against fresh servers, or against ``running``, a server this
    benchmark did not start (then the "batched" variant only: there is nothing to compare)."""
    rows: list[dict[str, Any]] = []
    for model, chunk, session_counts in plan.points():
        servers: dict[str, ServerProcess | RunningServer]
        if running is not None:
            features = served_input_size(running.target, model)
            servers = {"batched": running}
        else:
            spec = read_spec(plan.repository / model / "1")
            features = spec.input_size
            servers = {"batched": start_server(plan.repository)}
            if plan.compare:
                servers["unbatched"] = start_server(plan.repository, max_batch_size=1)
                servers["noop"] = start_noop_server(spec.output_size)
        try:
            for sessions in session_counts:
                for variant, server in servers.items():
                    cfg = LoadConfig(target=server.target, model=model, features=features,
                                     api=plan.api, sessions=sessions, chunk_steps=chunk,
                                     duration_s=plan.duration_s, warmup_s=plan.warmup_s)  # fmt: skip
                    row = {"model": model, "variant": variant, "api": plan.api,
                           "sessions": sessions, "chunk": chunk}  # fmt: skip
                    row.update(measure_calm(server, cfg))
                    logger.info(
                        "%s",
                        {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
                    )
                    rows.append(row)
                batched = rows[-len(servers)]
                if plan.compare and running is None and batched.get("mean_batch"):
                    batch = max(1, round(batched["mean_batch"]))
                    rows.append({"model": model, "variant": "compute", "api": "in-process",
                                 "sessions": sessions, "chunk": chunk, "mean_batch": batch,
                                 "steps_per_s": compute_limit(spec.directory, batch, chunk)})  # fmt: skip
        finally:
            for server in servers.values():
                if isinstance(server, ServerProcess):
                    server.stop()
    return rows


def ratio(rows: list[dict[str, Any]], row: dict[str, Any], variant: str) -> float | None:
    for other in rows:
        if (other["model"], other["chunk"], other["sessions"], other["variant"]) == (
            row["model"],
            row["chunk"],
            row["sessions"],
            variant,
        ):
            return row["steps_per_s"] / other["steps_per_s"] if other["steps_per_s"] else None
    return None


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    lines = [
        "| model | chunk | sessions | variant | steps/s | requests/s | p50 ms | p99 ms | p99.9 ms | mean batch | server CPU µs/req | steal % | vs no-op | vs compute | vs unbatched |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["variant"] == "compute":
            lines.append(
                f"| {r['model']} | {r['chunk']} | {r['sessions']} | compute limit (in-process, batch {r['mean_batch']}) | {r['steps_per_s']:,.0f} | | | | | | | | | | |"
            )
            continue
        batched = r["variant"] == "batched"
        lines.append(
            f"| {r['model']} | {r['chunk']} | {r['sessions']} | {r['variant']} | {r['steps_per_s']:,.0f} | {r['requests_per_s']:,.0f} "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['p999_ms'])} | {fmt(r.get('mean_batch'), 1)} "
            f"| {fmt(r['server_cpu_per_request_us'], 0)} | {steal_cell(r)} "
            f"| {fmt(ratio(rows, r, 'noop') if batched else None)} "
            f"| {fmt(ratio(rows, r, 'compute') if batched else None)} | {fmt(ratio(rows, r, 'unbatched') if batched else None)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p99 latency against throughput as the sessions grow, one panel per swept model and chunk
    length (points measured at a single load are in the table only), two panels a row."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    every_group = sorted({(r["model"], r["chunk"]) for r in rows})
    swept = [
        g for g in every_group
        if len({r["sessions"] for r in rows if (r["model"], r["chunk"]) == g}) > 1
    ]  # fmt: skip
    groups = swept or every_group
    columns = min(2, len(groups))
    lines = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6 * columns, 4.2 * lines), squeeze=False)
    for ax, (model, chunk) in zip(axes.flat, groups, strict=False):
        for variant in VARIANTS:
            points = sorted(
                (r["sessions"], r["steps_per_s"], r["p99_ms"])
                for r in rows
                if (r["model"], r["chunk"], r["variant"]) == (model, chunk, variant)
                and r["steps_per_s"] > 0
            )
            if not points:
                continue
            ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=variant)
            for sessions, x, y in points:
                ax.annotate(str(sessions), (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, alpha=0.7)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel("throughput (steps/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{model}, chunk {chunk} (labels: concurrent sessions)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    plan: SweepPlan,
    rows: list[dict[str, Any]],
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    extra_markdown: str = "",
) -> list[Path]:
    """bench.json (plan, machine, rows and ``extra``), bench.md (``extra_markdown`` then the
    sweep table) and bench.png (p99 latency against throughput)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    plan_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()}
    (out_dir / "bench.json").write_text(
        json.dumps(
            {"plan": plan_record, "machine": machine, "rows": rows, **(extra or {})}, indent=2
        )
        + "\n"
    )
    sweep = markdown(rows)
    (out_dir / "bench.md").write_text(f"{extra_markdown}\n{sweep}" if extra_markdown else sweep)
    paths = [out_dir / "bench.json", out_dir / "bench.md"]
    try:
        plot(rows, out_dir / "bench.png")
        paths.append(out_dir / "bench.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'rnnserve[plot]')")
    return paths
