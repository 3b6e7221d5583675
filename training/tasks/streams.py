"""Endless streams for tasks that are never reset: one stream per batch lane, consumed in chunks."""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np


class EventStream(abc.ABC):
    """A stream built from self-contained events (a timer pulse, a Reber string) laid end to end.

    ``take(n)`` returns the next ``n`` steps of inputs and targets, generating events as needed, so
    consecutive calls continue exactly where the previous one stopped.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._buffered = 0

    @abc.abstractmethod
    def next_event(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs [L, F] and targets [L, O] of the next event."""

    def take(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        while self._buffered < steps:
            x, y = self.next_event()
            self._x.append(x)
            self._y.append(y)
            self._buffered += len(x)
        x_all = np.concatenate(self._x)
        y_all = np.concatenate(self._y)
        self._x, self._y = [x_all[steps:]], [y_all[steps:]]
        self._buffered -= steps
        return x_all[:steps], y_all[:steps]


def take_lanes(streams: list[EventStream], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The next ``steps`` of every lane, stacked to [lanes, steps, ...]."""
    parts = [stream.take(steps) for stream in streams]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def restart(
    streams: list[EventStream],
    lanes: np.ndarray,
    factory: Callable[[np.random.Generator], EventStream],
    rng: np.random.Generator,
) -> None:
    """Replace the streams of ``lanes`` with fresh ones."""
    for lane, stream in zip(lanes, make_lanes(factory, len(lanes), rng), strict=True):
        streams[int(lane)] = stream


def make_lanes(
    factory: Callable[[np.random.Generator], EventStream], lanes: int, rng: np.random.Generator
) -> list[EventStream]:
    """``lanes`` independent streams, each with its own generator spawned from ``rng``."""
    return [factory(np.random.default_rng(seed)) for seed in rng.integers(0, 2**63, size=lanes)]
