"""Conversions between the native API's messages (package rnnserve.v1) and the core's types, and
:func:`model_signature`, what a model takes, returns and keeps per session: the one description
both APIs' model metadata is built from.

Imports neither onnxruntime nor the engine at run time, so the Python client can use it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.tensors import decode_float32, decode_int64, encode_float32, float32_bytes
from service.errors import InvalidArgument, shown
from service.session import EndReason

if TYPE_CHECKING:
    from service.chunks import StepResult
    from service.models import ModelHandle
    from service.repository import ModelSpec
    from service.runtime import ModelRuntime
    from service.session import SessionEnd, SessionView

END_REASONS = {
    EndReason.CLOSED: pb.END_REASON_CLOSED,
    EndReason.IDLE_TIMEOUT: pb.END_REASON_IDLE_TIMEOUT,
    EndReason.EVICTED: pb.END_REASON_EVICTED,
    EndReason.SHUTDOWN: pb.END_REASON_SHUTDOWN,
    EndReason.FAILED: pb.END_REASON_FAILED,
    EndReason.MOVED: pb.END_REASON_MOVED,
}


def to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """A message's tensor as numpy: float32, or int64 when its dtype says so."""
    if tensor.dtype == "int64":
        return decode_int64(tensor.shape, tensor.data, what)
    if tensor.dtype not in ("", "float32"):
        raise InvalidArgument(f"{what} has dtype {shown(tensor.dtype)}; float32 or int64")
    return decode_float32(tensor.shape, tensor.data, what)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """An array as a message's tensor: int64 arrays keep their type, the rest are float32."""
    if array.dtype.kind in "iu":
        ids = np.ascontiguousarray(array, "<i8")
        return pb.Tensor(shape=list(array.shape), data=ids.tobytes(), dtype="int64")
    shape, data = encode_float32(array)
    return pb.Tensor(shape=shape, data=data)


def chunk_inputs(
    single: pb.Tensor, named: Mapping[str, pb.Tensor], has_single: bool
) -> np.ndarray | dict[str, np.ndarray]:
    """A chunk's input tensor, or its inputs by name (a model of several); not both."""
    if named:
        if has_single:
            raise InvalidArgument("send a chunk's input in input or inputs, not both")
        return {name: to_array(t, f"input {shown(name)}") for name, t in named.items()}
    return to_array(single, "input")


def initial_state(tensors: list[pb.Tensor]) -> list[np.ndarray] | None:
    return [to_array(t, f"initial_state[{i}]") for i, t in enumerate(tensors)] or None


def session_info(view: SessionView) -> pb.SessionInfo:
    info = pb.SessionInfo(
        session_id=view.session_id,
        model=view.model,
        version=view.version,
        steps=view.steps,
        idle_seconds=view.idle_s,
        state=[to_tensor(s) for s in view.state or []],
        durable_steps=view.durable_steps,
        incarnation=view.incarnation,
    )
    if view.last_output is not None:
        info.last_output.CopyFrom(to_tensor(view.last_output))
    return info


def fill_step_response(message: pb.StepResponse, result: StepResult) -> pb.StepResponse:
    """Write ``result`` into ``message`` in place (a stream's reply wraps it: no nested copy)."""
    message.session_id = result.session_id
    tensor = message.output
    tensor.shape.extend(result.output.shape)
    tensor.data = float32_bytes(result.output)
    message.steps = result.steps
    message.ended = result.ended
    message.durable_steps = result.durable_steps
    for name, values in result.named_outputs:
        message.outputs[name].CopyFrom(to_tensor(values))
    return message


def stream_output(result: StepResult) -> pb.StreamResponse:
    """A stream's reply to a chunk."""
    response = pb.StreamResponse()
    fill_step_response(response.output, result)
    return response


def session_ended(end: SessionEnd) -> pb.SessionEnded:
    return pb.SessionEnded(
        session_id=end.session_id, reason=END_REASONS[end.reason], steps=end.steps
    )


# onnxruntime's element types (NodeArg.type) in KServe's datatype names, which both APIs use.
ORT_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}
DYNAMIC = -1  # a dimension of any size (the steps of a chunk)
ZEROS = "zeros"
DECLARED = "declared"  # model.json's signature gives the initial value (docs/YOUR_MODEL.md)


@dataclass(frozen=True)
class TensorDescription:
    """An input or output as a client sees it, for one session: ``shape`` is ``[steps, ...]``
    (no batch axis; ``DYNAMIC`` where any size goes), ``datatype`` KServe's name."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StateDescription:
    """A state tensor the server keeps per session: fed to the graph input ``input_name``, its
    next value read from the graph output ``output_name``; ``shape`` is one session's (the
    graph's batch axis left out); a new session starts from ``initial``."""

    input_name: str
    output_name: str
    datatype: str
    shape: tuple[int, ...]
    initial: str = ZEROS


@dataclass(frozen=True)
class ModelSignature:
    """What a model takes, returns and keeps, and what names its classes or tokens."""

    inputs: tuple[TensorDescription, ...]
    outputs: tuple[TensorDescription, ...]
    states: tuple[StateDescription, ...]
    labels: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = ()


def model_signature(spec: ModelSpec, runtime: ModelRuntime) -> ModelSignature:
    """The signature of a loaded model version: KServe's ModelMetadata and ModelConfig and the
    native GetModel are all built from it, so a richer model contract (several inputs and
    outputs, int64 inputs, more state tensors) changes this function only.

    Names and sizes come from the spec's signature; datatypes from the graph. The contract (checked at load, :mod:`service.signature`): one input and one output,
    named as model.json's signature says (``x`` and ``y`` by default), and any number of states,
    each of its declared shape, from zeros or a declared initial value.
    """
    graph_inputs = {a.name: a.type for a in runtime.session.get_inputs()}
    graph_outputs = {a.name: a.type for a in runtime.session.get_outputs()}
    sig = spec.tensors

    def datatype(ort_type: str | None) -> str:
        ort_type = ort_type or "tensor(float)"
        return ORT_DATATYPES.get(ort_type, ort_type)  # a type KServe has no name for: as it is

    inputs = tuple(
        TensorDescription(i.name, datatype(graph_inputs.get(i.name)), (DYNAMIC, *i.shape))
        for i in sig.inputs
    )
    outputs = tuple(
        TensorDescription(o.name, datatype(graph_outputs.get(o.name)), (DYNAMIC, *o.shape))
        for o in sig.outputs
    )
    states = tuple(
        StateDescription(
            s.input,
            s.output,
            datatype(graph_inputs.get(s.input)),
            s.shape,
            ZEROS if not s.initial.any() else DECLARED,
        )
        for s in sig.states
    )
    return ModelSignature(inputs, outputs, states, spec.labels, spec.vocabulary)


def tensor_spec(tensor: TensorDescription) -> pb.TensorSpec:
    return pb.TensorSpec(name=tensor.name, shape=tensor.shape, datatype=tensor.datatype)


def state_spec(state: StateDescription) -> pb.StateSpec:
    return pb.StateSpec(
        input_name=state.input_name,
        output_name=state.output_name,
        datatype=state.datatype,
        shape=state.shape,
        initial=state.initial,
    )


def model_info(handle: ModelHandle, versions: list[str]) -> pb.ModelInfo:
    spec = handle.spec
    meta = spec.metadata
    signature = model_signature(spec, handle.runtime)
    inputs = [tensor_spec(t) for t in signature.inputs]
    outputs = [tensor_spec(t) for t in signature.outputs]
    return pb.ModelInfo(
        name=spec.name,
        version=spec.version,
        versions=versions,
        cell=spec.cell,
        layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        input_size=spec.input_size,
        output_size=spec.output_size,
        task=str(meta.get("task", "")),
        output_kind=str(meta.get("output_kind", "")),
        description=str(meta.get("description", "")),
        sha256=spec.sha256,
        input=inputs[0] if inputs else None,
        output=outputs[0] if outputs else None,
        state=[
            pb.TensorSpec(name=s.input_name, shape=s.shape, datatype=s.datatype)
            for s in signature.states
        ],
        metadata_json=json.dumps(meta, sort_keys=True),
        inputs=inputs,
        outputs=outputs,
        states=[state_spec(s) for s in signature.states],
        labels=signature.labels,
        vocabulary=signature.vocabulary,
    )
