"""Export any module with the documented signature ``forward(*inputs, *states) -> (*outputs,
*new_states)`` by the service's ONNX contract (docs/TRAINING.md, "Your own model";
docs/YOUR_MODEL.md): :func:`export_module`, batch-major, its tensors named and sized by the caller
(:func:`features`, :func:`token_ids`, :func:`state`, or model.json's form): several inputs (float32
features or int64 token ids) and outputs, states of any shape. The declaration is read as the
server reads model.json (:func:`declared_signature`) and the module is run once to check it keeps
it (:func:`probe_module`).

It goes through the same export and verification as the bundled models (:mod:`training.export`):
the TorchScript exporter (``dynamo=False``, batch and time dynamic), and nothing is written unless
onnxruntime reproduces torch over the whole sequence and in chunks of 1, 3 and 7 steps with the
states fed back. What the contract cannot serve is refused in one line
(:class:`~training.export.UnsupportedModuleError`). A recurrent layer with a head is simpler to
export with :func:`training.export_module.export_recurrent`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.signature import (
    Signature,
    SignatureError,
    StateSpec,
    TensorSpec,
    describe,
    parse_signature,
)
from training.export import (
    CHUNK_STEPS,
    EXAMPLE_BATCH,
    EXAMPLE_TIME,
    MODULE_SOURCE,
    UnsupportedModuleError,
    example_of,
    export_signed,
    now,
    sha256_of,
    state_shape,
    verify_signed,
    versions,
    write_version,
)
from training.export_module import check_names, check_tensors, quiet_projections

# What a module's code must not do, named in the exporter's errors about fixed axes.
MODULE_CODE = "the module's code (a Python loop over the time steps is unrolled at the trace's 5)"


def features(name: str, size: int) -> TensorSpec:
    """A float32 input or output of ``size`` values per step: [batch, time, size] in ``forward``."""
    return TensorSpec(name, (size,))


def token_ids(name: str, count: int, low: int = 0) -> TensorSpec:
    """An int64 input of one token id per step, from ``low`` up to ``count`` (not included; the
    ``num_embeddings`` of an embedding): [batch, time] in ``forward``."""
    return TensorSpec(name, (), "int64", value_range=(low, count))


def state(
    input: str, output: str, shape: Sequence[int], batch_axis: int = 1, initial: float = 0.0
) -> StateSpec:
    """A state tensor kept per session: ``forward`` takes it as ``input`` and returns its next
    value as ``output``; ``shape`` per session, the batch inserted at ``batch_axis`` (default 1:
    ``[layers, hidden]`` is ``[layers, batch, hidden]`` in ``forward``, as nn.LSTM's h and c);
    a new session starts from ``initial``."""
    return StateSpec(input, output, tuple(shape), batch_axis, np.full((), initial, np.float32))


InputLike = TensorSpec | tuple[str, int] | Mapping[str, Any]
OutputLike = TensorSpec | tuple[str, int] | str | Mapping[str, Any]
StateLike = StateSpec | tuple[Any, ...] | Mapping[str, Any]


def as_tensor(spec: object, where: str, output: bool) -> TensorSpec | str:
    """One input or output spec as a TensorSpec (an output given by name alone: its name)."""
    if isinstance(spec, TensorSpec):
        return spec
    if output and isinstance(spec, str):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        return features(spec[0], spec[1])
    if isinstance(spec, Mapping):
        return dict(spec)  # type: ignore[return-value]  # parsed with the rest, below
    raise UnsupportedModuleError(
        f"{where} must be features(name, size), token_ids(name, count), a (name, size) pair"
        f"{' or a name' if output else ''}, or model.json's form; got {spec!r}"
    )


def as_state(spec: object, where: str) -> StateSpec | dict[str, Any]:
    if isinstance(spec, StateSpec):
        return spec
    if isinstance(spec, tuple) and len(spec) in (3, 4):
        return state(*spec)
    if isinstance(spec, Mapping):
        return dict(spec)
    raise UnsupportedModuleError(
        f"{where} must be state(input, output, shape), an (input, output, shape[, batch_axis]) "
        f"tuple or model.json's form; got {spec!r}"
    )


def declared_signature(
    inputs: Sequence[InputLike],
    outputs: Sequence[OutputLike],
    states: Sequence[StateLike],
    output_sizes: Mapping[str, int],
) -> Signature:
    """The signature of ``export_module``'s arguments, checked as the server reads model.json
    (round-tripped through :func:`service.signature.parse_signature`)."""

    def form(spec: TensorSpec | StateSpec | str | dict[str, Any]) -> Any:
        if isinstance(spec, str):
            return describe(Signature((), (TensorSpec(spec, (output_sizes[spec],)),), ()))[
                "outputs"
            ][0]
        if isinstance(spec, TensorSpec):
            return describe(Signature((), (spec,), ()))["outputs"][0]
        if isinstance(spec, StateSpec):
            return describe(Signature((), (), (spec,)))["states"][0]
        return spec

    raw = {
        "inputs": [form(as_tensor(t, f"inputs[{k}]", False)) for k, t in enumerate(inputs)],
        "outputs": [form(as_tensor(t, f"outputs[{k}]", True)) for k, t in enumerate(outputs)],
        "states": [form(as_state(s, f"states[{k}]")) for k, s in enumerate(states)],
    }
    try:
        signature = parse_signature(raw)
    except SignatureError as error:
        raise UnsupportedModuleError(f"{error} (docs/YOUR_MODEL.md)") from None
    not_batch_major = [t.name for t in (*signature.inputs, *signature.outputs) if t.layout != "BT"]
    if not_batch_major:
        raise UnsupportedModuleError(
            f"export_module takes batch-major tensors, but {not_batch_major} declare another "
            "layout; transpose inside forward and declare them batch-major"
        )
    return signature


def output_names(outputs: Sequence[OutputLike]) -> list[str]:
    """The outputs' names, whatever form each is given in."""
    names = []
    for k, spec in enumerate(outputs):
        tensor = as_tensor(spec, f"outputs[{k}]", True)
        if isinstance(tensor, TensorSpec):
            names.append(tensor.name)
        elif isinstance(tensor, dict):
            names.append(str(tensor.get("name")))
        else:
            names.append(tensor)
    return names


def probe_module(
    module: nn.Module, inputs: Signature, names: Sequence[str], states: int
) -> dict[str, int]:
    """Run ``module`` once on the trace's example (``inputs``: the declared inputs and states)
    and return each output's size per step; refuse what the contract cannot serve, in one line."""
    example = example_of(inputs, EXAMPLE_BATCH, EXAMPLE_TIME)
    expected = len(names) + states
    shown = ", ".join(
        [f"{t.name} {list(a.shape)}" for t, a in zip(inputs.inputs, example, strict=False)]
        + [
            f"{s.input} {list(a.shape)}"
            for s, a in zip(inputs.states, example[len(inputs.inputs) :], strict=True)
        ]
    )
    with torch.no_grad(), quiet_projections():
        try:
            returned = module(*example)
        except Exception as error:
            detail = " ".join(str(error).split())[:300]
            raise UnsupportedModuleError(
                f"the module fails on inputs and states {shown} ({detail}); its forward must take "
                "the declared inputs, then the states, batch-major"
            ) from None
    results = list(returned) if isinstance(returned, tuple | list) else [returned]
    if len(results) != expected or not all(isinstance(r, torch.Tensor) for r in results):
        raise UnsupportedModuleError(
            f"the module returns {len(results)} value(s) but {expected} are declared ("
            f"{', '.join(names)}, then the {states} new state(s)); forward must return the "
            "outputs, then the new states, as tensors"
        )
    sizes = {}
    for name, y in zip(names, results, strict=False):
        if y.dim() != 3 or tuple(y.shape[:2]) != (EXAMPLE_BATCH, EXAMPLE_TIME):
            raise UnsupportedModuleError(
                f"output {name} has shape {list(y.shape)} for {EXAMPLE_BATCH} rows of "
                f"{EXAMPLE_TIME} steps; outputs must be [batch, time, features] (unsqueeze(-1) "
                "one value per step)"
            )
        if y.dtype != torch.float32:
            raise UnsupportedModuleError(
                f"output {name} is {str(y.dtype).removeprefix('torch.')}; outputs are float32 "
                "(e.g. logits rather than class ids)"
            )
        sizes[name] = int(y.shape[2])
    for spec, new in zip(inputs.states, results[len(names) :], strict=True):
        want = list(state_shape(spec, EXAMPLE_BATCH))
        if list(new.shape) != want or new.dtype != torch.float32:
            raise UnsupportedModuleError(
                f"the new state {spec.output} is {str(new.dtype).removeprefix('torch.')} "
                f"{list(new.shape)} where {spec.input} is float32 {want}; a state's next value "
                "must have its shape and type"
            )
    return sizes


def export_module(
    module: nn.Module,
    *,
    inputs: Sequence[InputLike],
    outputs: Sequence[OutputLike],
    states: Sequence[StateLike],
    repository: Path,
    name: str,
    version: str = "1",
    metadata: Mapping[str, Any] | None = None,
    origin: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export any module with the signature ``forward(*inputs, *states) -> (*outputs,
    *new_states)`` to ``<repository>/<name>/<version>/model.onnx`` + ``model.json``.

    Every tensor is batch-major: an input is [batch, time, size] float32 (:func:`features`) or
    [batch, time] int64 token ids (:func:`token_ids`); an output is [batch, time, size] float32
    (given by :func:`features`, a ``(name, size)`` pair, or its name alone: the size is read off
    a trial run); a state (:func:`state`, or an ``(input, output, shape[, batch_axis])`` tuple) is
    its per-session ``shape`` with the batch inserted at ``batch_axis`` (default 1), float32.
    model.json's form of each (docs/YOUR_MODEL.md) is taken too. The forward must act on each
    step in order, carrying everything between steps in the states, so that a sequence in chunks
    gives what it gives whole.

    The module is put in eval mode, run once on the trace's example (what it returns must match
    the declaration), exported with the TorchScript exporter (``dynamo=False``, opset 17, batch
    and time dynamic; an export that fixes an axis is refused in one line that says so) and
    verified against torch with onnxruntime over a whole sequence and in chunks of 1, 3 and 7
    steps with the states fed back, every output and state within 1e-5, before anything is
    written. model.json gets the full ``signature``; ``metadata`` adds keys to it (e.g.
    ``description``, ``labels``, ``vocabulary``), ``origin`` goes under ``source``. Returns the
    metadata.
    """
    extra = dict(metadata or {})
    check_names(name, version, extra)
    if not isinstance(module, nn.Module):
        raise UnsupportedModuleError(f"module must be an nn.Module, got {type(module).__name__}")
    check_tensors(module, "module")
    module.eval()
    names = output_names(outputs)
    known = {n: 1 for n in names}  # placeholders until the trial run reads the sizes
    declared_inputs = declared_signature(inputs, outputs, states, known)
    sizes = probe_module(module, declared_inputs, names, len(declared_inputs.states))
    signature = declared_signature(inputs, outputs, states, sizes)
    for tensor in signature.outputs:
        if tensor.size != sizes[tensor.name]:
            raise UnsupportedModuleError(
                f"output {tensor.name} is declared with {tensor.size} values per step but the "
                f"module returns {sizes[tensor.name]}"
            )

    def reference(
        xs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor]
    ) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
        results = module(*xs, *hs)
        return results[: len(names)], results[len(names) :]

    version_dir = repository / name / version
    with tempfile.TemporaryDirectory(prefix="rnnserve-export-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        label = f"model {name}/{version}"
        export_signed(module, signature, onnx_path, label, culprit=MODULE_CODE)
        with quiet_projections():
            verification = verify_signed(
                reference,
                signature,
                onnx_path,
                chunk_steps=CHUNK_STEPS,
                label=label,
                culprit=MODULE_CODE,
            )
        record: dict[str, Any] = {
            "name": name,
            "version": version,
            "description": "",
            **extra,
            "input_size": signature.input_size,
            "output_size": signature.output_size,
            "inputs": [t.name for t in signature.inputs] + list(signature.state_inputs),
            "outputs": [t.name for t in signature.outputs] + list(signature.state_outputs),
            "signature": describe(signature),
            "source": {
                "exported_from": MODULE_SOURCE,
                "module": repr(module),
                **dict(origin or {}),
            },
            "verification": verification.as_dict(),
            **versions(),
            "exported_at": now(),
            "sha256": sha256_of(onnx_path),
        }
        write_version(version_dir, onnx_path, record)
    return record
