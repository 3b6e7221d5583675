"""Random-weight models of any size, exported by the ONNX contract: for benchmarks and tests.

They are not trained and solve nothing; they exist so that the service can be measured (and
tested) on model sizes the bundled models do not cover, e.g. a 2-layer LSTM with hidden 512.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.export import export_model
from training.models import CellType, ModelConfig, RecurrentNet


def export_random_model(
    repository: Path,
    name: str,
    *,
    cell: CellType = "lstm",
    input_size: int = 32,
    hidden_size: int = 512,
    output_size: int = 1,
    num_layers: int = 2,
    seed: int = 0,
    version: str = "1",
) -> dict[str, Any]:
    """Write ``repository/name/version/{model.onnx,model.json}`` with seeded random weights."""
    torch.manual_seed(seed)
    model = RecurrentNet(
        ModelConfig(
            cell=cell,
            input_size=input_size,
            output_size=output_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
        )
    )
    return export_model(
        model,
        repository / name / version,
        name=name,
        task="synthetic",
        output_kind="regression",
        task_config={},
        metrics={},
        training={"seed": seed},
        description=f"random weights (seed {seed}): a {num_layers}-layer {cell.upper()} "
        f"with hidden {hidden_size}, for benchmarks and tests; solves nothing",
    )
