"""The adding problem: the demo of ``rnnserve stream`` (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.demo.base import (
    DemoPlan,
    DemoScore,
    Measure,
    check_steps,
    config,
    documented,
    lengths_for,
    sequence_count,
    test_metrics,
)


def adding_sequence(
    length: int, trained_length: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """One adding-problem sequence (1997 encoding, as training/tasks/adding.py) and its target."""
    values = rng.uniform(-1.0, 1.0, length).astype(np.float32)
    markers = np.zeros(length, np.float32)
    markers[0] = markers[-1] = -1.0
    first = int(rng.integers(0, 10))
    second_range = max(trained_length // 2 - 1, 2)
    second = first
    while second == first:
        second = int(rng.integers(0, second_range))
    markers[first] = markers[second] = 1.0
    if 0 in (first, second):
        values[0] = 0.0  # a marked first pair counts as zero, as in the paper
    target = float(np.float32(0.5 + (values[first] + values[second]) / 4.0))
    return np.stack([values, markers], 1), target


def adding_plan(
    metadata: Mapping[str, Any], steps: int | None, count: int | None, rng: np.random.Generator
) -> DemoPlan:
    """Sequences of the trained lengths; the measure is the MSE at the last step and the count
    of sequences off by the task's tolerance or more."""
    cfg = config(metadata)
    trained = int(cfg.get("length", 100))
    tolerance = float(cfg.get("tolerance", 0.04))
    second_range = max(trained // 2 - 1, 2)
    check_steps(
        "adding", steps, second_range + 1, f"the second marker stands in the first {second_range}"
    )
    high = int(cfg.get("max_length", trained))
    lengths, notes = lengths_for(steps, trained, high, sequence_count(count), rng)
    pairs = [adding_sequence(n, trained, rng) for n in lengths]
    targets = np.array([t for _, t in pairs])
    test = test_metrics(metadata)

    def score(outputs: list[np.ndarray]) -> DemoScore:
        predicted = np.array([float(y[-1, 0]) for y in outputs])
        error = predicted - targets
        mse = float(np.mean(error**2))
        wrong = int((np.abs(error) >= tolerance).sum())
        wrong_doc = f"{test['errors']} of {test['total']}" if "errors" in test else "not recorded"
        return DemoScore(
            measures=[
                Measure(
                    "MSE at the last step",
                    mse,
                    f"{mse:.2e} over {len(outputs)} sequences",
                    documented(test, "mse", ".2e"),
                ),
                Measure(
                    f"sequences wrong (|error| >= {tolerance:g})",
                    wrong,
                    f"{wrong} of {len(outputs)}",
                    wrong_doc,
                ),
            ],
            header=("sequence", "steps", "target", "prediction", "error"),
            rows=[
                (
                    str(i),
                    str(len(y)),
                    f"{targets[i]:.3f}",
                    f"{predicted[i]:.3f}",
                    f"{error[i]:+.4f}",
                )
                for i, y in enumerate(outputs)
            ],
            x_label="sequence",
            curves={"target": targets, "served prediction": predicted},
            markers=True,
        )

    return DemoPlan(
        "adding",
        "0.5 + (X1 + X2)/4 at the last step",
        [x for x, _ in pairs],
        score,
        notes,
    )
