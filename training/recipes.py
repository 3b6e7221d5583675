"""The experiments behind the results table and the bundled models, in one list.

``python -m training experiments`` runs them all; ``python -m training bundle`` runs only those
marked for the model repository and exports them. Same seeds, same settings, same results (up to the
wall-time budget, which stops a run early on a slower machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.models import CellType, InitMode


@dataclass(frozen=True)
class Experiment:
    """One training run: a task, a cell, and the settings it was run with."""

    task: str
    cell: CellType
    hidden_size: int = 32
    num_layers: int = 1
    init: InitMode = "keep"
    forget_gate: bool = True
    batch_size: int = 64
    learning_rate: float = 3e-3
    max_steps: int = 20_000
    max_seconds: float = 290.0
    eval_every: int = 200
    early_stop: bool = True
    seed: int = 0
    task_options: dict[str, Any] = field(default_factory=dict)
    bundle_as: str | None = None

    @property
    def run_name(self) -> str:
        variant = "" if self.forget_gate else "_nofg"
        init = "" if self.init == "keep" else f"_{self.init}init"
        return f"{self.task}-{self.cell}{variant}{init}"


SEQUENCE_SECONDS = 290.0  # the acceptance budget is 5 minutes per LSTM/GRU run
# Stream tasks get the same budget in optimizer steps for every cell (GRU steps cost ~2.5x LSTM
# steps on a CPU), with a wall-time cap that only a much slower machine reaches.
STREAM_STEPS = 8000
STREAM_SECONDS = 1500.0

EXPERIMENTS: tuple[Experiment, ...] = (
    # Adding problem, T = 100 (1997 encoding).
    Experiment("adding", "lstm", bundle_as="adding_lstm", max_seconds=SEQUENCE_SECONDS),
    Experiment("adding", "gru", bundle_as="adding_gru", max_seconds=SEQUENCE_SECONDS),
    Experiment("adding", "rnn", max_seconds=SEQUENCE_SECONDS),
    Experiment("adding", "lstm", init="default", max_seconds=SEQUENCE_SECONDS),
    # Temporal order 6a.
    Experiment(
        "temporal_order", "lstm", bundle_as="temporal_order_lstm", max_seconds=SEQUENCE_SECONDS
    ),
    Experiment(
        "temporal_order", "gru", bundle_as="temporal_order_gru", max_seconds=SEQUENCE_SECONDS
    ),
    Experiment("temporal_order", "rnn", max_seconds=SEQUENCE_SECONDS),
    # Jaeger's timer, scale 100, one endless stream per lane.
    Experiment(
        "timer",
        "lstm",
        bundle_as="timer_lstm",
        max_steps=STREAM_STEPS,
        max_seconds=STREAM_SECONDS,
        eval_every=250,
    ),
    Experiment(
        "timer",
        "gru",
        bundle_as="timer_gru",
        max_steps=STREAM_STEPS,
        max_seconds=STREAM_SECONDS,
        eval_every=250,
    ),
    Experiment("timer", "rnn", max_steps=STREAM_STEPS, max_seconds=STREAM_SECONDS, eval_every=250),
    # Continual embedded Reber grammar: forget gate or not.
    Experiment("reber", "lstm", max_steps=STREAM_STEPS, max_seconds=STREAM_SECONDS, eval_every=250),
    Experiment(
        "reber",
        "lstm",
        forget_gate=False,
        max_steps=STREAM_STEPS,
        max_seconds=STREAM_SECONDS,
        eval_every=250,
    ),
    Experiment("reber", "gru", max_steps=STREAM_STEPS, max_seconds=STREAM_SECONDS, eval_every=250),
    Experiment("reber", "rnn", max_steps=STREAM_STEPS, max_seconds=STREAM_SECONDS, eval_every=250),
    # Mauna Loa CO2, one step ahead: fixed budget, no early stop.
    Experiment(
        "co2", "lstm", max_steps=1500, early_stop=False, eval_every=100, bundle_as="co2_lstm"
    ),
    Experiment("co2", "gru", max_steps=1500, early_stop=False, eval_every=100),
    Experiment("co2", "rnn", max_steps=1500, early_stop=False, eval_every=100),
)
