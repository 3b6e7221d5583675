"""Continual embedded Reber grammar (Gers, Schmidhuber & Cummins 2000, "Learning to forget").

Embedded Reber strings B (T|P) <Reber string> (T|P) E are laid end to end into one endless stream,
never reset. At every symbol the model predicts the set of symbols that may come next (multi-label,
seven sigmoid outputs thresholded at 0.5). The hard prediction is the second-to-last symbol of each
embedded string, which must repeat the T or P seen right after its first B, a lag of 5 to 30+ steps.
Without a forget gate the cell state of an LSTM grows without bound on such a stream and it fails.

Success criterion (documented in docs/TRAINING.md): on a fresh continual stream of at least
100,000 symbols from zero state, at most 0.1% of the embedded strings hold a wrong prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from training.tasks.base import Batch, Evaluation, Task, to_tensor
from training.tasks.streams import EventStream, make_lanes, restart, take_lanes

SYMBOLS = ("B", "T", "P", "S", "X", "V", "E")
INDEX = {s: i for i, s in enumerate(SYMBOLS)}
# The Reber graph: node -> list of (symbol, next node); node 5 is the exit before the final E.
REBER_GRAPH: dict[int, list[tuple[str, int]]] = {
    0: [("T", 1), ("P", 2)],
    1: [("S", 1), ("X", 3)],
    2: [("T", 2), ("V", 4)],
    3: [("X", 2), ("S", 5)],
    4: [("P", 3), ("V", 5)],
}
ERROR_RATE_LIMIT = 0.001


def reber_string(rng: np.random.Generator) -> tuple[list[str], list[set[str]]]:
    """One Reber string from its B to its E, with the successor set of every symbol but that E
    (what follows the E depends on the string around it)."""
    symbols = ["B"]
    successors: list[set[str]] = [{"T", "P"}]
    node = 0
    while node != 5:
        choices = REBER_GRAPH[node]
        symbol, node = choices[int(rng.integers(len(choices)))]
        symbols.append(symbol)
        successors.append({s for s, _ in REBER_GRAPH[node]} if node != 5 else {"E"})
    symbols.append("E")
    return symbols, successors


def embedded_reber_string(rng: np.random.Generator) -> tuple[list[str], list[set[str]]]:
    """B (T|P) <Reber string> (T|P) E, with successor sets; the string after the final E is a new B."""
    branch = "T" if rng.integers(2) == 0 else "P"
    inner, inner_successors = reber_string(rng)
    inner_successors.append({branch})  # after the inner E comes the remembered branch symbol
    symbols = ["B", branch, *inner, branch, "E"]
    successors = [{"T", "P"}, {"B"}, *inner_successors, {"E"}, {"B"}]
    return symbols, successors


class ReberStream(EventStream):
    """One embedded Reber string per event; the first step of each event is marked in a third column."""

    def next_event(self) -> tuple[np.ndarray, np.ndarray]:
        symbols, successors = embedded_reber_string(self.rng)
        x = np.zeros((len(symbols), len(SYMBOLS)), dtype=np.float32)
        y = np.zeros((len(symbols), len(SYMBOLS) + 1), dtype=np.float32)
        for t, (symbol, nxt) in enumerate(zip(symbols, successors, strict=True)):
            x[t, INDEX[symbol]] = 1.0
            for s in nxt:
                y[t, INDEX[s]] = 1.0
        y[0, -1] = 1.0  # string boundary marker, used by the evaluation only
        return x, y


class ReberTask(Task):
    name = "reber"
    input_size = len(SYMBOLS)
    output_size = len(SYMBOLS)
    output_kind = "multilabel_logits"
    stateful = True
    lane_restart_probability = 0.02  # mean lane age: 50 chunks
    description = (
        "Continual embedded Reber grammar: next-symbol sets over an endless, never-reset stream."
    )
    criterion = "at most 0.1% of embedded strings with any wrong prediction over >= 100,000 symbols"

    def __init__(
        self, chunk_length: int = 100, test_lanes: int = 10, test_steps: int = 10_000
    ) -> None:
        self.chunk_length = chunk_length
        self.test_lanes = test_lanes
        self.test_steps = test_steps
        self._lanes: list[EventStream] = []

    def config(self) -> dict[str, Any]:
        return {"symbols": list(SYMBOLS), "chunk_length": self.chunk_length}

    def reset_streams(self, batch_size: int, rng: np.random.Generator) -> None:
        self._lanes = make_lanes(ReberStream, batch_size, rng)

    def restart_lanes(self, lanes: np.ndarray, rng: np.random.Generator) -> None:
        restart(self._lanes, lanes, ReberStream, rng)

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        if len(self._lanes) != batch_size:
            self.reset_streams(batch_size, rng)
        x, y = take_lanes(self._lanes, self.chunk_length)
        return Batch(x=to_tensor(x), y=to_tensor(y[..., :-1]), mask=torch.ones(x.shape[:2]))

    def test_stream(self, seed: int, lanes: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        return take_lanes(make_lanes(ReberStream, lanes, np.random.default_rng(seed)), steps)

    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        x, y = self.test_stream(seed, self.test_lanes, self.test_steps)
        with torch.no_grad():
            logits, _ = model(to_tensor(x))
        probs = torch.sigmoid(logits).numpy()
        target = y[..., :-1]
        symbol_wrong = ((probs > 0.5) != (target > 0.5)).any(axis=-1)
        string_id = np.cumsum(y[..., -1], axis=1)  # 1, 1, ..., 2, 2, ... per lane
        wrong_strings = 0
        total_strings = 0
        for lane in range(len(x)):
            ids = string_id[lane].astype(np.int64)
            complete = ids < ids.max()  # the last string of the lane may be cut off
            wrong_per_string = np.bincount(ids[complete], weights=symbol_wrong[lane][complete])
            total_strings += int(ids.max()) - 1
            wrong_strings += int((wrong_per_string[1:] > 0).sum())
        rate = wrong_strings / max(total_strings, 1)
        return Evaluation(
            solved=rate <= ERROR_RATE_LIMIT,
            errors=wrong_strings,
            total=total_strings,
            mse=float(np.mean((probs - target) ** 2)),
            metrics={
                "symbol_error_rate": float(symbol_wrong.mean()),
                "string_error_rate": rate,
                "symbols": float(symbol_wrong.size),
            },
        )
