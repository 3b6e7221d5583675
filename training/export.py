"""Export a model to ONNX by the service's contract, verify it, and write its metadata.

Contract (docs/ARCHITECTURE.md): inputs ``x`` float32 [batch, time, features], ``h0`` [layers, batch,
hidden] and ``c0`` (LSTM only); outputs ``y`` [batch, time, outputs], ``hn`` and ``cn`` (LSTM); batch
and time dynamic; opset 17; the fused ONNX LSTM/GRU/RNN operators. An LSTM with ``proj_size`` P has
``h0``/``hn`` of [layers, batch, P] (``c0``/``cn`` keep the hidden size); its model.json declares
these shapes in a ``signature`` (service/signature.py), which the other models leave to the
default convention.

Two entry points share the export and the verification here:

- :func:`export_model` for the project's :class:`RecurrentNet` (the bundled and synthetic models);
- :func:`training.export_module.export_recurrent` for a user's own ``nn.LSTM`` / ``nn.GRU`` /
  ``nn.RNN`` (any number of layers, batch-first or time-major) with an optional per-step head.

Every export is verified against PyTorch with onnxruntime, over a whole sequence and in chunks with
the state fed back (which is how the service runs it), at a sequence length and batch size that
differ from the tracing example, before anything is written. A difference above the tolerance fails
the export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from training.models import CellType, ExportWrapper, RecurrentNet, State

OPSET = 17
TOLERANCE = 1e-5
FUSED_OPS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
EXAMPLE_BATCH, EXAMPLE_TIME = 2, 5
VERIFY_BATCH, VERIFY_TIME = 3, 37
# Chunk lengths a user's module is verified in (37 steps: every one leaves a ragged last chunk).
CHUNK_STEPS = (1, 3, 7)
USER_SOURCE = "a user's PyTorch module (training.export_module.export_recurrent)"
ISSUE_CONTRACT = "the richer model contract of issue #17, item 1 (not built yet)"

Reference = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class UnsupportedModuleError(ValueError):
    """A user's module that the current ONNX contract cannot serve; the message says what to do."""


@dataclass(frozen=True)
class Contract:
    """The sizes of one model by the ONNX contract, and its tensor names. ``proj_size`` (LSTM
    only, 0 for none) is the size of ``h``; ``c`` keeps ``hidden_size``."""

    cell: CellType
    num_layers: int
    hidden_size: int
    input_size: int
    output_size: int
    proj_size: int = 0

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Each state's last dimension, in the order of :attr:`state_names`."""
        if self.cell == "lstm":
            return (self.proj_size or self.hidden_size, self.hidden_size)
        return (self.hidden_size,)

    @property
    def conventional(self) -> bool:
        """Every state [layers, batch, hidden]: the server's default convention describes the
        graph and model.json needs no ``signature``."""
        return all(size == self.hidden_size for size in self.state_sizes)

    @property
    def input_names(self) -> list[str]:
        return ["x", *[f"{s}0" for s in self.state_names]]

    @property
    def output_names(self) -> list[str]:
        return ["y", *[f"{s}n" for s in self.state_names]]

    def zero_state(self, batch: int) -> State:
        return tuple(torch.zeros(self.num_layers, batch, size) for size in self.state_sizes)

    def signature(self) -> dict[str, Any]:
        """model.json's ``signature`` (the form service/signature.py reads): ``x`` and ``y``
        batch-major, each state of [layers, its size] per session, batch at axis 1, from zeros."""

        def tensor(name: str, size: int) -> dict[str, Any]:
            return {"name": name, "dtype": "float32", "shape": [size], "layout": "BT"}

        return {
            "inputs": [tensor("x", self.input_size)],
            "outputs": [tensor("y", self.output_size)],
            "states": [
                {
                    "input": f"{name}0",
                    "output": f"{name}n",
                    "shape": [self.num_layers, size],
                    "batch_axis": 1,
                    "initial": 0.0,
                }
                for name, size in zip(self.state_names, self.state_sizes, strict=True)
            ],
        }


def contract_of(model: RecurrentNet) -> Contract:
    """The contract of the project's :class:`RecurrentNet`."""
    cfg = model.config
    return Contract(cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.input_size, cfg.output_size)


@dataclass(frozen=True)
class Verification:
    """How far onnxruntime is from PyTorch; ``by_chunk_steps`` lists (chunk length, difference)."""

    full_sequence_max_abs_diff: float
    streaming_max_abs_diff: float
    batch: int
    steps: int
    by_chunk_steps: tuple[tuple[int, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "full_sequence_max_abs_diff": self.full_sequence_max_abs_diff,
            "streaming_max_abs_diff": self.streaming_max_abs_diff,
            "batch": self.batch,
            "steps": self.steps,
            "tolerance": TOLERANCE,
        }
        if len(self.by_chunk_steps) > 1:  # step by step only (RecurrentNet): the keys above say it
            result["chunkings"] = {str(steps): diff for steps, diff in self.by_chunk_steps}
        return result


def names_for(model: RecurrentNet) -> tuple[list[str], list[str]]:
    contract = contract_of(model)
    return contract.input_names, contract.output_names


def export_graph(module: nn.Module, contract: Contract, path: Path, label: str = "") -> None:
    """Write ``module`` (signature ``(x, *states) -> (y, *states)``, batch-major) to ``path`` with
    the TorchScript exporter, which keeps the time axis dynamic; check the fused op and the axes.
    Errors name ``label`` (default: the path)."""
    module.eval()
    example_x = torch.zeros(EXAMPLE_BATCH, EXAMPLE_TIME, contract.input_size)
    example_state = contract.zero_state(EXAMPLE_BATCH)
    dynamic_axes: dict[str, dict[int, str]] = {
        "x": {0: "batch", 1: "time"},
        "y": {0: "batch", 1: "time"},
    }
    for name in contract.input_names[1:] + contract.output_names[1:]:
        dynamic_axes[name] = {1: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example_x, *example_state),
            str(path),
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(path)).graph
    graph_ops = {node.op_type for node in graph.node}
    fused = FUSED_OPS[contract.cell]
    if fused not in graph_ops:
        raise ExportVerificationError(
            f"{label or path}: expected the fused ONNX {fused} op, found {sorted(graph_ops)}"
        )
    check_dynamic_axes(graph, label or str(path))


def check_dynamic_axes(graph: onnx.GraphProto, label: str) -> None:
    """``x`` and ``y`` must keep batch and time as named (dynamic) dimensions."""
    for value in [*graph.input, *graph.output]:
        if value.name not in ("x", "y"):
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, axis_name in ((0, "batch"), (1, "time")):
            if len(dims) > axis and not dims[axis].dim_param:
                raise ExportVerificationError(
                    f"{label}: torch.onnx.export fixed the {axis_name} axis of {value.name} to "
                    f"{dims[axis].dim_value}; export with dynamo=False (the TorchScript exporter, "
                    "as training/export.py does) and keep sizes out of the head's code"
                )


def export_onnx(model: RecurrentNet, path: Path) -> None:
    """Write ``model`` to ``path`` with the TorchScript exporter (keeps the time axis dynamic)."""
    export_graph(ExportWrapper(model), contract_of(model), path)


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # a failing run is reported by the export, in one line
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_in_chunks(
    session: ort.InferenceSession,
    contract: Contract,
    x: np.ndarray,
    state0: Sequence[np.ndarray],
    chunk: int,
) -> list[np.ndarray]:
    """``[y, *final states]`` of onnxruntime over ``x`` in chunks of ``chunk`` steps, the state fed
    back from each chunk to the next (a whole-sequence run is one chunk of every step)."""
    ys, state = [], list(state0)
    for start in range(0, x.shape[1], chunk):
        feeds = [x[:, start : start + chunk], *state]
        y, *state = session.run(None, dict(zip(contract.input_names, feeds, strict=True)))
        ys.append(y)
    return [np.concatenate(ys, axis=1), *state]


def max_diff(label: str, got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest absolute difference of matching tensors; a shape mismatch fails the export."""
    for name, a, b in zip(["y", "hn", "cn"], got, want, strict=False):
        if a.shape != b.shape:
            raise ExportVerificationError(
                f"{label}: onnxruntime gives {name} of shape {list(a.shape)} where PyTorch gives "
                f"{list(b.shape)}; torch's export fixed an axis: export with dynamo=False and keep "
                "sizes out of the head's code"
            )
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))


def verify_graph(
    reference: Reference,
    contract: Contract,
    path: Path,
    *,
    seed: int = 0,
    chunk_steps: Sequence[int] = (1,),
    label: str = "",
) -> Verification:
    """Compare onnxruntime with ``reference`` (batch-major, PyTorch) on random inputs and states:
    one call over the whole sequence, then the sequence in chunks of each of ``chunk_steps``.
    Errors name ``label`` (default: the path)."""
    label = label or str(path)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((VERIFY_BATCH, VERIFY_TIME, contract.input_size)).astype(np.float32)
    state0 = [
        (0.5 * rng.standard_normal((contract.num_layers, VERIFY_BATCH, size))).astype(np.float32)
        for size in contract.state_sizes
    ]
    with torch.no_grad():
        y_ref, state_ref = reference(
            torch.from_numpy(x), tuple(torch.from_numpy(s) for s in state0)
        )
    expected = [y_ref.numpy(), *[s.numpy() for s in state_ref]]
    session = ort_session(path)
    try:
        full_diff = max_diff(
            label, run_in_chunks(session, contract, x, state0, VERIFY_TIME), expected
        )
        by_chunk = tuple(
            (n, max_diff(label, run_in_chunks(session, contract, x, state0, n), expected))
            for n in chunk_steps
        )
    except ExportVerificationError:
        raise
    except Exception as error:  # onnxruntime: a shape fixed at export meets other sizes
        text = " ".join(str(error).split())
        reason = text if len(text) <= 200 else "..." + text[-200:]
        raise ExportVerificationError(
            f"{label}: the graph traced at {EXAMPLE_BATCH} x {EXAMPLE_TIME} steps fails at "
            f"{VERIFY_BATCH} x {VERIFY_TIME} ({reason}): torch's export fixed the batch or time "
            "axis; export with dynamo=False and keep sizes out of the head's code"
        ) from None
    stream_diff = max(diff for _, diff in by_chunk)
    result = Verification(full_diff, stream_diff, VERIFY_BATCH, VERIFY_TIME, by_chunk)
    if full_diff > TOLERANCE or stream_diff > TOLERANCE:
        if tuple(chunk_steps) == (1,):
            streamed = f"step by step {stream_diff:.3g}"
        else:
            streamed = ", ".join(f"chunks of {n}: {d:.3g}" for n, d in by_chunk)
        hint = (
            "; the whole sequence matches and the chunks do not: something mixes time steps "
            "(a head must act on each step alone)"
            if full_diff <= TOLERANCE
            else ""
        )
        raise ExportVerificationError(
            f"{label}: onnxruntime differs from PyTorch (full sequence {full_diff:.3g}, "
            f"{streamed}, tolerance {TOLERANCE}){hint}"
        )
    return result


def verify_onnx(model: RecurrentNet, path: Path, seed: int = 0) -> Verification:
    """Compare onnxruntime with PyTorch: one call over the whole sequence, then one call per step."""
    return verify_graph(model, contract_of(model), path, seed=seed)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_version(version_dir: Path, onnx_path: Path, metadata: dict[str, Any]) -> None:
    """Copy the verified ``onnx_path`` into ``version_dir`` and write ``metadata`` beside it."""
    version_dir.mkdir(parents=True, exist_ok=True)
    if onnx_path != version_dir / "model.onnx":
        shutil.copyfile(onnx_path, version_dir / "model.onnx")
    (version_dir / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")


def versions() -> dict[str, Any]:
    """The opset and the versions of the tools that made and checked the graph."""
    return {
        "opset": OPSET,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
    }


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    with tempfile.TemporaryDirectory(prefix="rnnserve-export-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        label = str(version_dir / "model.onnx")
        contract = contract_of(model)
        export_graph(ExportWrapper(model), contract, onnx_path, label)
        verification = verify_graph(model, contract, onnx_path, label=label)
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
            **versions(),
            "exported_at": now(),
            "sha256": sha256_of(onnx_path),
        }
        write_version(version_dir, onnx_path, metadata)
    return metadata
