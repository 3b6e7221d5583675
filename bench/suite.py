"""The whole comparison in one run: the sweep, the open-loop latency points, start-up and idle-session
memory, and the issue's targets checked against what was measured."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.capacity import measure_admission, measure_idle_sessions, measure_startup
from bench.harness import ServerProcess, start_noop_server, start_server
from bench.loadgen import LoadConfig
from bench.sweep import SweepPlan, measure_calm, steal_cell
from service.repository import discover, read_spec

logger = logging.getLogger(__name__)
SYNTHETIC = "synthetic_lstm512"
# What a half-load row keeps of the no-op's point at the same rate, prefixed "noop_".
NOOP_HALF_LOAD_KEYS = ("p50_ms", "p99_ms", "p99_from_send_ms", "machine_steal", "remeasured")


@dataclass(frozen=True)
class CapacityPlan:
    idle_sessions: int = 100_000
    idle_model: str = "adding_lstm"
    startup_runs: int = 3
    admission_streams: int = 100  # new streams opened at once for the admission figure (0: skip)
    admission_busy_sessions: int = 256  # sessions streaming meanwhile
    admission_unary_s: float = 2.5  # seconds of unary calls, idle and busy


def bench_repository(source: Path, out_dir: Path, synthetic: bool) -> Path:
    """A repository for the run: every model of ``source`` (linked) plus, if asked, the synthetic
    2-layer LSTM with hidden 512 (exported by ``python -m training synthetic``, which needs torch)."""
    repository = out_dir / "repository"
    repository.mkdir(parents=True, exist_ok=True)
    for version_dir in discover(source):
        link = repository / version_dir.parent.name
        if not link.exists():
            link.symlink_to(version_dir.parent.resolve(), target_is_directory=True)
    if synthetic and not (repository / SYNTHETIC / "1" / "model.onnx").exists():
        command = [sys.executable, "-m", "training", "synthetic", "--name", SYNTHETIC,
                   "--repository", str(repository)]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(
                "could not export the synthetic hidden-512 model (it needs the training extra: "
                "pip install -e '.[training]'); or run with --no-synthetic\n" + error.stderr[-2000:]
            ) from error
    return repository


def half_load_latency(
    plan: SweepPlan, rows: list[dict[str, Any]], models: list[str]
) -> list[dict[str, Any]]:
    """p99 latency with an open-loop load at half the highest throughput the sweep measured for
    each model (chunk 1, batched), over ``plan.spot_sessions`` sessions."""
    out = []
    server = start_server(plan.repository)
    noops: dict[int, ServerProcess] = {}
    try:
        for model in models:
            best = max(
                (r["steps_per_s"] for r in rows
                 if (r["model"], r["chunk"], r["variant"]) == (model, 1, "batched")),
                default=0.0,
            )  # fmt: skip
            if not best:
                continue
            spec = read_spec(plan.repository / model / "1")
            cfg = LoadConfig(target=server.target, model=model, features=spec.input_size,
                             api=plan.api, sessions=plan.spot_sessions, chunk_steps=1,
                             duration_s=plan.duration_s, warmup_s=plan.warmup_s,
                             rate_per_s=best / 2)  # fmt: skip
            # Like the sweep's points, one disturbed by a neighbouring VM is measured again.
            row = {"model": model, "rate_per_s": best / 2, "max_steps_per_s": best}
            row.update(measure_calm(server, cfg))
            if spec.output_size not in noops:
                noops[spec.output_size] = start_noop_server(spec.output_size)
            # The transport alone at the same rate: the latency floor of this machine.
            noop = measure_calm(
                noops[spec.output_size], replace(cfg, target=noops[spec.output_size].target)
            )
            for key in NOOP_HALF_LOAD_KEYS:  # "remeasured" only if it was measured again
                if key in noop:
                    row["noop_" + key] = noop[key]
            logger.info("half load %s", row)
            out.append(row)
    finally:
        server.stop()
        for noop_server in noops.values():
            noop_server.stop()
    return out


def capacity(repository: Path, plan: CapacityPlan) -> dict[str, Any]:
    return {
        "startup": measure_startup(repository, plan.startup_runs),
        "idle_sessions": measure_idle_sessions(repository, plan.idle_model, plan.idle_sessions)
        if plan.idle_sessions
        else None,
        "admission": measure_admission(
            repository,
            plan.idle_model,
            busy_sessions=plan.admission_busy_sessions,
            new_streams=plan.admission_streams,
            unary_s=plan.admission_unary_s,
        )
        if plan.admission_streams
        else None,
    }


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def check_targets(
    rows: list[dict[str, Any]],
    half_load: list[dict[str, Any]],
    capacity_figures: dict[str, Any],
    bundled_lstm: str = "adding_lstm",
    sessions: int = 256,
) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it is met (None: not measured in this run)."""
    targets: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, goal: str, met: bool | None) -> None:
        targets.append({"target": name, "measured": measured, "goal": goal, "met": met})

    ours = _row(rows, model=bundled_lstm, chunk=1, sessions=sessions, variant="batched")
    noop = _row(rows, model=bundled_lstm, chunk=1, sessions=sessions, variant="noop")
    ratio = ours["steps_per_s"] / noop["steps_per_s"] if ours and noop else None
    add(f"{bundled_lstm}, {sessions} sessions, T=1: throughput / no-op transport limit", ratio,
        ">= 0.80", None if ratio is None else ratio >= 0.8)  # fmt: skip
    for chunk in (1, 16):
        big = _row(rows, model=SYNTHETIC, chunk=chunk, sessions=sessions, variant="batched")
        off = _row(rows, model=SYNTHETIC, chunk=chunk, sessions=sessions, variant="unbatched")
        limit = _row(rows, model=SYNTHETIC, chunk=chunk, sessions=sessions, variant="compute")
        speedup = big["steps_per_s"] / off["steps_per_s"] if big and off else None
        share = big["steps_per_s"] / limit["steps_per_s"] if big and limit else None
        add(f"hidden 512, {sessions} sessions, T={chunk}: batched / batching off", speedup,
            ">= 5", None if speedup is None else speedup >= 5)  # fmt: skip
        add(f"hidden 512, {sessions} sessions, T={chunk}: batched / in-process compute limit",
            share, ">= 0.60", None if share is None else share >= 0.6)  # fmt: skip
    for row in half_load:
        if row["model"] == SYNTHETIC:
            continue
        add(f"{row['model']}: p99 ms at half max throughput ({row['rate_per_s']:.0f} steps/s)",
            row["p99_ms"], "< 5", row["p99_ms"] < 5)  # fmt: skip
    idle = capacity_figures.get("idle_sessions")
    if idle:
        add(f"{idle['sessions']:,} idle {idle['model']} sessions: RSS growth MB", idle["rss_growth_mb"],
            f"< {idle['budget_mb']:.0f} (1.2 x {idle['raw_state_mb']:.1f} raw + 100)",
            idle["within_budget"])  # fmt: skip
    startup = capacity_figures.get("startup")
    if startup:
        add(f"start-up to SERVING, {startup['models']} models: seconds",
            startup["startup_s_median"], "< 3", startup["startup_s_median"] < 3)  # fmt: skip
    return targets


def admission_markdown(admission: dict[str, Any]) -> str:
    """The admission figure as a short table: new work taken on idle and while sessions stream."""
    a = admission
    return "\n".join([
        f"Admission of new work ({a['model']}): {a['new_streams']} new streams opened at once, and "
        f"unary `Step` calls from {a['unary_sessions']} sessions, on an idle server and beside "
        f"{a['busy_sessions']} sessions streaming in a closed loop:", "",
        "| server | seconds until all new streams answered | new streams per s | unary Step calls per s |",
        "|---|---|---|---|",
        f"| idle | {a['idle_open_s']:.2f} | {a['new_streams'] / a['idle_open_s']:,.0f} "
        f"| {a['idle_unary_steps_per_s']:,.0f} |",
        f"| {a['busy_sessions']} sessions streaming | {a['busy_open_s']:.2f} "
        f"| {a['new_streams'] / a['busy_open_s']:,.0f} | {a['busy_unary_steps_per_s']:,.0f} |",
    ]) + "\n"  # fmt: skip


def targets_markdown(targets: list[dict[str, Any]], half_load: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in targets:
        measured = "—" if t["measured"] is None else f"{t['measured']:.2f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {measured} | {t['goal']} | {met} |")
    lines += ["", "Open-loop latency at half the highest measured throughput (chunk 1), from each "
              "request's scheduled time; \"from send\" counts from when the load generator began "
              "writing it, leaving out the generator's own lateness on the shared cores:", "",
              "| model | rate steps/s | achieved steps/s | p50 ms | p99 ms | p99.9 ms | p99 from send ms | errors | steal % | no-op p50 ms | no-op p99 ms | no-op p99 from send ms | no-op steal % |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in half_load:
        lines.append(
            f"| {r['model']} | {r['rate_per_s']:,.0f} | {r['steps_per_s']:,.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['p99_from_send_ms']:.2f} "
            f"| {r['errors']:.0f} | {steal_cell(r)} | {r['noop_p50_ms']:.2f} | {r['noop_p99_ms']:.2f} "
            f"| {r['noop_p99_from_send_ms']:.2f} | {steal_cell(r, 'noop_')} |"
        )
    return "\n".join(lines) + "\n"
