"""Conversions between the native API's messages (package rnnserve.v1) and the core's types.

Imports neither onnxruntime nor the engine at run time, so the Python client can use it too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.tensors import decode_float32, encode_float32, float32_bytes
from service.session import EndReason

if TYPE_CHECKING:
    from service.chunks import StepResult
    from service.models import ModelHandle
    from service.session import SessionEnd, SessionView

END_REASONS = {
    EndReason.CLOSED: pb.END_REASON_CLOSED,
    EndReason.IDLE_TIMEOUT: pb.END_REASON_IDLE_TIMEOUT,
    EndReason.EVICTED: pb.END_REASON_EVICTED,
    EndReason.SHUTDOWN: pb.END_REASON_SHUTDOWN,
}


def to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    return decode_float32(tensor.shape, tensor.data, what)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    shape, data = encode_float32(array)
    return pb.Tensor(shape=shape, data=data)


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


def model_info(handle: ModelHandle, versions: list[str]) -> pb.ModelInfo:
    spec = handle.spec
    meta = spec.metadata
    state_spec = [
        pb.TensorSpec(name=n, shape=[spec.num_layers, spec.hidden_size], datatype="FP32")
        for n in spec.state_inputs
    ]
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
        input=pb.TensorSpec(name="x", shape=[-1, spec.input_size], datatype="FP32"),
        output=pb.TensorSpec(name="y", shape=[-1, spec.output_size], datatype="FP32"),
        state=state_spec,
        metadata_json=json.dumps(meta, sort_keys=True),
    )
