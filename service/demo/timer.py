"""Jaeger's timer: the demo of ``rnnserve stream`` (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.demo.base import (
    DemoPlan,
    DemoScore,
    Measure,
    check_steps,
    config,
    test_metrics,
)
from service.errors import UsageError

TIMER_STEPS_DEFAULT = 4000  # one lane of the timer's test stream


def timer_stream(
    steps: int, scale: int, level: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Gap, trigger, pulse, ... (as training/tasks/timer.py): inputs [steps, 2], targets [steps]."""
    x = np.zeros((steps, 2), np.float32)
    y = np.zeros(steps, np.float32)
    min_gap = max(2, scale // 10)
    max_gap = max(min_gap + 1, (6 * scale) // 10)
    t = 0
    while True:
        t += int(rng.integers(min_gap, max_gap + 1))
        if t >= steps:
            return x, y
        code = round(int(rng.integers(1, 11)) / 10.0, 1)
        duration = round(code * scale)
        x[t] = (1.0, code)
        y[t : t + duration] = level
        t += duration


@dataclass(frozen=True)
class Pulse:
    """One pulse of the timer stream as the served output drew it."""

    trigger_step: int
    duration_steps: int
    onset_steps: int | None  # steps from the trigger to the output crossing the threshold
    length_steps: int | None  # steps the output stayed above it
    correct: bool


def judge_pulses(
    x: np.ndarray, prediction: np.ndarray, scale: int, threshold: float
) -> list[Pulse]:
    """The timer's criterion per pulse: the output crosses ``threshold`` at the trigger and falls
    below it at the pulse's end, each within max(1, 5% of the duration) steps, and stays below
    until the next trigger. Pulses cut off by the end of the stream are not judged."""
    triggers = np.flatnonzero(x[:, 0] > 0.5)
    above = prediction > threshold
    pulses = []
    for i, start in enumerate(triggers):
        duration = round(float(x[start, 1]) * scale)
        window_end = int(triggers[i + 1]) if i + 1 < len(triggers) else len(prediction)
        if start + duration >= window_end:
            continue
        tolerance = max(1, round(0.05 * duration))
        segment = above[start:window_end]
        on = np.flatnonzero(segment)
        if len(on) == 0:
            pulses.append(Pulse(int(start), duration, None, None, False))
            continue
        onset = int(on[0])
        off = np.flatnonzero(~segment[onset:])
        offset = onset + int(off[0]) if len(off) else len(segment)
        correct = (
            onset <= tolerance
            and abs(offset - duration) <= tolerance
            and not segment[offset:].any()
        )
        pulses.append(Pulse(int(start), duration, onset, offset - onset, bool(correct)))
    return pulses


def pulse_row(pulse: Pulse) -> tuple[str, ...]:
    """A row of the timer's table: the pulse and where the served output drew it."""
    if pulse.onset_steps is None:
        drawn = "never"
    else:
        first = pulse.trigger_step + pulse.onset_steps
        drawn = f"steps {first}-{first + (pulse.length_steps or 0) - 1}"
    return (
        str(pulse.trigger_step),
        str(pulse.duration_steps),
        drawn,
        "yes" if pulse.correct else "NO",
    )


def stream_mse_documented(test: Mapping[str, Any]) -> str:
    """The timer's documented stream MSE and the steps of its test stream."""
    if "mse" not in test:
        return "not recorded"
    over = f" over {int(test['steps'])} steps" if "steps" in test else ""
    return f"{float(test['mse']):.2e}{over}"


def timer_plan(
    metadata: Mapping[str, Any], steps: int | None, count: int | None, rng: np.random.Generator
) -> DemoPlan:
    """One stream of ``steps`` (default one test lane, 4000); the measures are the fraction of
    pulses the timer's criterion accepts and the stream MSE."""
    if count is not None:
        raise UsageError(
            "the timer is one endless stream: --sequences does not apply (use --steps)"
        )
    cfg = config(metadata)
    scale = int(cfg.get("scale", 100))
    check_steps("timer", steps, scale, "room for at least one trigger and its pulse")
    level = float(cfg.get("level", 0.5))
    threshold = float(cfg.get("threshold", 0.25))
    x, y = timer_stream(steps or TIMER_STEPS_DEFAULT, scale, level, rng)
    test = test_metrics(metadata)

    def score(outputs: list[np.ndarray]) -> DemoScore:
        prediction = outputs[0][:, 0]
        pulses = judge_pulses(x, prediction, scale, threshold)
        correct = sum(p.correct for p in pulses)
        accuracy = correct / len(pulses) if pulses else math.nan
        mse = float(np.mean((prediction - y) ** 2))
        pulse_doc = "not recorded"
        if "pulse_accuracy" in test and "errors" in test and "total" in test:
            total = int(test["total"])
            pulse_doc = (
                f"{float(test['pulse_accuracy']):.3f}, {total - int(test['errors'])} of {total}"
            )
        return DemoScore(
            measures=[
                Measure(
                    "pulses correct",
                    accuracy,
                    f"{accuracy:.3f}, {correct} of {len(pulses)} pulses",
                    pulse_doc,
                ),
                Measure(
                    "stream MSE",
                    mse,
                    f"{mse:.2e} over {len(y)} steps",
                    stream_mse_documented(test),
                ),
            ],
            header=("trigger step", "duration", f"output above {threshold:g}", "correct"),
            rows=[pulse_row(p) for p in pulses],
            x_label="step",
            curves={"target": y, "served prediction": prediction, "trigger (u1)": x[:, 0]},
        )

    return DemoPlan(
        "timer",
        f"output {level:g} for {scale}*u2 steps after each trigger, over one stream never reset",
        [x],
        score,
        [
            f"criterion per pulse: onset and end within max(1, 5% of the duration) steps, "
            f"threshold {threshold:g}"
        ],
    )
