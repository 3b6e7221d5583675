"""Temporal order, experiment 6a of Hochreiter & Schmidhuber (1997).

Eight one-hot symbols {E, B, a, b, c, d, X, Y}. A sequence of 100-110 steps starts with E and ends
with B; the filler is drawn from {a, b, c, d}; X or Y stands at t1 in [10, 20] and at t2 in [50, 60]
(1-based, as in the paper). The class at the last step is the order: XX, XY, YX or YY. A sequence
is correct when every output (softmax probability) is within 0.3 of its one-hot target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from training.tasks.adding import STOP_MARGIN, last_step_batch
from training.tasks.base import Batch, Evaluation, Task, to_tensor

SYMBOLS = ("E", "B", "a", "b", "c", "d", "X", "Y")
CLASSES = ("XX", "XY", "YX", "YY")
TOLERANCE = 0.3


def generate_temporal_order(
    batch: int, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return one-hot inputs [B, L, 8] and class indices [B] for sequences of ``length`` steps."""
    symbols = rng.integers(2, 6, size=(batch, length))  # a, b, c, d
    symbols[:, 0] = 0  # E
    symbols[:, -1] = 1  # B
    rows = np.arange(batch)
    t1 = rng.integers(10, 21, size=batch) - 1
    t2 = rng.integers(50, 61, size=batch) - 1
    first_is_y = rng.integers(0, 2, size=batch)
    second_is_y = rng.integers(0, 2, size=batch)
    symbols[rows, t1] = 6 + first_is_y
    symbols[rows, t2] = 6 + second_is_y
    x = np.eye(len(SYMBOLS), dtype=np.float32)[symbols]
    return x, (2 * first_is_y + second_is_y).astype(np.int64)


class TemporalOrderTask(Task):
    name = "temporal_order"
    input_size = len(SYMBOLS)
    output_size = len(CLASSES)
    output_kind = "class_logits"
    description = "Temporal order 6a: classify the order of two widely separated symbols (X/Y)."
    criterion = (
        "a sequence is correct if every softmax output is within 0.3 of its one-hot target at the "
        "last step; solved with at most 3 wrong of 2560"
    )

    def __init__(
        self,
        min_length: int = 100,
        max_length: int = 110,
        test_sequences: int = 2560,
        max_wrong: int = 3,
    ) -> None:
        self.min_length = min_length
        self.max_length = max_length
        self.test_sequences = test_sequences
        self.max_wrong = max_wrong

    def config(self) -> dict[str, Any]:
        return {
            "min_length": self.min_length,
            "max_length": self.max_length,
            "symbols": list(SYMBOLS),
            "classes": list(CLASSES),
            "tolerance": TOLERANCE,
        }

    def ready_to_stop(self, validation: Evaluation) -> bool:
        # A margin in error size, as for the adding problem: every output within 3/4 of 0.3.
        return validation.metrics["max_deviation"] < STOP_MARGIN * TOLERANCE

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        length = int(rng.integers(self.min_length, self.max_length + 1))
        x, labels = generate_temporal_order(batch_size, length, rng)
        return last_step_batch(x, np.eye(len(CLASSES), dtype=np.float32)[labels])

    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(self.min_length, self.max_length + 1, size=self.test_sequences)
        wrong = 0
        worst = 0.0
        squared: list[np.ndarray] = []
        for length in np.unique(lengths):
            count = int((lengths == length).sum())
            x, labels = generate_temporal_order(count, int(length), rng)
            with torch.no_grad():
                y, _ = model(to_tensor(x))
            probs = torch.softmax(y[:, -1], dim=-1).numpy()
            target = np.eye(len(CLASSES), dtype=np.float32)[labels]
            deviation = np.abs(probs - target)
            wrong += int((deviation.max(axis=1) >= TOLERANCE).sum())
            worst = max(worst, float(deviation.max()))
            squared.append(((probs - target) ** 2).mean(axis=1))
        return Evaluation(
            solved=wrong <= self.max_wrong,
            errors=wrong,
            total=self.test_sequences,
            mse=float(np.concatenate(squared).mean()),
            metrics={"max_deviation": worst},
        )
