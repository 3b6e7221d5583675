"""What every task offers the trainer: batches, a loss, and an evaluation with a success criterion."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

OutputKind = Literal["regression", "class_logits", "multilabel_logits"]


@dataclass
class Batch:
    """Inputs ``x`` [B, T, F], targets ``y`` [B, T, O] and a loss mask [B, T] (1 where a target counts)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


@dataclass
class Evaluation:
    """Result of one evaluation on held-out data.

    ``solved`` applies the task's published (or documented) success criterion; ``errors`` counts the
    wrong items (sequences, pulses or strings), ``total`` how many were judged.
    """

    solved: bool
    errors: int
    total: int
    mse: float
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "solved": self.solved,
            "errors": self.errors,
            "total": self.total,
            "mse": self.mse,
            **self.metrics,
        }


class Task(abc.ABC):
    """A training problem.

    Sequence tasks (``stateful = False``) draw independent sequences that start from zero state.
    Stream tasks (``stateful = True``) hand out consecutive chunks of one endless stream per batch
    lane; the trainer carries the recurrent state across chunks (truncated BPTT), which is how the
    model is later used by the streaming service. Each lane restarts (new stream, zero state) with
    probability ``lane_restart_probability`` per batch, so lane ages are spread out: if every lane
    were as old as the run, the model could learn features of old streams (slowly saturating cells)
    that a fresh stream does not have. Evaluation streams are never reset.
    """

    name: str
    input_size: int
    output_size: int
    output_kind: OutputKind
    stateful: bool = False
    lane_restart_probability: float = 0.0
    description: str = ""
    criterion: str = ""

    @abc.abstractmethod
    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Draw the next training batch."""

    def reset_streams(self, batch_size: int, rng: np.random.Generator) -> None:  # noqa: B027
        """Start fresh streams for stream tasks; sequence tasks have nothing to reset."""

    def restart_lanes(self, lanes: np.ndarray, rng: np.random.Generator) -> None:  # noqa: B027
        """Give the stream tasks' ``lanes`` fresh streams (the trainer zeroes their state)."""

    def loss(self, y_pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Masked loss matching ``output_kind``."""
        mask = batch.mask
        if self.output_kind == "regression":
            per_step = ((y_pred - batch.y) ** 2).mean(dim=-1)
        elif self.output_kind == "class_logits":
            per_step = nn.functional.cross_entropy(
                y_pred.transpose(1, 2), batch.y.argmax(dim=-1), reduction="none"
            )
        else:
            per_step = nn.functional.binary_cross_entropy_with_logits(
                y_pred, batch.y, reduction="none"
            ).mean(dim=-1)
        return (per_step * mask).sum() / mask.sum().clamp_min(1.0)

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        """Judge ``model`` on a freshly generated held-out set drawn from ``seed``."""

    def ready_to_stop(self, validation: Evaluation) -> bool:
        """Early-stop rule on the validation set; stricter than ``solved`` where the test is a count."""
        return validation.solved

    def config(self) -> dict[str, Any]:
        """The task's parameters, recorded in results and model metadata."""
        return {}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
