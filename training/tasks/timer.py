"""Jaeger's timer: hold an output for a duration given with a trigger, over an endless stream.

Inputs per step: ``u1`` (1 on the trigger step, else 0) and ``u2`` (the duration code in
{0.1, ..., 1.0} on the trigger step, else 0). The target is 0.5 for ``scale * u2`` steps starting at
the trigger step and 0 otherwise. Pulses never overlap; between them the stream idles for a random
gap. The model sees one endless stream and is never reset, exactly as the service streams it.

Success criterion (ours, documented in docs/TRAINING.md): on a fresh stream of at least 200 pulses,
a pulse is correct when the output crosses 0.25 at the trigger step (onset error within
max(1, 5% of the duration) steps) and falls below 0.25 within the same tolerance of the pulse end;
the task is solved when at least 99% of pulses are correct and the stream MSE is below 0.01.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from training.tasks.base import Batch, Evaluation, Task, to_tensor
from training.tasks.streams import EventStream, make_lanes, restart, take_lanes

LEVEL = 0.5
THRESHOLD = 0.25
CODES = np.round(np.arange(1, 11) / 10.0, 1)


class TimerStream(EventStream):
    """Gap, trigger, pulse; gap, trigger, pulse; ... Each event is one gap followed by one pulse."""

    def __init__(self, rng: np.random.Generator, scale: int) -> None:
        super().__init__(rng)
        self.scale = scale
        self.min_gap = max(2, scale // 10)
        self.max_gap = max(self.min_gap + 1, (6 * scale) // 10)

    def next_event(self) -> tuple[np.ndarray, np.ndarray]:
        gap = int(self.rng.integers(self.min_gap, self.max_gap + 1))
        code = float(self.rng.choice(CODES))
        duration = round(code * self.scale)
        length = gap + duration
        x = np.zeros((length, 2), dtype=np.float32)
        y = np.zeros((length, 1), dtype=np.float32)
        x[gap, 0] = 1.0
        x[gap, 1] = code
        y[gap:, 0] = LEVEL
        return x, y


def judge_pulses(x: np.ndarray, y: np.ndarray, pred: np.ndarray, scale: int) -> tuple[int, int]:
    """Count (correct, total) pulses in one lane: x [T, 2], y and pred [T]."""
    triggers = np.flatnonzero(x[:, 0] > 0.5)
    correct = 0
    total = 0
    above = pred > THRESHOLD
    for i, start in enumerate(triggers):
        duration = round(float(x[start, 1]) * scale)
        end = start + duration  # first step after the pulse
        window_end = triggers[i + 1] if i + 1 < len(triggers) else len(pred)
        if end >= window_end:
            continue  # pulse cut off by the end of the stream
        total += 1
        tol = max(1, round(0.05 * duration))
        segment = above[start:window_end]
        on = np.flatnonzero(segment)
        if len(on) == 0:
            continue
        onset = int(on[0])
        off = np.flatnonzero(~segment[onset:])
        offset = onset + int(off[0]) if len(off) else len(segment)
        if onset <= tol and abs(offset - duration) <= tol and not segment[offset:].any():
            correct += 1
    return correct, total


class TimerTask(Task):
    name = "timer"
    input_size = 2
    output_size = 1
    output_kind = "regression"
    stateful = True
    lane_restart_probability = 0.02  # mean lane age: 50 chunks
    description = "Jaeger's timer: output 0.5 for scale*u2 steps after each trigger, never reset."
    criterion = (
        ">= 99% of pulses with onset and offset within max(1, 5% of duration) steps, and stream "
        "MSE < 0.01, on a fresh stream never reset"
    )

    def __init__(
        self, scale: int = 100, chunk_length: int = 200, test_lanes: int = 8, test_steps: int = 4000
    ) -> None:
        self.scale = scale
        self.chunk_length = chunk_length
        self.test_lanes = test_lanes
        self.test_steps = test_steps
        self._lanes: list[EventStream] = []

    def config(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "level": LEVEL,
            "threshold": THRESHOLD,
            "chunk_length": self.chunk_length,
        }

    def _factory(self, rng: np.random.Generator) -> EventStream:
        return TimerStream(rng, self.scale)

    def reset_streams(self, batch_size: int, rng: np.random.Generator) -> None:
        self._lanes = make_lanes(self._factory, batch_size, rng)

    def restart_lanes(self, lanes: np.ndarray, rng: np.random.Generator) -> None:
        restart(self._lanes, lanes, self._factory, rng)

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        if len(self._lanes) != batch_size:
            self.reset_streams(batch_size, rng)
        x, y = take_lanes(self._lanes, self.chunk_length)
        return Batch(x=to_tensor(x), y=to_tensor(y), mask=torch.ones(x.shape[:2]))

    def test_stream(self, seed: int, lanes: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        return take_lanes(make_lanes(self._factory, lanes, np.random.default_rng(seed)), steps)

    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        x, y = self.test_stream(seed, self.test_lanes, self.test_steps)
        with torch.no_grad():
            pred, _ = model(to_tensor(x))
        pred_np = pred[..., 0].numpy()
        correct = total = 0
        for lane in range(len(x)):
            c, t = judge_pulses(x[lane], y[lane, :, 0], pred_np[lane], self.scale)
            correct += c
            total += t
        mse = float(np.mean((pred_np - y[..., 0]) ** 2))
        wrong = total - correct
        return Evaluation(
            solved=total > 0 and correct >= 0.99 * total and mse < 0.01,
            errors=wrong,
            total=total,
            mse=mse,
            metrics={
                "pulse_accuracy": correct / max(total, 1),
                "steps": float(x.shape[0] * x.shape[1]),
            },
        )
