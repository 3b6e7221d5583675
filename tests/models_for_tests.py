"""Tiny exported models for the service tests (random weights, fixed seeds), and offline references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from training.models import CellType

TINY_MODELS: dict[str, tuple[CellType, int, int, int, int]] = {
    # name: (cell, input_size, hidden_size, output_size, layers)
    "tiny_lstm": ("lstm", 3, 8, 2, 2),
    "tiny_gru": ("gru", 3, 8, 2, 1),
}


def export_tiny_models(root: Path) -> Path:
    """Write the tiny models into ``root`` as a model repository and return it."""
    from training.synthetic import export_random_model

    for seed, (name, (cell, inputs, hidden, outputs, layers)) in enumerate(TINY_MODELS.items()):
        export_random_model(
            root,
            name,
            cell=cell,
            input_size=inputs,
            hidden_size=hidden,
            output_size=outputs,
            num_layers=layers,
            seed=seed,
        )
    return root


class OfflineReference:
    """Runs a whole sequence through onnxruntime in one call from zero state: the ground truth."""

    def __init__(self, repository: Path, name: str) -> None:
        self.session = ort.InferenceSession(
            str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        cell, _, hidden, _, layers = TINY_MODELS[name]
        self.state_count = 2 if cell == "lstm" else 1
        self.state_shape = (layers, 1, hidden)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        feeds = {"x": x[None].astype(np.float32)}
        for name in ["h0", "c0"][: self.state_count]:
            feeds[name] = np.zeros(self.state_shape, np.float32)
        return self.session.run(["y"], feeds)[0][0]
