"""Run an exported model with onnxruntime behind the same interface as :class:`RecurrentNet`.

Lets the task evaluations judge the exported graph itself, which is what the service will run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from training.models import State


class OnnxRecurrentModel(nn.Module):
    """``model(x, state) -> (y, state)`` over an ONNX file that follows the model contract."""

    def __init__(self, version_dir: Path) -> None:
        super().__init__()
        self.metadata: dict[str, Any] = json.loads((version_dir / "model.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        batch = x.shape[0]
        shape = (self.metadata["num_layers"], batch, self.metadata["hidden_size"])
        states = (
            [s.numpy() for s in state]
            if state
            else [np.zeros(shape, np.float32)] * (len(self.input_names) - 1)
        )
        feeds = dict(zip(self.input_names, [x.numpy(), *states], strict=True))
        y, *new_state = self.session.run(None, feeds)
        return torch.from_numpy(y), tuple(torch.from_numpy(s) for s in new_state)
