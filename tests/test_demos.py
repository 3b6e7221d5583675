"""``rnnserve stream``: every bundled model's demo, streamed through a real server, scores within
the model's documented test-set figures by its task's own measure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.cli import build_parser
from service.cli_stream import StreamedDemo, print_demo, stream_demo
from service.client import Client
from service.demo import co2_weeks, plan_for
from service.server import RnnServer
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted(p.parent.parent.name for p in (ROOT / "models").glob("*/1/model.onnx"))
CHUNK = 50  # the served outputs are the same for any chunking; larger chunks keep the test quick


@contextlib.contextmanager
def server_in_thread(settings: Settings) -> Iterator[RnnServer]:
    """A started server on an event loop of its own thread, so blocking clients (the CLI's) can
    talk to it from the test's thread; stopped and its loop closed afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop")
    thread.start()

    async def start() -> RnnServer:
        server = RnnServer(settings)
        await server.start()
        return server

    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def bundled_settings(**overrides: Any) -> Settings:
    """The bundled models on free ports, no snapshots, one onnxruntime thread each."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "model_repository": ROOT / "models",
        "intra_op_threads": 1,
        "snapshot_backend": "none",
    }
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def bundled_server() -> Iterator[RnnServer]:
    with server_in_thread(bundled_settings()) as server:
        yield server


@pytest.fixture
def target(bundled_server: RnnServer) -> str:
    return f"127.0.0.1:{bundled_server.grpc_port}"


def run_demo(target: str, model: str, *flags: str) -> StreamedDemo:
    args = build_parser().parse_args(
        ["stream", "--target", target, "--model", model, "--chunk", str(CHUNK), *flags]
    )
    with Client(target, timeout_s=30) as client:
        return stream_demo(client, args)


def documented(model: str) -> dict[str, Any]:
    metadata = json.loads((ROOT / "models" / model / "1" / "model.json").read_text())
    test: dict[str, Any] = metadata["metrics"]["test"]
    return test


def assert_within_documented(model: str, demo: StreamedDemo) -> None:
    """The task's measure on the demo is within the model's documented test-set performance."""
    test, score = documented(model), demo.score
    if demo.task == "adding":  # every sequence within the tolerance; MSE of the recorded order
        assert score.measure("sequences wrong (|error| >= 0.04)") == test["errors"] == 0
        assert score.measure("MSE at the last step") <= 3 * test["mse"] + 1e-4
    elif demo.task == "temporal_order":  # 0 of 2560 wrong documented: every class right here
        assert test["errors"] == 0
        assert score.measure("accuracy (argmax at the last step)") == 1.0
        assert score.measure("every probability within 0.3 of the one-hot class") == 20
    elif demo.task == "timer":  # at most one pulse of ~40 more wrong than the documented rate
        assert score.measure("pulses correct") >= test["pulse_accuracy"] - 1 / 40
        assert score.measure("stream MSE") <= 3 * test["mse"] + 1e-4
    else:  # co2: the same series streamed the same way as the test: the same RMSE
        assert demo.task == "co2"
        rmse = score.measure("one-week-ahead forecast RMSE")
        assert rmse == pytest.approx(test["rmse_ppm"], abs=1e-3)
        naive = score.measure("seasonal-naive RMSE (the reading 52 weeks before)")
        assert naive == pytest.approx(test["seasonal_naive_rmse_ppm"], abs=1e-6)
        assert rmse < naive


def test_every_bundled_model_has_a_demo() -> None:
    assert BUNDLED == [
        "adding_gru", "adding_lstm", "co2_lstm", "temporal_order_gru", "temporal_order_lstm",
        "timer_gru", "timer_lstm",
    ]  # fmt: skip


@pytest.mark.parametrize("model", BUNDLED)
def test_demo_scores_within_the_documented_test_performance(
    target: str, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = run_demo(target, model)
    assert_within_documented(model, demo)
    print_demo(demo, CHUNK, show=3)
    printed = capsys.readouterr().out
    # Every measure is printed beside the documented figure it is compared with.
    assert printed.count("(test set: ") == len(demo.score.measures) >= 2
    assert "not recorded" not in printed


def test_sequence_demos_stream_each_sequence_in_its_own_closed_session(
    bundled_server: RnnServer, target: str
) -> None:
    def closed() -> float:
        labels = {"model": "adding_lstm", "version": "1", "reason": "closed"}
        value = bundled_server.metrics.registry.get_sample_value(
            "rnnserve_sessions_ended_total", labels
        )
        return value or 0.0

    before = closed()
    demo = run_demo(target, "adding_lstm", "--sequences", "3", "--seed", "7")
    assert len(demo.plan.sequences) == 3
    assert all(100 <= len(s) <= 110 for s in demo.plan.sequences)  # the trained lengths
    assert closed() == before + 3  # each sequence's session was closed, none left open
    assert len(bundled_server.engine.registry.get("adding_lstm").store) == 0


def test_a_length_outside_the_trained_range_says_so(target: str) -> None:
    demo = run_demo(target, "adding_lstm", "--steps", "600", "--sequences", "2")
    assert any("trained and tested on 100-110 steps" in note for note in demo.plan.notes)
    assert {len(s) for s in demo.plan.sequences} == {600}


def test_demo_inputs_are_deterministic_and_follow_the_task() -> None:
    metadata = json.loads((ROOT / "models" / "temporal_order_lstm/1/model.json").read_text())
    first = plan_for("temporal_order", metadata, seed=3)
    again = plan_for("temporal_order", metadata, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first.sequences, again.sequences, strict=True))
    for x in first.sequences:
        symbols = x.argmax(axis=1)
        assert symbols[0] == 0 and symbols[-1] == 1  # E ... B
        marked = np.flatnonzero(symbols >= 6)  # X or Y at t1 in [10, 20] and t2 in [50, 60]
        assert len(marked) == 2 and 9 <= marked[0] <= 19 and 49 <= marked[1] <= 59


def test_the_packaged_co2_series_is_the_one_the_model_trained_on() -> None:
    weeks, ppm = co2_weeks()
    config = json.loads((ROOT / "models" / "co2_lstm/1/model.json").read_text())["task_config"]
    assert len(ppm) == config["weeks"] == 2284 and not np.isnan(ppm).any()
    assert weeks[0] == "1958-03-29" and weeks[-1] == "2001-12-29"
    change = np.diff(ppm)
    scale = change[: config["train_weeks"] - 1].std()
    assert scale == pytest.approx(config["scale_ppm"], rel=1e-12)


@pytest.mark.parametrize(
    ("model", "flags", "message"),
    [
        ("timer_lstm", ["--sequences", "3"], "--sequences does not apply"),
        ("co2_lstm", ["--steps", "100"], "--steps and --sequences do not apply"),
        ("adding_lstm", ["--steps", "20"], "need at least 50 steps"),
        ("temporal_order_gru", ["--steps", "60"], "need at least 61 steps"),
        ("adding_lstm", ["--task", "reber"], "trained on task 'adding'; --task reber"),
    ],
)
def test_settings_that_do_not_fit_the_task_are_refused(
    target: str, model: str, flags: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_demo(target, model, *flags)


def test_a_task_without_a_demo_is_refused_naming_those_with_one() -> None:
    with pytest.raises(ValueError, match="no demo for task 'reber'; demos exist for timer"):
        plan_for("reber", {})
