"""Glue between recipes, training, export and verification: what the CLI commands call."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from training.export import export_model, sha256_of
from training.models import ModelConfig, RecurrentNet
from training.onnx_model import OnnxRecurrentModel
from training.recipes import Experiment
from training.tasks import Evaluation, make_task
from training.train import RunResult, TrainConfig, load_checkpoint, train

logger = logging.getLogger(__name__)

BUNDLE_VERSION = "1"


def run_experiment(
    experiment: Experiment, run_dir: Path, progress: bool = True
) -> tuple[RecurrentNet, RunResult]:
    """Train one recipe; its checkpoint and results go to ``run_dir``."""
    task = make_task(experiment.task, **experiment.task_options)
    model_config = ModelConfig(
        cell=experiment.cell,
        input_size=task.input_size,
        output_size=task.output_size,
        hidden_size=experiment.hidden_size,
        num_layers=experiment.num_layers,
        init=experiment.init,
        forget_gate=experiment.forget_gate,
    )
    train_config = TrainConfig(
        batch_size=experiment.batch_size,
        learning_rate=experiment.learning_rate,
        max_steps=experiment.max_steps,
        max_seconds=experiment.max_seconds,
        eval_every=experiment.eval_every,
        seed=experiment.seed,
        early_stop=experiment.early_stop,
    )
    return train(task, model_config, train_config, run_dir, progress=progress)


def export_run(
    run_dir: Path, repository: Path, name: str, version: str = BUNDLE_VERSION
) -> dict[str, Any]:
    """Export the checkpoint of a finished run into ``repository/<name>/<version>/``."""
    result = json.loads((run_dir / "results.json").read_text())
    model = load_checkpoint(run_dir / "checkpoint.pt")
    task = make_task(result["task"])
    return export_model(
        model,
        repository / name / version,
        name=name,
        task=result["task"],
        output_kind=task.output_kind,
        task_config=result["task_config"],
        metrics={"test": result["test"], "solved": result["solved"], "criterion": task.criterion},
        training={
            "train": result["train"],
            "steps": result["steps"],
            "sequences_seen": result["sequences_seen"],
            "wall_time_s": result["wall_time_s"],
            "sequences_to_solve": result["sequences_to_solve"],
        },
        description=task.description,
    )


def check_bundled_model(version_dir: Path, seed: int) -> tuple[Evaluation, dict[str, Any]]:
    """Re-judge an exported model with onnxruntime on a fresh held-out set drawn from ``seed``.

    Also checks that ``model.onnx`` still has the sha256 its metadata records.
    """
    model = OnnxRecurrentModel(version_dir)
    metadata = model.metadata
    recorded_sha = metadata["sha256"]
    actual_sha = sha256_of(version_dir / "model.onnx")
    if actual_sha != recorded_sha:
        raise ValueError(
            f"{version_dir}: model.onnx sha256 {actual_sha} != recorded {recorded_sha}"
        )
    task = make_task(metadata["task"])
    return task.evaluate(model, seed), metadata
