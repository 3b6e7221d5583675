"""The benchmark harness works end to end at CI size (seconds). No timing assertions: numbers
belong in docs/PERFORMANCE.md, measured by the full sweep."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.harness import scrape, start_noop_server, start_server
from bench.loadgen import Api, LoadConfig, drive, require_loopback
from bench.noop_server import Flavour

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_sweep_runs_and_writes_its_outputs(tiny_repository: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--model-repository", str(tiny_repository),
         "--models", "tiny_gru", "--sessions", "1", "4", "--chunks", "1", "--duration-s", "0.4",
         "--warmup-s", "0.1", "--no-synthetic", "--spot-sessions", "4", "--idle-sessions", "50", "--idle-model",
         "tiny_gru", "--startup-runs", "1", "--admission-streams", "5", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    variants = {(r["variant"], r["sessions"]) for r in record["rows"]}
    for sessions in (1, 4):
        assert {
            ("batched", sessions),
            ("unbatched", sessions),
            ("noop", sessions),
            ("compute", sessions),
        } <= variants
    for row in record["rows"]:
        assert row["steps_per_s"] > 0
        if row["variant"] != "compute":
            assert row["errors"] == 0, row.get("error_samples")
            assert row["server_cpu_s"] >= 0
    unbatched = [r for r in record["rows"] if r["variant"] == "unbatched"]
    assert all(r["mean_batch"] == 1.0 for r in unbatched)
    table = (tmp_path / "bench.md").read_text()
    assert "vs no-op" in table and "compute limit" in table
    assert (tmp_path / "bench.png").stat().st_size > 0
    # The other repository model gets the headline point; both get an open-loop half-load point.
    assert {r["model"] for r in record["rows"]} == {"tiny_gru", "tiny_lstm"}
    assert {r["model"] for r in record["half_load"]} == {"tiny_gru", "tiny_lstm"}
    for row in record["half_load"]:
        assert row["errors"] == 0 and row["steps_per_s"] > 0
        assert row["rate_per_s"] == row["max_steps_per_s"] / 2
        assert row["noop_p99_ms"] > 0  # the transport alone at the same rate
    idle = record["capacity"]["idle_sessions"]
    assert idle["sessions"] == 50 and idle["rss_after_mb"] > 0
    assert record["capacity"]["startup"]["models"] == 2
    assert record["capacity"]["startup"]["startup_s_median"] > 0
    admission = record["capacity"]["admission"]  # new work taken on, idle and beside 4 streams
    assert admission["new_streams"] == 5 and admission["busy_sessions"] == 4
    assert admission["idle_open_s"] > 0 and admission["busy_open_s"] > 0
    assert admission["idle_unary_steps_per_s"] > 0 and admission["busy_unary_steps_per_s"] > 0
    assert "Admission of new work" in table
    measured = {t["target"]: t for t in record["targets"]}
    assert any("start-up" in name for name in measured)
    assert "| target | measured | goal | met |" in table


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["asyncio", "threads"])
@pytest.mark.parametrize("api", ["native", "kserve"])
def test_both_noop_flavours_answer_both_apis(flavour: Flavour, api: Api) -> None:
    server = start_noop_server(outputs=3, flavour=flavour)
    try:
        cfg = LoadConfig(target=server.target, model="m", features=2, api=api, sessions=2,
                         channels=1, duration_s=0.2, warmup_s=0.0)  # fmt: skip
        result = drive(cfg)
    finally:
        server.stop()
    assert result.errors == 0 and result.answered > 0


@pytest.mark.slow
def test_the_zero_model_server_serves_zeros_through_the_whole_server(
    tiny_repository: Path,
) -> None:
    from service.client import Client
    from service.repository import read_spec

    spec = read_spec(tiny_repository / "tiny_lstm" / "1")
    server = start_server(tiny_repository, zero_model=True)
    try:
        with (
            Client(server.target, timeout_s=30) as client,
            client.open_session("tiny_lstm") as session,
        ):
            x = np.ones((3, spec.input_size), np.float32)
            first = session.step(x)
            second = session.step(x)
        metrics = scrape(server.metrics_port)  # type: ignore[arg-type]
    finally:
        server.stop()
    assert first.shape == second.shape == (3, spec.output_size)
    assert not first.any() and not second.any()
    # The chunks went through the batcher and were counted like real model calls.
    assert metrics['rnnserve_batch_size_count{model="tiny_lstm",version="1"}'] >= 2


def test_load_generator_refuses_non_loopback_targets() -> None:
    require_loopback("127.0.0.1:8001")
    require_loopback("localhost:8001")
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("192.0.2.10:8001")


def test_a_point_disturbed_by_steal_is_measured_again_and_the_calmer_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import sweep

    steals = iter([0.30, 0.02, 0.05, 0.25, 0.40])
    monkeypatch.setattr(sweep, "measure", lambda server, cfg: {"machine_steal": next(steals)})
    first = sweep.measure_calm(None, None)  # type: ignore[arg-type]
    assert first == {"machine_steal": 0.02, "remeasured": True}
    assert sweep.measure_calm(None, None) == {"machine_steal": 0.05}  # calm: measured once
    assert sweep.measure_calm(None, None) == {"machine_steal": 0.25, "remeasured": True}


def test_a_half_load_rows_no_op_point_keeps_its_second_try_mark(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from bench import suite
    from bench.sweep import SweepPlan

    fake_server = SimpleNamespace(target="127.0.0.1:1", stop=lambda: None)
    monkeypatch.setattr(suite, "start_server", lambda repository: fake_server)
    monkeypatch.setattr(suite, "start_noop_server", lambda outputs: fake_server)
    monkeypatch.setattr(suite, "read_spec", lambda d: SimpleNamespace(input_size=2, output_size=1))
    point = {"steps_per_s": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0,
             "p99_from_send_ms": 1.5, "errors": 0.0, "machine_steal": 0.01}  # fmt: skip
    measured = iter([point, {**point, "machine_steal": 0.12, "remeasured": True}])
    monkeypatch.setattr(suite, "measure_calm", lambda server, cfg: next(measured))
    rows = [{"model": "m", "chunk": 1, "variant": "batched", "steps_per_s": 200.0}]
    plan = SweepPlan(repository=tmp_path, models=("m",))

    [row] = suite.half_load_latency(plan, rows, ["m"])
    assert row["noop_remeasured"] is True and row["noop_machine_steal"] == 0.12
    assert "remeasured" not in row  # the server's own point was calm
    table_row = suite.targets_markdown([], [row]).splitlines()[-1]
    assert table_row.endswith("| 12 (2nd try) |") and table_row.count("2nd try") == 1


def test_machine_ticks_fractions() -> None:
    from bench.harness import MachineTicks

    earlier = MachineTicks(total=1000, idle=400, steal=10)
    later = MachineTicks(total=1200, idle=450, steal=30)
    assert later.fractions_since(earlier) == (0.25, 0.1)
    now = MachineTicks.now()
    assert now.total >= now.idle >= 0 and now.steal >= 0


def established_connections_to(port: int) -> int:
    """Server-side ESTABLISHED TCP sockets on ``port`` (IPv4 or IPv6 ones, from /proc/net)."""
    rows = [row for table in ("tcp", "tcp6")
            for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]  # fmt: skip
    local_and_state = ((r.split()[1], r.split()[3]) for r in rows)
    return sum(local.endswith(f":{port:04X}") and state == "01" for local, state in local_and_state)


@pytest.mark.slow
def test_load_generator_spreads_sessions_over_separate_connections() -> None:
    server = start_noop_server(outputs=1)
    seen: list[int] = []
    try:
        cfg = LoadConfig(target=server.target, model="m", features=2, sessions=6, channels=3,
                         duration_s=0.2, warmup_s=0.0)  # fmt: skip
        result = drive(cfg, lambda edge: seen.append(established_connections_to(server.grpc_port)))
    finally:
        server.stop()
    assert result.errors == 0
    # The window opens once every session has been answered, so all connections are up by then.
    assert seen[0] == 3  # one HTTP/2 connection per channel, not one shared by all


def test_the_window_opens_after_warm_up_and_every_sessions_first_reply() -> None:
    from bench.loadgen import _Window

    async def scenario() -> list[str]:
        edges: list[str] = []
        opened = asyncio.Event()
        window = _Window(0.0, 60.0, sessions=3,
                         on_edge=lambda edge: (edges.append(edge), opened.set()))  # fmt: skip
        for index in range(3):  # every session opens its stream: the load and warm-up begin
            window.session_opened(index)
        await asyncio.wait_for(window.all_opened(), timeout=10)
        await asyncio.sleep(0)  # warm-up (zero) elapses; sessions 0 and 2 are still unanswered
        await asyncio.sleep(0)
        window.session_ready(0)
        window.session_ready(0)  # a session reports on every reply: idempotent
        assert edges == [] and window.running
        window.session_ready(2)  # ended without a reply: counts as ready
        window.session_ready(1)
        await asyncio.wait_for(opened.wait(), timeout=10)
        assert edges == ["start"] and window.start <= window.end - 60.0 + 1e-9
        window.close()  # every session ended before the deadline: the end edge is reported now
        return edges

    assert asyncio.run(scenario()) == ["start", "end"]


def test_the_load_begins_only_when_every_session_has_opened() -> None:
    from bench.loadgen import _Window

    async def scenario() -> None:
        window = _Window(0.0, 60.0, sessions=2)
        waiting = asyncio.create_task(window.all_opened())
        window.session_opened(0)
        window.session_opened(0)  # idempotent
        await asyncio.sleep(0)
        assert not waiting.done()  # session 1 is still opening: nobody sends chunks yet
        window.session_opened(1)  # or it ended without opening: it holds nobody up either
        await asyncio.wait_for(waiting, timeout=10)
        window.close()

    asyncio.run(scenario())


def test_a_window_waiting_for_a_silent_session_opens_after_its_timeout() -> None:
    from bench.loadgen import _Window

    async def scenario() -> list[str]:
        edges: list[str] = []
        done = asyncio.Event()

        def on_edge(edge: str) -> None:
            edges.append(edge)
            if edge == "end":
                done.set()

        _Window(0.0, 0.0, sessions=1, on_edge=on_edge, ready_timeout_s=0.0)
        await asyncio.wait_for(done.wait(), timeout=10)
        return edges

    assert asyncio.run(scenario()) == ["start", "end"]


def test_the_window_counts_replies_by_arrival_and_latencies_by_due_time() -> None:
    from bench.loadgen import _Window

    window = _Window(warmup_s=0.0, duration_s=0.0)
    window.start, window.end = 10.0, 20.0
    window.record(due=9.0, written=9.0, received=11.0)  # in flight as the window opened: counts
    window.record(due=12.0, written=12.5, received=13.0)  # inside: both; written 0.5 s late
    window.record(due=8.0, written=8.0, received=9.5)  # answered during warm-up: neither
    window.record(due=19.0, written=19.0, received=21.0)  # due inside, answered after: latency
    assert window.answered == 2
    assert window.latencies == [1.0, 2.0]
    assert window.send_lags == [0.5, 0.0]


def test_an_open_loop_never_sends_a_chunk_before_its_scheduled_time() -> None:
    """uvloop's sleeps end up to ~1.5 ms early (whole milliseconds of a cached clock); a chunk
    sent early would have its latency, counted from the scheduled time, cut short."""
    from bench.loadgen import _Schedule
    from service.event_loop import run_to_result

    cfg = LoadConfig(target="127.0.0.1:1", model="m", features=1, sessions=8, rate_per_s=8000.0)

    async def turns(schedule: _Schedule, lags_s: list[float]) -> None:
        for _ in range(40):
            scheduled = await schedule.wait_turn()
            lags_s.append(time.perf_counter() - scheduled)

    async def scenario() -> list[float]:
        lags_s: list[float] = []
        await asyncio.gather(*(turns(cfg.schedule(i), lags_s) for i in range(cfg.sessions)))
        return lags_s

    lags_s = run_to_result(scenario(), "auto")  # the load generator's loop: uvloop if installed
    assert len(lags_s) == 320
    assert min(lags_s) >= 0.0


def test_latency_from_send_leaves_out_the_load_generators_lateness() -> None:
    from bench.loadgen import LoadResult

    cfg = LoadConfig(target="127.0.0.1:1", model="m", features=1, duration_s=1.0)
    result = LoadResult(config=cfg, latencies_s=np.array([0.004, 0.010]), measured_s=1.0,
                        errors=0, answered=2, send_lags_s=np.array([0.0, 0.008]))  # fmt: skip
    summary = result.summary()
    assert summary["max_ms"] == pytest.approx(10.0)
    assert summary["send_lag_p99_ms"] == pytest.approx(7.92)
    assert summary["p99_from_send_ms"] == pytest.approx(3.98)  # 4 ms and 2 ms once written


@pytest.mark.slow
def test_interleaved_ab_script_runs(tiny_repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench_ab.py", "--model-repository", str(tiny_repository),
         "--model", "tiny_gru", "--runs", "1", "--sessions", "2", "--duration-s", "0.3",
         "--warmup-s", "0.1", "default", "max_batch_size=1", "noop",
         f"checkout={ROOT},max_batch_size=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| default",
        "| max_batch_size=1",
        "| noop",
        f"| checkout={ROOT},max_batch_size=2",
    ]


def test_the_ab_script_refuses_a_malformed_variant_before_starting_anything(
    tmp_path: Path,
) -> None:
    for variant, message in ((f"checkout={tmp_path}", "not a source tree"),
                             ("max_batch_size", "expected setting=value")):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "scripts/bench_ab.py", "--runs", "1", "default", variant],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
        assert "turn 1/1" not in result.stdout


STUB_CLI = """
import json, pathlib, signal, sys, time

argv = sys.argv[1:]
port_file = pathlib.Path(argv[argv.index("--port-file") + 1])
port_file.write_text(json.dumps({"grpc_port": 4242, "metrics_port": 4343}))
print("serving", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(60)
"""


def test_a_server_from_another_source_tree_runs_that_trees_code(tmp_path: Path) -> None:
    """``source`` (``checkout=PATH`` in scripts/bench_ab.py) runs the other tree's
    ``service.cli``, not the installed or this checkout's one."""
    (tmp_path / "other" / "service").mkdir(parents=True)
    (tmp_path / "other" / "service" / "__init__.py").write_text("")
    (tmp_path / "other" / "service" / "cli.py").write_text(STUB_CLI)
    server = start_server(tmp_path / "models", source=tmp_path / "other")
    try:
        assert (server.grpc_port, server.metrics_port) == (4242, 4343)  # only the stub says so
    finally:
        server.stop()
    with pytest.raises(ValueError, match="this checkout"):
        start_server(tmp_path / "models", source=tmp_path / "other", zero_model=True)


def test_the_zero_runtime_answers_zeros_in_the_models_shapes(tiny_repository: Path) -> None:
    from bench.zero_model_server import ZeroRuntime
    from service.repository import read_spec

    spec = read_spec(tiny_repository / "tiny_lstm" / "1")
    runtime = ZeroRuntime(spec.onnx_path, intra_op_threads=1)
    x = np.ones((2, 3, spec.input_size), np.float32)
    states = [np.ones((spec.num_layers, 2, spec.hidden_size), np.float32)
              for _ in spec.state_inputs]  # fmt: skip
    y, new_states = runtime.run(x, states)
    assert y.shape == (2, 3, spec.output_size) and y.dtype == np.float32 and not y.any()
    assert [s.shape for s in new_states] == [s.shape for s in states]
    assert not any(s.any() for s in new_states)


def test_bench_runs_as_a_module_and_rnnserve_has_no_bench_command() -> None:
    from service.cli import build_parser

    result = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--spot-sessions" in result.stdout and "--admission-streams" in result.stdout
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])


def test_the_serving_package_never_imports_the_benchmark() -> None:
    importing = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "service").rglob("*.py")
        if any(
            line.lstrip().startswith(("import bench", "from bench"))
            for line in path.read_text().splitlines()
        )
    ]
    assert importing == []


def test_gc_pause_script_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gc_pause.py", "--freeze", "--sessions", "0", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row[0] for row in rows[1:]] == ["| 0", "| 200"]
    assert int(rows[1][1].replace(",", "")) < 100  # frozen: start-up objects are not scanned
