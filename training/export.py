"""Export a model to ONNX by the service's contract, verify it, and write its metadata.

Contract (docs/ARCHITECTURE.md): inputs ``x`` float32 [batch, time, features], ``h0`` [layers, batch,
hidden] and ``c0`` (LSTM only); outputs ``y`` [batch, time, outputs], ``hn`` and ``cn`` (LSTM); batch
and time dynamic; opset 17; the fused ONNX LSTM/GRU/RNN operators. An LSTM with ``proj_size`` P has
``h0``/``hn`` of [layers, batch, P] (``c0``/``cn`` keep the hidden size), and a model that takes
token ids has ``x`` int64 [batch, time]; model.json declares such tensors in a ``signature``
(service/signature.py), which the other models leave to the default convention.

Three entry points share the export and the verification here:

- :func:`export_model` for the project's :class:`RecurrentNet` (the bundled and synthetic models);
- :func:`training.export_module.export_recurrent` for a user's own ``nn.LSTM`` / ``nn.GRU`` /
  ``nn.RNN`` (any number of layers, batch-first or time-major) with an optional embedding of token
  ids before it and an optional per-step head after it;
- :func:`training.export_any.export_module` for any module with the signature
  ``forward(*inputs, *states) -> (*outputs, *new_states)``, batch-major, described by a
  :class:`service.signature.Signature` (several inputs and outputs, states of any shape).

Every export is verified against PyTorch with onnxruntime, over a whole sequence and in chunks with
the state fed back (which is how the service runs it), at a sequence length and batch size that
differ from the tracing example, before anything is written. A difference above the tolerance fails
the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.signature import Signature, StateSpec, TensorSpec, describe
from training.models import CellType, ExportWrapper, RecurrentNet, State

OPSET = 17
TOLERANCE = 1e-5
FUSED_OPS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
EXAMPLE_BATCH, EXAMPLE_TIME = 2, 5
VERIFY_BATCH, VERIFY_TIME = 3, 37
# Chunk lengths a user's module is verified in (37 steps: every one leaves a ragged last chunk).
CHUNK_STEPS = (1, 3, 7)
USER_SOURCE = "a user's PyTorch module (training.export_module.export_recurrent)"
MODULE_SOURCE = "a user's PyTorch module (training.export_any.export_module)"
# What a graph that fixed an axis at export must change, by who wrote the code that fixed it.
HEAD_CODE = "the head's code"

Reference = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]
# A module in torch by a signature: (inputs, states) -> (outputs, new states), batch-major.
SignedReference = Callable[
    [Sequence[torch.Tensor], Sequence[torch.Tensor]],
    tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
]


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class UnsupportedModuleError(ValueError):
    """A user's module that the current ONNX contract cannot serve; the message says what to do."""


@dataclass(frozen=True)
class Contract:
    """The sizes of one recurrent model by the ONNX contract, and its tensor names. ``proj_size``
    (LSTM only, 0 for none) is the size of ``h``; ``c`` keeps ``hidden_size``. ``vocabulary_size``
    (0 for none): ``x`` is one int64 token id per step in [0, vocabulary_size) (an embedding in
    the graph), and ``input_size`` is the size of its vectors."""

    cell: CellType
    num_layers: int
    hidden_size: int
    input_size: int
    output_size: int
    proj_size: int = 0
    vocabulary_size: int = 0

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
        """Float32 features in and every state [layers, batch, hidden]: the server's default
        convention describes the graph and model.json needs no ``signature``."""
        return not self.vocabulary_size and all(s == self.hidden_size for s in self.state_sizes)

    @property
    def input_names(self) -> list[str]:
        return ["x", *[f"{s}0" for s in self.state_names]]

    @property
    def output_names(self) -> list[str]:
        return ["y", *[f"{s}n" for s in self.state_names]]

    def zero_state(self, batch: int) -> State:
        return tuple(torch.zeros(self.num_layers, batch, size) for size in self.state_sizes)

    def tensors(self) -> Signature:
        """The graph's tensors: ``x`` and ``y`` batch-major, each state of [layers, its size] per
        session, batch at axis 1, from zeros."""
        if self.vocabulary_size:
            x = TensorSpec("x", (), "int64", value_range=(0, self.vocabulary_size))
        else:
            x = TensorSpec("x", (self.input_size,))
        return Signature(
            (x,),
            (TensorSpec("y", (self.output_size,)),),
            tuple(
                StateSpec(f"{name}0", f"{name}n", (self.num_layers, size))
                for name, size in zip(self.state_names, self.state_sizes, strict=True)
            ),
        )

    def signature(self) -> dict[str, Any]:
        """model.json's ``signature`` (the form service/signature.py reads)."""
        return describe(self.tensors())


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


def graph_names(signature: Signature) -> tuple[list[str], list[str]]:
    """The graph's input names (inputs, then states) and output names (outputs, then states)."""
    return (
        [t.name for t in signature.inputs] + list(signature.state_inputs),
        [t.name for t in signature.outputs] + list(signature.state_outputs),
    )


def example_of(signature: Signature, batch: int, steps: int) -> tuple[torch.Tensor, ...]:
    """Inputs (zeros; an id input its lowest id) and zero states for ``batch`` x ``steps``: the
    arguments a module by ``signature`` is traced with."""
    inputs = [
        torch.full((batch, steps, *t.shape), (t.value_range or (0, 1))[0], dtype=torch.int64)
        if t.dtype == "int64"
        else torch.zeros(batch, steps, *t.shape)
        for t in signature.inputs
    ]
    states = [torch.zeros(state_shape(s, batch)) for s in signature.states]
    return (*inputs, *states)


def state_shape(spec: StateSpec, rows: int) -> tuple[int, ...]:
    """A state's shape in the graph for ``rows`` sessions (the batch at its ``batch_axis``)."""
    return (*spec.shape[: spec.batch_axis], rows, *spec.shape[spec.batch_axis :])


def export_signed(
    module: nn.Module,
    signature: Signature,
    path: Path,
    label: str = "",
    *,
    fused: str | None = None,
    culprit: str = HEAD_CODE,
) -> None:
    """Write ``module`` (``forward(*inputs, *states) -> (*outputs, *new_states)``, batch-major,
    by ``signature``) to ``path`` with the TorchScript exporter (``dynamo=False``), which keeps
    the batch and time axes dynamic as declared; then check them in the graph (and the fused ONNX
    op ``fused``, if given). Errors name ``label`` (default: the path) and ``culprit``."""
    module.eval()
    input_names, output_names = graph_names(signature)
    dynamic_axes: dict[str, dict[int, str]] = {
        t.name: {0: "batch", 1: "time"} for t in (*signature.inputs, *signature.outputs)
    }
    for state in signature.states:
        dynamic_axes[state.input] = dynamic_axes[state.output] = {state.batch_axis: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), exporter_output_dropped():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                example_of(signature, EXAMPLE_BATCH, EXAMPLE_TIME),
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        except Exception as error:  # the exporter's reason, in one line
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = (lines[0] if lines else type(error).__name__).split(" [Caused by")[0]
            reason = reason.split(" Please feel free")[0][:300].rstrip(".")
            hint = (
                "; for an nn.LSTM with proj_size use export_recurrent, or put "
                "training.export_module.ProjectedLSTM(lstm) in its place"
                if "projection" in reason.lower()
                else ""
            )
            raise UnsupportedModuleError(
                f"{label or path}: torch.onnx.export (TorchScript, opset {OPSET}) cannot export "
                f"the module: {reason}{hint}"
            ) from None
    graph = onnx.load(str(path)).graph
    graph_ops = {node.op_type for node in graph.node}
    if fused is not None and fused not in graph_ops:
        raise ExportVerificationError(
            f"{label or path}: expected the fused ONNX {fused} op, found {sorted(graph_ops)}"
        )
    check_dynamic_axes(graph, label or str(path), signature, culprit)


@contextlib.contextmanager
def exporter_output_dropped() -> Iterator[None]:
    """Drop what the exporter writes to the process's standard output (file descriptor 1): on a
    failure torch's C++ log prints its whole IR graph there, and the error raised says what
    matters in one line."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no standard output to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def export_graph(module: nn.Module, contract: Contract, path: Path, label: str = "") -> None:
    """Write ``module`` (signature ``(x, *states) -> (y, *states)``, batch-major) to ``path`` with
    the TorchScript exporter, which keeps the time axis dynamic; check the fused op and the axes.
    Errors name ``label`` (default: the path)."""
    export_signed(module, contract.tensors(), path, label, fused=FUSED_OPS[contract.cell])


def fixed_axis_hint(culprit: str) -> str:
    """What to do about a graph whose export fixed an axis."""
    return (
        "export with dynamo=False (the TorchScript exporter, as training/export.py does) and keep "
        f"sizes out of {culprit}"
    )


def check_dynamic_axes(
    graph: onnx.GraphProto,
    label: str,
    signature: Signature | None = None,
    culprit: str = HEAD_CODE,
) -> None:
    """Every input and output must keep batch and time as named (dynamic) dimensions (``x`` and
    ``y`` without a ``signature``)."""
    names = (
        {"x", "y"}
        if signature is None
        else {t.name for t in (*signature.inputs, *signature.outputs)}
    )
    for value in [*graph.input, *graph.output]:
        if value.name not in names:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, axis_name in ((0, "batch"), (1, "time")):
            if len(dims) > axis and not dims[axis].dim_param:
                raise ExportVerificationError(
                    f"{label}: torch.onnx.export fixed the {axis_name} axis of {value.name} to "
                    f"{dims[axis].dim_value}; {fixed_axis_hint(culprit)}"
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
    signature: Signature,
    inputs: Sequence[np.ndarray],
    state0: Sequence[np.ndarray],
    chunk: int,
) -> list[np.ndarray]:
    """``[*outputs, *final states]`` of onnxruntime over ``inputs`` (batch-major) in chunks of
    ``chunk`` steps, the state fed back from each chunk to the next (a whole-sequence run is one
    chunk of every step)."""
    input_names, output_names = graph_names(signature)
    outputs: list[list[np.ndarray]] = [[] for _ in signature.outputs]
    state = list(state0)
    for start in range(0, inputs[0].shape[1], chunk):
        feeds = [x[:, start : start + chunk] for x in inputs] + state
        results = session.run(output_names, dict(zip(input_names, feeds, strict=True)))
        for into, y in zip(outputs, results, strict=False):
            into.append(y)
        state = results[len(signature.outputs) :]
    return [*(np.concatenate(parts, axis=1) for parts in outputs), *state]


def max_diff(
    label: str,
    got: list[np.ndarray],
    want: list[np.ndarray],
    names: Sequence[str] = ("y", "hn", "cn"),
    culprit: str = HEAD_CODE,
) -> float:
    """The largest absolute difference of matching tensors; a shape mismatch fails the export."""
    for name, a, b in zip(names, got, want, strict=False):
        if a.shape != b.shape:
            raise ExportVerificationError(
                f"{label}: onnxruntime gives {name} of shape {list(a.shape)} where PyTorch gives "
                f"{list(b.shape)}; torch's export fixed an axis: {fixed_axis_hint(culprit)}"
            )
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))


def verify_signed(
    reference: SignedReference,
    signature: Signature,
    path: Path,
    *,
    seed: int = 0,
    chunk_steps: Sequence[int] = (1,),
    label: str = "",
    culprit: str = HEAD_CODE,
) -> Verification:
    """Compare onnxruntime with ``reference`` (batch-major, PyTorch) on random inputs (ids within
    their range) and random states: one call over the whole sequence, then the sequence in chunks
    of each of ``chunk_steps``; every output and every final state must agree within
    :data:`TOLERANCE`. Errors name ``label`` (default: the path)."""
    label = label or str(path)
    rng = np.random.default_rng(seed)
    inputs = [t.sample(rng, VERIFY_BATCH, VERIFY_TIME) for t in signature.inputs]
    state0 = [
        (0.5 * rng.standard_normal(state_shape(s, VERIFY_BATCH))).astype(np.float32)
        for s in signature.states
    ]
    with torch.no_grad():
        outputs, states = reference(
            [torch.from_numpy(x) for x in inputs], [torch.from_numpy(s) for s in state0]
        )
    expected = [t.numpy() for t in (*outputs, *states)]
    names = graph_names(signature)[1]
    session = ort_session(path)
    try:
        full_diff = max_diff(
            label,
            run_in_chunks(session, signature, inputs, state0, VERIFY_TIME),
            expected,
            names,
            culprit,
        )
        by_chunk = tuple(
            (
                n,
                max_diff(
                    label,
                    run_in_chunks(session, signature, inputs, state0, n),
                    expected,
                    names,
                    culprit,
                ),
            )
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
            f"axis; {fixed_axis_hint(culprit)}"
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
            f"({'a head' if culprit == HEAD_CODE else 'the module'} must act on each step alone, "
            "carrying anything between steps in its states)"
            if full_diff <= TOLERANCE
            else ""
        )
        raise ExportVerificationError(
            f"{label}: onnxruntime differs from PyTorch (full sequence {full_diff:.3g}, "
            f"{streamed}, tolerance {TOLERANCE}){hint}"
        )
    return result


def verify_graph(
    reference: Reference,
    contract: Contract,
    path: Path,
    *,
    seed: int = 0,
    chunk_steps: Sequence[int] = (1,),
    label: str = "",
) -> Verification:
    """:func:`verify_signed` for a recurrent model ``(x, state) -> (y, state)`` by ``contract``."""

    def signed(
        inputs: Sequence[torch.Tensor], states: Sequence[torch.Tensor]
    ) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
        y, new_state = reference(inputs[0], tuple(states))
        return (y,), new_state

    return verify_signed(
        signed, contract.tensors(), path, seed=seed, chunk_steps=chunk_steps, label=label
    )


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
