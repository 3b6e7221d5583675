"""A model's signature: the tensors a chunk carries in, those its reply carries out, the state
tensors kept per session, and how each sits in the graph.

model.json may declare it under ``"signature"`` (docs/YOUR_MODEL.md); a model.json without one
means the default convention of the exported models: input ``x`` [batch, time, input_size],
output ``y`` [batch, time, output_size], states ``h0 -> hn`` (and ``c0 -> cn`` for an LSTM) of
[layers, batch, hidden], all float32, states starting from zeros.

Layouts say where the batch and time axes sit before a tensor's per-step shape: ``BT`` (batch
major, the default), ``TB`` (time major) or ``T1B`` (time, one direction, batch: the ONNX
LSTM/GRU/RNN ops' ``Y``). The server converts between them and its own [batch, time, ...] on the
host, and binds every tensor by its declared name, never by position.

A state is stored per session with its declared ``shape``; in the graph the batch axis sits at
``batch_axis`` of that shape (1 for [layers, batch, hidden]). Internally each state is kept as
[pre, rows, post] (``pre`` the product of the dimensions before the batch axis, ``post`` of those
after), which is the graph's layout reshaped without moving a byte.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYOUTS = re.compile(r"^(?=[^B]*B[^B]*$)(?=[^T]*T[^T]*$)[BT1]+$")  # one B, one T, any 1s
INPUT_DTYPES = ("float32", "int64")
FLOAT32_EXACT = (
    2**24
)  # every integer up to this is exact as a float32  # int64: token ids (an embedding in the graph)
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "int64": np.dtype(np.int64),
}


class SignatureError(ValueError):
    """model.json's signature cannot be served; the message says what is wrong."""


@dataclass(frozen=True)
class TensorSpec:
    """A chunk's input or output: its graph name, dtype, per-step shape (``()``: one value per
    step, e.g. a token id), and layout. An int64 input's values must lie in ``value_range``
    [low, high): a token id outside its embedding would fail the whole batch it is in."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "BT"
    value_range: tuple[int, int] | None = None

    @functools.cached_property
    def size(self) -> int:
        """Values per step."""
        return math.prod(self.shape)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return NUMPY_DTYPES[self.dtype]

    def sample(self, rng: np.random.Generator, rows: int, steps: int) -> np.ndarray:
        """Valid random values [rows, steps, *shape], for the load-time checks."""
        if self.dtype == "int64":
            low, high = self.value_range or (0, 1)
            return rng.integers(low, high, (rows, steps, *self.shape), dtype=np.int64)
        return rng.standard_normal((rows, steps, *self.shape)).astype(np.float32)

    def graph_dims(self, rows: int | str, steps: int | str) -> list[int | str]:
        """The graph's shape for ``rows`` and ``steps`` (ints, or names of dynamic axes)."""
        lead = {"B": rows, "T": steps, "1": 1}
        return [lead[c] for c in self.layout] + list(self.shape)

    def to_graph(self, x: np.ndarray) -> np.ndarray:
        """``x`` [batch, time, *shape] in the graph's layout (no copy for BT)."""
        if self.layout == "BT":
            return x
        moved = x if self.layout.replace("1", "") == "BT" else np.swapaxes(x, 0, 1)
        for axis, c in enumerate(self.layout):  # left to right: each lands where it belongs
            if c == "1":
                moved = np.expand_dims(moved, axis)
        return np.ascontiguousarray(moved)

    def from_graph(self, y: np.ndarray) -> np.ndarray:
        """The graph's ``y`` as [batch, time, *shape] (no copy for BT). ValueError if a size-1
        axis of the layout is not 1."""
        if self.layout == "BT":
            return y
        ones = tuple(axis for axis, c in enumerate(self.layout) if c == "1")
        if y.ndim < len(self.layout) or any(y.shape[axis] != 1 for axis in ones):
            raise ValueError(
                f"{self.name} has shape {list(y.shape)}, expected {self.graph_dims('B', 'T')}"
            )
        squeezed = np.squeeze(y, axis=ones) if ones else y
        if self.layout.replace("1", "") == "TB":
            squeezed = np.swapaxes(squeezed, 0, 1)
        return np.ascontiguousarray(squeezed)


@dataclass(frozen=True)
class StateSpec:
    """A state tensor kept per session: fed to graph input ``input``, its next value read from
    graph output ``output``; ``shape`` per session, the batch axis at ``batch_axis`` in the graph;
    a new session (and a START) begins from ``initial``."""

    input: str
    output: str
    shape: tuple[int, ...]
    batch_axis: int = 1
    initial: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), compare=False)

    @property
    def pre(self) -> int:
        return math.prod(self.shape[: self.batch_axis])

    @property
    def post(self) -> int:
        return math.prod(self.shape[self.batch_axis :])

    def graph_dims(self, rows: int | str) -> list[int | str]:
        """The graph's shape for ``rows`` sessions."""
        return [*self.shape[: self.batch_axis], rows, *self.shape[self.batch_axis :]]

    def initial_value(self) -> np.ndarray:
        """One session's initial state, ``shape``."""
        if self.initial.size == 0:
            return np.zeros(self.shape, np.float32)
        return np.broadcast_to(self.initial, self.shape).astype(np.float32)

    def stored(self, per_session: np.ndarray) -> np.ndarray:
        """One session's state (``shape``) as stored: [pre, post]."""
        return per_session.reshape(self.pre, self.post)


@dataclass(frozen=True)
class Signature:
    """Everything the runtime binds, by name.

    A chunk travels through the server *packed*: its inputs side by side as one float32 array
    [steps, input_size] (each input's per-step values flattened, in declared order; int64 ids as
    float32 values, exact below 2**24, which their declared range keeps them under), and its
    outputs likewise as [steps, output_size]. So the core moves one array per chunk whatever
    the model takes, and a model of one float32 input and output (nearly all) is packed as it is.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]

    @property
    def input(self) -> TensorSpec:
        """The first input (the only one of most models)."""
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        """The first output (the only one of most models)."""
        return self.outputs[0]

    @functools.cached_property
    def input_size(self) -> int:
        """Packed values per step of a chunk's inputs."""
        return sum(t.size for t in self.inputs)

    @functools.cached_property
    def output_size(self) -> int:
        """Packed values per step of a chunk's outputs."""
        return sum(t.size for t in self.outputs)

    @functools.cached_property
    def packed_as_is(self) -> bool:
        """One float32 input of [features] and one output: packing changes nothing."""
        return (
            len(self.inputs) == len(self.outputs) == 1
            and self.input.dtype == "float32"
            and len(self.input.shape) == 1
        )

    @property
    def state_inputs(self) -> tuple[str, ...]:
        return tuple(s.input for s in self.states)

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(s.output for s in self.states)

    @property
    def conventional(self) -> bool:
        """Every state [*, batch, *] of rank 3: the graph's state arrays are the server's."""
        return all(s.batch_axis == 1 and len(s.shape) == 2 for s in self.states)

    def unpack(self, x: np.ndarray) -> list[np.ndarray]:
        """Packed inputs [rows, steps, input_size] as each input [rows, steps, *shape] in its
        dtype (views where the dtype is float32)."""
        if self.packed_as_is:
            return [x]
        arrays, at = [], 0
        for tensor in self.inputs:
            part = x[..., at : at + tensor.size].reshape(*x.shape[:2], *tensor.shape)
            arrays.append(part.astype(np.int64) if tensor.dtype == "int64" else part)
            at += tensor.size
        return arrays

    def pack_outputs(self, ys: Sequence[np.ndarray]) -> np.ndarray:
        """Each output [rows, steps, *shape] side by side, [rows, steps, output_size]."""
        if len(ys) == 1:
            return ys[0]
        rows, steps = ys[0].shape[:2]
        return np.concatenate([y.reshape(rows, steps, -1) for y in ys], axis=-1)

    def split_outputs(self, y: np.ndarray) -> list[np.ndarray]:
        """A chunk's packed outputs [steps, output_size] as each output [steps, *shape]."""
        parts, at = [], 0
        for tensor in self.outputs:
            parts.append(y[:, at : at + tensor.size].reshape(y.shape[0], *tensor.shape))
            at += tensor.size
        return parts

    def sample(self, rng: np.random.Generator, rows: int, steps: int) -> np.ndarray:
        """Valid random packed inputs [rows, steps, input_size], for the load-time checks."""
        parts = [t.sample(rng, rows, steps).reshape(rows, steps, -1) for t in self.inputs]
        return np.concatenate(parts, axis=-1).astype(np.float32)


def default_signature(cell: str, layers: int, hidden: int, inputs: int, outputs: int) -> Signature:
    """The exported models' convention (module docstring)."""
    names = [("h0", "hn"), ("c0", "cn")] if cell == "lstm" else [("h0", "hn")]
    return Signature(
        (TensorSpec("x", (inputs,)),),
        (TensorSpec("y", (outputs,)),),
        tuple(StateSpec(i, o, (layers, hidden)) for i, o in names),
    )


def parse_signature(raw: Any) -> Signature:
    """model.json's ``signature`` object; raises :class:`SignatureError` naming what is wrong."""
    if not isinstance(raw, dict):
        raise SignatureError("signature must be an object with inputs, outputs and states")
    unknown = set(raw) - {"inputs", "outputs", "states"}
    if unknown:
        raise SignatureError(f"signature has unknown keys {sorted(unknown)}")
    inputs = _list(raw, "inputs")
    outputs = _list(raw, "outputs")
    if not inputs or not outputs:
        raise SignatureError(
            f"signature declares {len(inputs)} input(s) and {len(outputs)} output(s); a model "
            "needs at least one of each"
        )
    states = tuple(_state(s, k) for k, s in enumerate(_list(raw, "states")))
    names = [t["name"] for t in (*inputs, *outputs) if isinstance(t, dict) and "name" in t]
    names += [n for s in states for n in (s.input, s.output)]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SignatureError(f"signature names {duplicated} more than once")
    return Signature(
        tuple(_tensor(r, f"inputs[{k}]", INPUT_DTYPES) for k, r in enumerate(inputs)),
        tuple(_tensor(r, f"outputs[{k}]") for k, r in enumerate(outputs)),
        states,
    )


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise SignatureError(f"signature {key} must be a list")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and d >= 1 for d in value):
        raise SignatureError(f"{where}: shape must be a list of whole numbers above 0")
    return tuple(value)


def _tensor(raw: Any, where: str, dtypes: tuple[str, ...] = ("float32",)) -> TensorSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise SignatureError(f"signature {where} needs a name")
    unknown = set(raw) - {"name", "shape", "dtype", "layout", "range"}
    if unknown:
        raise SignatureError(f"signature {where} has unknown keys {sorted(unknown)}")
    dtype = raw.get("dtype", "float32")
    if dtype not in dtypes:
        raise SignatureError(
            f"signature {where}: dtype {dtype!r} is not served here ({' or '.join(dtypes)})"
        )
    layout = raw.get("layout", "BT")
    if not isinstance(layout, str) or not LAYOUTS.match(layout):
        raise SignatureError(
            f"signature {where}: layout {layout!r} must be BT (batch major), TB (time major) or "
            "another order of one B, one T and size-1 axes, e.g. T1B for ONNX LSTM's Y"
        )
    shape = _shape(raw.get("shape", []), f"signature {where}")
    if len(shape) > 1 or (not shape and dtype == "float32"):
        raise SignatureError(
            f"signature {where}: shape {list(shape)} must be [features] (or [] for one int64 "
            "id per step)"
        )
    value_range = raw.get("range")
    if dtype == "int64":
        if (
            not isinstance(value_range, list)
            or len(value_range) != 2
            or not all(isinstance(v, int) for v in value_range)
            or value_range[0] >= value_range[1]
        ):
            raise SignatureError(
                f'signature {where}: an int64 input needs "range": [low, high], the ids its '
                "graph accepts (low included, high not: [0, vocabulary size] for an embedding)"
            )
        if max(abs(value_range[0]), abs(value_range[1])) > FLOAT32_EXACT:
            raise SignatureError(
                f"signature {where}: range {value_range} reaches past ±{FLOAT32_EXACT}; ids "
                "travel through the server as float32 values, exact only up to there"
            )
        value_range = (value_range[0], value_range[1])
    elif value_range is not None:
        raise SignatureError(f"signature {where}: range is for int64 inputs")
    return TensorSpec(raw["name"], shape, dtype, layout, value_range)


def _state(raw: Any, k: int) -> StateSpec:
    where = f"signature states[{k}]"
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(n), str) for n in ("input", "output")
    ):
        raise SignatureError(f"{where} needs input and output names")
    unknown = set(raw) - {"input", "output", "shape", "batch_axis", "initial", "dtype"}
    if unknown:
        raise SignatureError(f"{where} has unknown keys {sorted(unknown)}")
    if raw.get("dtype", "float32") != "float32":
        raise SignatureError(f"{where}: states are float32")
    shape = _shape(raw.get("shape"), where)
    batch_axis = raw.get("batch_axis", 1 if len(shape) >= 1 else 0)
    if not isinstance(batch_axis, int) or not 0 <= batch_axis <= len(shape):
        raise SignatureError(f"{where}: batch_axis must be 0..{len(shape)}")
    initial = raw.get("initial", 0.0)
    try:
        value = np.asarray(initial, np.float32)
        np.broadcast_to(value, shape)
    except (TypeError, ValueError):
        raise SignatureError(
            f"{where}: initial must be a number or a nested list of shape {list(shape)}"
        ) from None
    if not np.isfinite(value).all():
        raise SignatureError(f"{where}: initial holds NaN or Inf")
    return StateSpec(raw["input"], raw["output"], shape, batch_axis, value)


def describe(signature: Signature) -> dict[str, Any]:
    """The signature as model.json declares it (for writing one, and for error messages)."""

    def tensor(t: TensorSpec) -> dict[str, Any]:
        described = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "layout": t.layout}
        if t.value_range is not None:
            described["range"] = list(t.value_range)
        return described

    def state(s: StateSpec) -> dict[str, Any]:
        initial: Any = 0.0 if s.initial.size == 0 else s.initial.tolist()
        return {"input": s.input, "output": s.output, "shape": list(s.shape),
                "batch_axis": s.batch_axis, "initial": initial}  # fmt: skip

    return {
        "inputs": [tensor(t) for t in signature.inputs],
        "outputs": [tensor(t) for t in signature.outputs],
        "states": [state(s) for s in signature.states],
    }


def check_state_shapes(signature: Signature, state: Sequence[np.ndarray]) -> str | None:
    """Why ``state`` (one array per state, one session's) does not fit, or None."""
    if len(state) != len(signature.states):
        return f"needs {len(signature.states)} tensors, got {len(state)}"
    for k, (tensor, spec) in enumerate(zip(state, signature.states, strict=True)):
        if tuple(tensor.shape) != spec.shape:
            return f"tensor {k} has shape {list(tensor.shape)}, expected {list(spec.shape)}"
    return None
