"""The training loop: Adam, gradient-norm clipping, periodic held-out evaluation, early stop.

A run writes ``checkpoint.pt`` and ``results.json`` into its output directory. ``results.json`` holds
the configuration, the learning curve, the validation and test evaluations, sequences seen and wall
time: everything the report needs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.models import ModelConfig, RecurrentNet, State
from training.tasks import Evaluation, Task

logger = logging.getLogger(__name__)

VALIDATION_SEED = 1_000_003
TEST_SEED = 2_000_003


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``max_seconds`` is a wall-time budget; the run stops at whichever limit comes first."""

    batch_size: int = 128
    learning_rate: float = 1e-3
    grad_clip_norm: float = 1.0
    max_steps: int = 20_000
    max_seconds: float = 300.0
    eval_every: int = 100
    seed: int = 0
    early_stop: bool = True
    threads: int = 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CurvePoint:
    step: int
    sequences: int
    seconds: float
    loss: float
    val_errors: int
    val_mse: float
    val_solved: bool


@dataclass
class RunResult:
    task: str
    cell: str
    model: dict[str, Any]
    train: dict[str, Any]
    task_config: dict[str, Any]
    steps: int
    sequences_seen: int
    wall_time_s: float
    solved: bool
    sequences_to_solve: int | None
    validation: dict[str, Any]
    test: dict[str, Any]
    curve: list[CurvePoint] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_left_at_most(step: int, elapsed_s: float, config: TrainConfig) -> float:
    """The longest a run can still take: its step limit at the pace so far, or what is left of
    its time budget, whichever is less. It ends sooner once the task is solved (early stop),
    which no one can foresee, so a progress bar shows this bound, never an ETA."""
    left_s = config.max_seconds - elapsed_s
    if step > 0:
        left_s = min(left_s, (config.max_steps - step) * elapsed_s / step)
    return max(0.0, left_s)


def progress_bar(label: str, config: TrainConfig, enabled: bool) -> tqdm:
    """Steps, elapsed time and pace; no percentage and no ETA, which would count on the step
    limit (20,000 steps: minutes) when most runs stop once solved (seconds)."""
    return tqdm(
        desc=label,
        disable=not enabled,
        dynamic_ncols=True,
        unit="step",
        bar_format="{desc}: {n_fmt} steps [{elapsed}, {rate_fmt}{postfix}]",
    )


def bar_postfix(step: int, elapsed_s: float, config: TrainConfig, scores: str) -> str:
    """What follows the pace: the last scores, then the bound on the time left."""
    left = tqdm.format_interval(time_left_at_most(step, elapsed_s, config))
    stop = "until solved" if config.early_stop else "to the limit"
    return f"{scores}{', ' if scores else ''}{stop}, at most {left} more"


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)


def restart_some_lanes(task: Task, state: State, rng: np.random.Generator) -> State:
    """Restart each stream lane with the task's probability: fresh stream, zero state."""
    lanes = np.flatnonzero(rng.random(state[0].shape[1]) < task.lane_restart_probability)
    if len(lanes) == 0:
        return state
    task.restart_lanes(lanes, rng)
    fresh = tuple(s.clone() for s in state)
    for s in fresh:
        s[:, torch.from_numpy(lanes)] = 0.0
    return fresh


def train(
    task: Task,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path | None = None,
    progress: bool = True,
) -> tuple[RecurrentNet, RunResult]:
    """Train a fresh model on ``task`` and return it with its results (also written to ``out_dir``)."""
    torch.manual_seed(train_config.seed)
    torch.set_num_threads(train_config.threads)
    rng = np.random.default_rng(train_config.seed)
    model = RecurrentNet(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
    if task.stateful:
        task.reset_streams(train_config.batch_size, rng)
    state: State | None = None
    curve: list[CurvePoint] = []
    sequences = 0
    sequences_to_solve: int | None = None
    last_eval: Evaluation | None = None
    start = time.perf_counter()
    running_loss = math.nan
    label = f"{task.name}/{model_config.cell}{'' if model_config.forget_gate else '-nofg'}"
    bar = progress_bar(label, train_config, progress)
    scores = ""
    step = 0
    while step < train_config.max_steps:
        model.train()
        if state is not None and task.lane_restart_probability > 0:
            state = restart_some_lanes(task, state, rng)
        batch = task.train_batch(train_config.batch_size, rng)
        y, new_state = model(batch.x, state if task.stateful else None)
        loss = task.loss(y, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip_norm)
        optimizer.step()
        if task.stateful:
            state = detach_state(new_state)
        step += 1
        sequences += train_config.batch_size
        value = float(loss.detach())
        running_loss = value if math.isnan(running_loss) else 0.95 * running_loss + 0.05 * value
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(bar_postfix(step, elapsed, train_config, scores), refresh=False)
        bar.update(1)
        out_of_time = elapsed >= train_config.max_seconds
        if step % train_config.eval_every == 0 or out_of_time or step == train_config.max_steps:
            model.eval()
            last_eval = task.evaluate(model, VALIDATION_SEED)
            scheduler.step(last_eval.mse)
            curve.append(
                CurvePoint(
                    step=step,
                    sequences=sequences,
                    seconds=round(elapsed, 3),
                    loss=running_loss,
                    val_errors=last_eval.errors,
                    val_mse=last_eval.mse,
                    val_solved=last_eval.solved,
                )
            )
            scores = f"loss {running_loss:.4g}, val_err {last_eval.errors}/{last_eval.total}"
            if out_dir is not None:
                save_checkpoint(model, out_dir / "checkpoint.pt")
            if last_eval.solved and sequences_to_solve is None:
                sequences_to_solve = sequences
            if train_config.early_stop and task.ready_to_stop(last_eval):
                break
        if out_of_time:
            break
    bar.close()
    wall_time = time.perf_counter() - start
    model.eval()
    validation = last_eval if last_eval is not None else task.evaluate(model, VALIDATION_SEED)
    test = task.evaluate(model, TEST_SEED)
    result = RunResult(
        task=task.name,
        cell=model_config.cell if model_config.forget_gate else "lstm_nofg",
        model=model_config.as_dict(),
        train=train_config.as_dict(),
        task_config=task.config(),
        steps=step,
        sequences_seen=sequences,
        wall_time_s=round(wall_time, 2),
        solved=test.solved,
        sequences_to_solve=sequences_to_solve,
        validation=validation.as_dict(),
        test=test.as_dict(),
        curve=curve,
    )
    logger.info(
        "%s: %s after %d sequences in %.1f s (test errors %d/%d, mse %.3g)",
        label,
        "solved" if test.solved else "NOT solved",
        sequences,
        wall_time,
        test.errors,
        test.total,
        test.mse,
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out_dir / "checkpoint.pt")
        (out_dir / "results.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return model, result


def save_checkpoint(model: RecurrentNet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.config.as_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path) -> RecurrentNet:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = RecurrentNet(ModelConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model
