"""Export a model to ONNX by the service's contract, verify it, and write its metadata.

Contract (docs/ARCHITECTURE.md): inputs ``x`` float32 [batch, time, features], ``h0`` [layers, batch,
hidden] and ``c0`` (LSTM only); outputs ``y`` [batch, time, outputs], ``hn`` and ``cn`` (LSTM); batch
and time dynamic; opset 17; the fused ONNX LSTM/GRU/RNN operators.

Two entry points share the export and the verification:

- :func:`export_model` for the project's :class:`RecurrentNet` (the bundled and synthetic models);
- :func:`export_recurrent` for a user's own ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (any number of
  layers, batch-first or time-major) with an optional per-step head, wrapped in a
  :class:`RecurrentAdapter` that has the contract's batch-major signature.

Every export is verified against PyTorch with onnxruntime, over a whole sequence and in chunks with
the state fed back (which is how the service runs it), at a sequence length and batch size that
differ from the tracing example, before anything is written. A difference above the tolerance fails
the export.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
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
USER_SOURCE = "a user's PyTorch module (training.export.export_recurrent)"
ISSUE_CONTRACT = "the richer model contract of issue #17, item 1 (not built yet)"

Reference = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class UnsupportedModuleError(ValueError):
    """A user's module that the current ONNX contract cannot serve; the message says what to do."""


@dataclass(frozen=True)
class Contract:
    """The sizes of one model by the ONNX contract, and its tensor names."""

    cell: CellType
    num_layers: int
    hidden_size: int
    input_size: int
    output_size: int

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    @property
    def input_names(self) -> list[str]:
        return ["x", *[f"{s}0" for s in self.state_names]]

    @property
    def output_names(self) -> list[str]:
        return ["y", *[f"{s}n" for s in self.state_names]]

    def zero_state(self, batch: int) -> State:
        shape = (self.num_layers, batch, self.hidden_size)
        return tuple(torch.zeros(shape) for _ in self.state_names)


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
        (
            0.5 * rng.standard_normal((contract.num_layers, VERIFY_BATCH, contract.hidden_size))
        ).astype(np.float32)
        for _ in contract.state_names
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


# ---------------------------------------------------------------------------------------------
# A user's own module: nn.LSTM / nn.GRU / nn.RNN and an optional per-step head.

RNN_CELLS: tuple[tuple[type[nn.Module], CellType], ...] = (
    (nn.LSTM, "lstm"),
    (nn.GRU, "gru"),
    (nn.RNN, "rnn"),
)
# Keys export_recurrent computes itself; a caller's metadata may not set them.
COMPUTED_KEYS = (
    "name", "version", "cell", "num_layers", "hidden_size", "input_size", "output_size", "inputs",
    "outputs", "source", "verification", "opset", "torch_version", "onnx_version",
    "onnxruntime_version", "exported_at", "sha256",
)  # fmt: skip
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RecurrentAdapter(nn.Module):
    """A user's recurrent layer and per-step head behind the contract's signature
    ``(x, h0[, c0]) -> (y, hn[, cn])``, batch-major whatever the layer's own layout: a time-major
    layer (``batch_first=False``) gets ``x`` transposed in and ``y`` transposed out, its head
    applied in its own layout, exactly as the user's model runs it."""

    def __init__(self, rnn: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = head if head is not None else nn.Identity()
        self.time_major = not bool(getattr(rnn, "batch_first", True))
        self.lstm = isinstance(rnn, nn.LSTM)

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.time_major:
            x = x.transpose(0, 1)
        if self.lstm:
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        y = self.head(out)
        if self.time_major:
            y = y.transpose(0, 1)
        return (y, *new_state)

    def run(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``(y, state)`` for batch-major ``x``: the reference the export is verified against."""
        y, *new_state = self(x, *state)
        return y, tuple(new_state)


def recurrent_layer(rnn: object) -> tuple[nn.RNNBase, CellType]:
    """``rnn`` and its contract cell; refuses anything but a unidirectional LSTM, GRU or RNN
    without projections."""
    if not isinstance(rnn, nn.Module):
        raise UnsupportedModuleError(
            f"rnn must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}"
        )
    if any(isinstance(m, nn.Embedding) for m in rnn.modules()):
        raise UnsupportedModuleError(
            "a model that takes token ids (int64) through an embedding needs "
            f"{ISSUE_CONTRACT}; the current contract takes float32 features: export the "
            "recurrent layer and feed it embedded vectors"
        )
    cell = next((c for cls, c in RNN_CELLS if isinstance(rnn, cls)), None)
    if cell is None or not isinstance(rnn, nn.RNNBase):
        raise UnsupportedModuleError(
            f"rnn must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}: pass the "
            "recurrent layer itself as rnn and what follows it as head"
        )
    if rnn.bidirectional:
        raise UnsupportedModuleError(
            "a bidirectional rnn cannot stream (its backward direction needs the end of the "
            "sequence first); export a unidirectional one (bidirectional=False)"
        )
    if rnn.proj_size > 0:
        raise UnsupportedModuleError(
            f"an LSTM with proj_size={rnn.proj_size} has h and c of different sizes, "
            f"which needs {ISSUE_CONTRACT}; export an LSTM without proj_size"
        )
    return rnn, cell


def check_tensors(module: nn.Module, what: str) -> None:
    """Every floating-point parameter and buffer must be float32 and on the CPU."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise UnsupportedModuleError(
                f"the {what} has {str(tensor.dtype).removeprefix('torch.')} weights but the "
                "contract's inputs and states are float32; convert it with .float() before export"
            )
        if tensor.device.type != "cpu":
            raise UnsupportedModuleError(
                f"the {what} is on {tensor.device}; move it to the CPU with .cpu() before export"
            )


def probe_head(rnn: nn.RNNBase, head: nn.Module | None) -> int:
    """Run the rnn and the head once on zeros (batch and time of different sizes, in the rnn's
    layout) and return the number of outputs per step; refuse a head that is not per step."""
    layout = "[batch, time, hidden]" if rnn.batch_first else "[time, batch, hidden]"
    shape = (EXAMPLE_BATCH, EXAMPLE_TIME) if rnn.batch_first else (EXAMPLE_TIME, EXAMPLE_BATCH)
    with torch.no_grad():
        out = rnn(torch.zeros(*shape, rnn.input_size))[0]
        if head is None:
            return int(out.shape[2])
        try:
            y = head(out)
        except Exception as error:
            raise UnsupportedModuleError(
                f"the head fails on the rnn's outputs {list(out.shape)} {layout} ({error}); "
                f"give a head that takes {rnn.hidden_size} features per step"
            ) from None
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != tuple(shape):
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UnsupportedModuleError(
            f"the head turns the rnn's outputs {list(out.shape)} {layout} into {got}, but the "
            "contract needs the batch and time axes unchanged with outputs last; use a per-step "
            "head (e.g. nn.Linear) and pool or reshape on the client"
        )
    if y.dtype != torch.float32:
        raise UnsupportedModuleError(
            f"the head returns {str(y.dtype).removeprefix('torch.')} but the contract's output is "
            "float32; return float32 (e.g. logits rather than class ids)"
        )
    return int(y.shape[2])


def check_names(name: str, version: str, metadata: Mapping[str, Any]) -> None:
    """A model name and version are plain folder names; metadata may not set computed keys."""
    for what, value in (("name", name), ("version", version)):
        if not FOLDER_NAME.fullmatch(value):
            raise UnsupportedModuleError(
                f"model {what} {value!r} must be a plain folder name (letters, digits, '.', '_', "
                "'-', not starting with a dot)"
            )
    taken = sorted(set(metadata) & set(COMPUTED_KEYS))
    if taken:
        raise UnsupportedModuleError(
            f"metadata may not set {', '.join(taken)}: the export sets these keys itself; remove them"
        )


def export_recurrent(
    rnn: nn.Module,
    head: nn.Module | None = None,
    *,
    repository: Path,
    name: str,
    version: str = "1",
    metadata: Mapping[str, Any] | None = None,
    origin: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a user's ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (any number of layers, batch-first or
    time-major, unidirectional) and an optional per-step ``head`` to
    ``<repository>/<name>/<version>/model.onnx`` + ``model.json`` by the contract.

    The modules are put in eval mode, wrapped in a :class:`RecurrentAdapter`, exported with the
    TorchScript exporter (``dynamo=False``, opset 17) and verified against PyTorch with onnxruntime
    over a whole sequence and in chunks of 1, 3 and 7 steps with the state fed back, at 3 x 37
    steps (the trace is 2 x 5), before anything is written. ``metadata`` adds keys to model.json
    (e.g. ``description``, ``task``, ``output_kind``, labels); ``origin`` is recorded under
    ``source`` (the command puts the factory and weights file there). Returns the metadata.

    Raises :class:`UnsupportedModuleError` for what the contract cannot serve (bidirectional,
    ``proj_size``, a head that changes the batch or time axes, non-float32 weights or token ids)
    and :class:`ExportVerificationError` when the graph does not reproduce PyTorch.
    """
    extra = dict(metadata or {})
    check_names(name, version, extra)
    layer, cell = recurrent_layer(rnn)
    check_tensors(layer, "rnn")
    if head is not None:
        if not isinstance(head, nn.Module):
            raise UnsupportedModuleError(
                f"head must be an nn.Module or None, got {type(head).__name__}"
            )
        check_tensors(head, "head")
    adapter = RecurrentAdapter(layer, head).eval()
    output_size = probe_head(layer, head)
    contract = Contract(cell, layer.num_layers, layer.hidden_size, layer.input_size, output_size)
    version_dir = repository / name / version
    with tempfile.TemporaryDirectory(prefix="rnnserve-export-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        label = f"model {name}/{version}"
        export_graph(adapter, contract, onnx_path, label)
        verification = verify_graph(
            adapter.run, contract, onnx_path, chunk_steps=CHUNK_STEPS, label=label
        )
        record: dict[str, Any] = {
            "name": name,
            "version": version,
            "description": "",
            **extra,
            "cell": cell,
            "num_layers": contract.num_layers,
            "hidden_size": contract.hidden_size,
            "input_size": contract.input_size,
            "output_size": contract.output_size,
            "inputs": contract.input_names,
            "outputs": contract.output_names,
            "source": {
                "exported_from": USER_SOURCE,
                "rnn": repr(rnn),
                "head": None if head is None else repr(head),
                "layout": "batch-first"
                if layer.batch_first
                else "time-major (transposed in the graph)",
                **dict(origin or {}),
            },
            "verification": verification.as_dict(),
            **versions(),
            "exported_at": now(),
            "sha256": sha256_of(onnx_path),
        }
        write_version(version_dir, onnx_path, record)
    return record


# ---------------------------------------------------------------------------------------------
# The command's helpers: a factory named on the command line, weights from a file.


class FactoryError(ValueError):
    """A --factory or --state-dict that cannot be used; the message says what to do."""


def load_factory(spec: str) -> tuple[nn.Module, nn.Module | None]:
    """Call ``package.module:function`` and return its ``(rnn, head)`` (head None if it returns
    the rnn alone)."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise FactoryError(f"--factory must be package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FactoryError(
            f"cannot import {module_name} ({error}); run from the folder that holds it or add "
            "that folder to PYTHONPATH"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise FactoryError(f"{module_name} has no function {function_name!r}")
    built = factory()
    if isinstance(built, nn.Module):
        return built, None
    if isinstance(built, tuple | list) and len(built) == 2:
        return built[0], built[1]
    raise FactoryError(
        f"{spec} returned {type(built).__name__}; it must return (rnn, head) or the rnn alone"
    )


def load_weights(rnn: nn.Module, head: nn.Module | None, path: Path) -> None:
    """Load a state dict with keys ``rnn.*`` and ``head.*`` (that of a model whose recurrent layer
    is its attribute ``rnn`` and whose head is ``head``) into the factory's modules, strictly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise FactoryError(f"cannot read --state-dict {path} ({error})") from None
    if not isinstance(state, Mapping):
        raise FactoryError(f"--state-dict {path} holds a {type(state).__name__}, not a state dict")
    try:
        RecurrentAdapter(rnn, head).load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:400]
        raise FactoryError(
            f"--state-dict {path} does not fit the factory's modules ({detail}); save the "
            "state dict of a model whose layers are attributes rnn and head, or load the weights "
            "in the factory"
        ) from None
