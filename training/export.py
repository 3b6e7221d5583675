"""Export a trained model to ONNX by the service's contract, verify it, and write its metadata.

Contract (docs/ARCHITECTURE.md): inputs ``x`` float32 [batch, time, features], ``h0`` [layers, batch,
hidden] and ``c0`` (LSTM only); outputs ``y`` [batch, time, outputs], ``hn`` and ``cn`` (LSTM); batch
and time dynamic; opset 17; the fused ONNX LSTM/GRU/RNN operators.

Every export is verified against PyTorch with onnxruntime, over a whole sequence and step by step
with the state fed back (which is how the service runs it), at a sequence length and batch size that
differ from the tracing example. A difference above the tolerance fails the export.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.models import ExportWrapper, RecurrentNet

OPSET = 17
TOLERANCE = 1e-5
FUSED_OPS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
EXAMPLE_BATCH, EXAMPLE_TIME = 2, 5
VERIFY_BATCH, VERIFY_TIME = 3, 37


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class Verification:
    full_sequence_max_abs_diff: float
    streaming_max_abs_diff: float
    batch: int
    steps: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "full_sequence_max_abs_diff": self.full_sequence_max_abs_diff,
            "streaming_max_abs_diff": self.streaming_max_abs_diff,
            "batch": self.batch,
            "steps": self.steps,
            "tolerance": TOLERANCE,
        }


def names_for(model: RecurrentNet) -> tuple[list[str], list[str]]:
    states = model.state_names
    return ["x", *[f"{s}0" for s in states]], ["y", *[f"{s}n" for s in states]]


def export_onnx(model: RecurrentNet, path: Path) -> None:
    """Write ``model`` to ``path`` with the TorchScript exporter (keeps the time axis dynamic)."""
    model.eval()
    input_names, output_names = names_for(model)
    cfg = model.config
    example_x = torch.zeros(EXAMPLE_BATCH, EXAMPLE_TIME, cfg.input_size)
    example_state = model.zero_state(EXAMPLE_BATCH)
    dynamic_axes: dict[str, dict[int, str]] = {
        "x": {0: "batch", 1: "time"},
        "y": {0: "batch", 1: "time"},
    }
    for name in input_names[1:] + output_names[1:]:
        dynamic_axes[name] = {1: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ExportWrapper(model),
            (example_x, *example_state),
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    graph_ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    fused = FUSED_OPS[cfg.cell]
    if fused not in graph_ops:
        raise ExportVerificationError(
            f"{path}: expected the fused ONNX {fused} op, found {sorted(graph_ops)}"
        )


def verify_onnx(model: RecurrentNet, path: Path, seed: int = 0) -> Verification:
    """Compare onnxruntime with PyTorch: one call over the whole sequence, then one call per step."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    input_names, _ = names_for(model)
    x = rng.standard_normal((VERIFY_BATCH, VERIFY_TIME, cfg.input_size)).astype(np.float32)
    state0 = [
        (0.5 * rng.standard_normal((cfg.num_layers, VERIFY_BATCH, cfg.hidden_size))).astype(
            np.float32
        )
        for _ in model.state_names
    ]
    with torch.no_grad():
        y_ref, state_ref = model(torch.from_numpy(x), tuple(torch.from_numpy(s) for s in state0))
    reference = [y_ref.numpy(), *[s.numpy() for s in state_ref]]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    full = session.run(None, dict(zip(input_names, [x, *state0], strict=True)))
    full_diff = max(float(np.abs(a - b).max()) for a, b in zip(full, reference, strict=True))
    state = state0
    ys = []
    for t in range(VERIFY_TIME):
        y_t, *state = session.run(
            None, dict(zip(input_names, [x[:, t : t + 1], *state], strict=True))
        )
        ys.append(y_t)
    streamed = [np.concatenate(ys, axis=1), *state]
    stream_diff = max(float(np.abs(a - b).max()) for a, b in zip(streamed, reference, strict=True))
    result = Verification(full_diff, stream_diff, VERIFY_BATCH, VERIFY_TIME)
    if full_diff > TOLERANCE or stream_diff > TOLERANCE:
        raise ExportVerificationError(
            f"{path}: onnxruntime differs from PyTorch (full sequence {full_diff:.3g}, "
            f"step by step {stream_diff:.3g}, tolerance {TOLERANCE})"
        )
    return result


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_model(
    model: RecurrentNet,
    version_dir: Path,
    *,
    name: str,
    task: str,
    output_kind: str,
    task_config: dict[str, Any],
    metrics: dict[str, Any],
    training: dict[str, Any],
    description: str = "",
) -> dict[str, Any]:
    """Export, verify and describe ``model`` in ``version_dir`` (``model.onnx`` + ``model.json``)."""
    onnx_path = version_dir / "model.onnx"
    export_onnx(model, onnx_path)
    verification = verify_onnx(model, onnx_path)
    cfg = model.config
    input_names, output_names = names_for(model)
    metadata: dict[str, Any] = {
        "name": name,
        "version": version_dir.name,
        "description": description,
        "task": task,
        "cell": cfg.cell,
        "forget_gate": cfg.forget_gate,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "input_size": cfg.input_size,
        "output_size": cfg.output_size,
        "output_kind": output_kind,
        "inputs": input_names,
        "outputs": output_names,
        "task_config": task_config,
        "metrics": metrics,
        "training": training,
        "verification": verification.as_dict(),
        "opset": OPSET,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256": sha256_of(onnx_path),
    }
    (version_dir / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
