"""What every demo shares: its plan (sequences to stream and how to score them), its score and
measures, and the helpers that read a model's model.json."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import UsageError

SEQUENCES_DEFAULT = 20


@dataclass(frozen=True)
class Measure:
    """One figure of a demo run beside the model's documented test-set figure."""

    name: str
    value: float  # the number, for tests and scripts
    shown: str  # the value as printed, with what it was measured over
    documented: str  # the test-set figure from model.json, or "not recorded"

    def line(self) -> str:
        return f"{self.name}: {self.shown} (test set: {self.documented})"


@dataclass(frozen=True)
class DemoScore:
    """What a demo run measured, a table of examples and the curves for ``--plot``."""

    measures: list[Measure]
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    x_label: str
    curves: dict[str, np.ndarray]
    markers: bool = False  # one point per sequence: draw markers, not lines

    def measure(self, name: str) -> float:
        """The value of the measure called ``name``."""
        return next(m.value for m in self.measures if m.name == name)


Scorer = Callable[[list[np.ndarray]], DemoScore]


@dataclass(frozen=True)
class DemoPlan:
    """The sequences to stream, each in its own session from zero state, and how to score them."""

    task: str
    description: str
    sequences: list[np.ndarray]  # [steps, features] float32 each
    score: Scorer
    notes: list[str] = field(default_factory=list)

    def summary(self, chunk_steps: int) -> str:
        """One line on what was streamed."""
        lengths = sorted({len(s) for s in self.sequences})
        span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        total = sum(len(s) for s in self.sequences)
        if len(self.sequences) == 1:
            return f"streamed {total} steps in one session, in chunks of {chunk_steps}"
        return (
            f"streamed {len(self.sequences)} sequences of {span} steps ({total} steps), "
            f"each in its own session, in chunks of {chunk_steps}"
        )


def config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The model's ``task_config`` (empty when model.json has none)."""
    value = metadata.get("task_config")
    return dict(value) if isinstance(value, Mapping) else {}


def test_metrics(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The model's documented test-set metrics (empty when model.json has none)."""
    metrics = metadata.get("metrics")
    test = metrics.get("test") if isinstance(metrics, Mapping) else None
    return dict(test) if isinstance(test, Mapping) else {}


def documented(test: Mapping[str, Any], key: str, fmt: str, unit: str = "") -> str:
    """``test[key]`` formatted, with the size of the test set when model.json records it."""
    if key not in test:
        return "not recorded"
    over = f" over {test['total']}" if "total" in test else ""
    return f"{format(float(test[key]), fmt)}{unit}{over}"


def lengths_for(
    steps: int | None, low: int, high: int, count: int, rng: np.random.Generator
) -> tuple[list[int], list[str]]:
    """Sequence lengths: ``steps`` for every one when given, else drawn from the trained range;
    a note when ``steps`` is outside it."""
    if steps is None:
        return [int(n) for n in rng.integers(low, high + 1, size=count)], []
    notes = []
    if not low <= steps <= high:
        notes.append(
            f"note: the model was trained and tested on {low}-{high} steps; at {steps} it is "
            "outside what it learned, so expect larger errors"
        )
    return [steps] * count, notes


def sequence_count(count: int | None) -> int:
    """``count`` sequences, or the default number."""
    return SEQUENCES_DEFAULT if count is None else count


def check_steps(task: str, steps: int | None, minimum: int, why: str) -> None:
    """A ValueError (exit 2) when ``steps`` is too short for the task's sequences."""
    if steps is not None and steps < minimum:
        raise UsageError(f"{task} sequences need at least {minimum} steps ({why}); got {steps}")
