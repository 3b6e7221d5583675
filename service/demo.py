"""Demo input streams for ``rnnserve stream``, with the targets the bundled models were trained on.

numpy only: this runs on the serving side, where torch is not installed. The generators follow the
task definitions in training/ (docs/TRAINING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DemoStream:
    inputs: np.ndarray  # [steps, features]
    targets: np.ndarray  # [steps, outputs]; NaN where the task sets no target
    description: str


def timer_stream(steps: int, rng: np.random.Generator, scale: int = 100) -> DemoStream:
    """Triggers with duration codes u2 in {0.1..1}; target 0.5 for scale*u2 steps from the trigger."""
    x = np.zeros((steps, 2), np.float32)
    y = np.zeros((steps, 1), np.float32)
    t = 0
    while True:
        t += int(rng.integers(scale // 10, (6 * scale) // 10 + 1))
        if t >= steps:
            break
        code = round(float(rng.integers(1, 11)) / 10.0, 1)
        x[t] = (1.0, code)
        y[t : t + round(code * scale), 0] = 0.5
        t += round(code * scale)
    return DemoStream(x, y, "timer: output 0.5 for 100*u2 steps after each trigger")


def adding_stream(steps: int, rng: np.random.Generator) -> DemoStream:
    """One adding-problem sequence (1997 encoding); the target is defined at the last step only."""
    values = rng.uniform(-1, 1, steps).astype(np.float32)
    markers = np.zeros(steps, np.float32)
    markers[0] = markers[-1] = -1.0
    first = int(rng.integers(1, 10))
    second = int(rng.integers(10, max(11, steps // 2 - 1)))
    markers[first] = markers[second] = 1.0
    y = np.full((steps, 1), np.nan, np.float32)
    y[-1, 0] = 0.5 + (values[first] + values[second]) / 4.0
    return DemoStream(
        np.stack([values, markers], 1), y, "adding: 0.5 + (X1 + X2)/4 at the last step"
    )


def temporal_order_stream(steps: int, rng: np.random.Generator) -> DemoStream:
    """One temporal-order sequence: class of the X/Y order at the last step (XX, XY, YX, YY)."""
    symbols = rng.integers(2, 6, steps)
    symbols[0], symbols[-1] = 0, 1
    a, b = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    symbols[int(rng.integers(9, 20))] = 6 + a
    symbols[int(rng.integers(49, 60))] = 6 + b
    y = np.full((steps, 4), np.nan, np.float32)
    y[-1] = np.eye(4, dtype=np.float32)[2 * a + b]
    return DemoStream(
        np.eye(8, dtype=np.float32)[symbols], y, "temporal order: class at the last step"
    )


DEMOS = {"timer": timer_stream, "adding": adding_stream, "temporal_order": temporal_order_stream}


def demo_for_task(task: str, steps: int, seed: int) -> DemoStream:
    try:
        make = DEMOS[task]
    except KeyError:
        raise ValueError(
            f"no demo stream for task {task!r}; demos exist for {', '.join(DEMOS)}"
        ) from None
    return make(steps, np.random.default_rng(seed))
