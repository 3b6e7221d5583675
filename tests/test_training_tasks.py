"""Properties of the task generators, checked against their published definitions."""

from __future__ import annotations

import numpy as np

from training.tasks.adding import CONSTANT_BASELINE_MSE, AddingTask, generate_adding
from training.tasks.co2 import SEASON_WEEKS, CO2Task, load_co2_ppm
from training.tasks.reber import INDEX, SYMBOLS, ReberStream, embedded_reber_string, reber_string
from training.tasks.temporal_order import generate_temporal_order
from training.tasks.timer import TimerStream, TimerTask, judge_pulses


def test_adding_markers_values_and_targets() -> None:
    rng = np.random.default_rng(0)
    seqs = generate_adding(4000, 105, 100, rng)
    values, markers = seqs.x[..., 0], seqs.x[..., 1]
    assert seqs.x.shape == (4000, 105, 2)
    assert (np.abs(values) <= 1).all()
    plus = markers == 1.0
    assert (plus.sum(axis=1) == 2).all()
    positions = np.argwhere(plus)[:, 1].reshape(-1, 2)
    assert (positions[:, 0] < 10).all()  # the first marked pair is among the first ten
    assert (positions[:, 1] < 100 // 2 - 1).all()  # the second among the first T/2 - 1
    first_pair_unmarked = ~plus[:, 0]
    assert (markers[first_pair_unmarked, 0] == -1).all()
    last_pair_unmarked = ~plus[:, -1]
    assert (markers[last_pair_unmarked, -1] == -1).all()
    rows = np.arange(4000)[:, None]
    x1x2 = values[rows, positions].sum(axis=1)
    np.testing.assert_allclose(seqs.target, 0.5 + x1x2 / 4.0, atol=1e-6)
    # A marked first pair counts as zero, as in the paper.
    marked_first = plus[:, 0]
    assert marked_first.any() and (values[marked_first, 0] == 0).all()
    # Predicting 0.5 always gives the published baseline MSE of ~0.0417.
    assert abs(np.mean((seqs.target - 0.5) ** 2) - CONSTANT_BASELINE_MSE) < 0.003


def test_adding_lengths_span_t_to_t_plus_tenth() -> None:
    task = AddingTask(length=100)
    rng = np.random.default_rng(1)
    lengths = {task.train_batch(2, rng).x.shape[1] for _ in range(400)}
    assert min(lengths) == 100 and max(lengths) == 110


def test_temporal_order_layout_and_class_balance() -> None:
    x, labels = generate_temporal_order(8000, 104, np.random.default_rng(2))
    symbols = x.argmax(axis=-1)
    assert (x.sum(axis=-1) == 1).all()
    assert (symbols[:, 0] == 0).all() and (symbols[:, -1] == 1).all()  # E ... B
    xy = np.argwhere(symbols >= 6)
    assert (np.bincount(xy[:, 0]) == 2).all()
    t1, t2 = xy[:, 1].reshape(-1, 2).T + 1  # 1-based, as in the paper
    assert t1.min() >= 10 and t1.max() <= 20 and t2.min() >= 50 and t2.max() <= 60
    order = (symbols[np.arange(8000), t1 - 1] - 6) * 2 + (symbols[np.arange(8000), t2 - 1] - 6)
    np.testing.assert_array_equal(order, labels)
    counts = np.bincount(labels, minlength=4)
    assert (np.abs(counts / 8000 - 0.25) < 0.03).all()
    filler = np.isin(symbols[:, 1:-1], [2, 3, 4, 5, 6, 7])
    assert filler.all()


def test_timer_pulses_follow_their_codes() -> None:
    stream = TimerStream(np.random.default_rng(3), scale=100)
    x, y = stream.take(20_000)
    triggers = np.flatnonzero(x[:, 0] == 1)
    assert len(triggers) > 50
    codes = x[triggers, 1]
    tenths = codes * 10
    np.testing.assert_allclose(tenths, np.round(tenths), atol=1e-5)
    assert set(np.round(tenths).astype(int)) == set(range(1, 11))
    for t, code in zip(triggers[:-1], codes[:-1], strict=True):
        duration = round(code * 100)
        assert (y[t : t + duration, 0] == 0.5).all()
        assert y[t + duration, 0] == 0.0
    assert (x[:, 1][x[:, 0] == 0] == 0).all()  # u2 only with the trigger


def test_timer_stream_chunks_continue_exactly() -> None:
    whole = TimerStream(np.random.default_rng(4), scale=100).take(3000)
    chunked = TimerStream(np.random.default_rng(4), scale=100)
    parts = [chunked.take(n) for n in (7, 993, 1000, 1000)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])


def test_timer_judge_accepts_the_target_and_rejects_a_late_offset() -> None:
    task = TimerTask()
    x, y = task.test_stream(seed=5, lanes=1, steps=3000)
    correct, total = judge_pulses(x[0], y[0, :, 0], y[0, :, 0], 100)
    assert correct == total > 10
    late = y[0, :, 0].copy()
    first = int(np.flatnonzero(x[0, :, 0])[0])
    end = first + round(float(x[0, first, 1]) * 100)
    late[end : end + 10] = 0.5
    correct_late, _ = judge_pulses(x[0], y[0, :, 0], late, 100)
    assert correct_late == total - 1


def test_reber_strings_follow_the_grammar() -> None:
    rng = np.random.default_rng(6)
    for _ in range(500):
        symbols, successors = embedded_reber_string(rng)
        assert symbols[0] == "B" and symbols[-1] == "E"
        assert symbols[1] in "TP" and symbols[-2] == symbols[1]  # the long-lag dependency
        for symbol, nxt in zip(symbols[1:], successors[:-1], strict=True):
            assert symbol in nxt
        inner, _ = reber_string(rng)
        assert inner[0] == "B" and inner[-1] == "E"


def test_reber_stream_targets_are_successor_sets() -> None:
    x, y = ReberStream(np.random.default_rng(7)).take(5000)
    assert x.shape == (5000, len(SYMBOLS)) and (x.sum(axis=1) == 1).all()
    nxt = x[1:].argmax(axis=1)
    assert (y[:-1, :-1][np.arange(4999), nxt] == 1).all()  # the real next symbol is always allowed
    starts = np.flatnonzero(y[:, -1] == 1)  # first symbol of each embedded string
    assert len(starts) > 100 and (x[starts, INDEX["B"]] == 1).all()
    assert (x[starts[1:] - 1, INDEX["E"]] == 1).all()  # strings are laid end to end


def test_co2_series_and_baselines() -> None:
    readings = load_co2_ppm()
    assert len(readings) == 2284 and not np.isnan(readings).any()
    assert 310 < readings[0] < 320 and 365 < readings[-1] < 375
    task = CO2Task()
    batch = task.train_batch(8, np.random.default_rng(8))
    assert batch.x.shape == (8, task.window_weeks, 1)
    assert float(batch.mask[:, :SEASON_WEEKS].sum()) == 0.0
    np.testing.assert_allclose(batch.x[:, 1:, 0].numpy(), batch.y[:, :-1, 0].numpy())
