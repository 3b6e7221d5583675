"""Conversions between KServe v2 / Triton messages (package ``inference``) and the core's types.

Sequence semantics follow Triton: ``sequence_id`` (int64 or string; int ids are kept as their
decimal text, so 5 and "5" name the same sequence), ``sequence_start`` opens (or restarts) the
sequence, ``sequence_end`` closes it after the request. Each request carries one chunk: ``x`` of
shape [1, steps, features]. The recurrent state is never sent: the server keeps it, and the
ModelConfig declares it as Triton declares implicit state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import model_config_pb2 as mc
from service.api.native_messages import (
    DYNAMIC,
    ZEROS,
    ModelSignature,
    StateDescription,
    TensorDescription,
)
from service.api.tensors import (
    decode_float32,
    decode_int64,
    float32_bytes,
    from_floats,
    from_ints,
)
from service.chunks import StepResult
from service.errors import InvalidArgument, shown
from service.models import IndexEntry
from service.repository import ModelSpec
from service.session import check_session_id, incarnation_text
from service.settings import Settings
from service.signature import TensorSpec

API = "kserve"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = [
    "sequence",
    "sequence(string_id)",
    "model_configuration",
    "model_repository",  # RepositoryIndex; load and unload with model_control explicit
    "model_repository(unload_dependents)",  # accepted: no model depends on another
]


@dataclass(frozen=True)
class SequenceControl:
    sequence_id: str
    start: bool
    end: bool
    expected_steps: int | None = None  # parameter sequence_expected_steps: the count before it
    incarnation: str = ""  # parameter sequence_incarnation: from the reply to the START


def sequence_id_of(request: pb.ModelInferRequest) -> str:
    """The request's sequence id (required for these stateful models): read first, so that any
    later error of the request can be charged to its sequence."""
    params = request.parameters
    sequence_id = ""
    p = params.get("sequence_id")
    if p is not None:
        choice = p.WhichOneof("parameter_choice")
        if choice == "int64_param":
            number = p.int64_param
            sequence_id = str(number) if number else ""
        elif choice == "uint64_param":
            number = p.uint64_param
            sequence_id = str(number) if number else ""
        elif choice == "string_param":
            sequence_id = p.string_param
            if sequence_id:
                check_session_id(sequence_id)
        else:
            raise InvalidArgument("sequence_id must be an int64, uint64 or string parameter")
    if not sequence_id:
        raise InvalidArgument(
            f"inference request to model {shown(request.model_name)} must specify a non-zero or "
            "non-empty sequence_id: this model keeps state per sequence"
        )
    return sequence_id


def sequence_control(request: pb.ModelInferRequest, sequence_id: str) -> SequenceControl:
    """Read Triton's sequence parameters (and ours: sequence_expected_steps,
    sequence_incarnation) of a request of sequence ``sequence_id``."""
    params = request.parameters
    start = bool_parameter(params, "sequence_start")
    end = bool_parameter(params, "sequence_end")
    expected_steps = count_parameter(params, "sequence_expected_steps")
    incarnation = ""
    p = params.get("sequence_incarnation")
    if p is not None:
        if p.WhichOneof("parameter_choice") != "string_param":
            raise InvalidArgument("sequence_incarnation must be a string parameter")
        incarnation = p.string_param
    return SequenceControl(sequence_id, start, end, expected_steps, incarnation)


def bool_parameter(params: Mapping[str, pb.InferParameter], name: str) -> bool:
    p = params.get(name)
    if p is None:
        return False
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"{name} must be a bool parameter")
    return p.bool_param


def count_parameter(params: Mapping[str, pb.InferParameter], name: str) -> int | None:
    """A non-negative integer parameter, or None when absent."""
    p = params.get(name)
    if p is None:
        return None
    choice = p.WhichOneof("parameter_choice")
    value = p.int64_param if choice == "int64_param" else p.uint64_param
    if choice not in ("int64_param", "uint64_param") or value < 0:
        raise InvalidArgument(f"{name} must be a non-negative int64 or uint64 parameter")
    return value


KSERVE_DTYPES = {"float32": "FP32", "int64": "INT64"}
TYPED_CONTENTS = {"FP32": "fp32_contents", "INT64": "int64_contents"}


def input_chunk(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> np.ndarray | dict[str, np.ndarray]:
    """The request's inputs (``x``, or the names model.json declares): the model's one input as
    [steps, features] (FP32) or [steps] (INT64 ids), or every input by name for a model of
    several. A batch of exactly 1; each input's values in raw_input_contents (one entry per
    input, in the request's order) or in its typed contents (not both, as in Triton). The
    requested outputs must be the model's."""
    declared = {t.name: t for t in spec.tensors.inputs}
    names = [i.name for i in request.inputs]
    if sorted(names) != sorted(declared):
        wanted = ", ".join(repr(n) for n in declared)
        raise InvalidArgument(
            f"model {spec.label} takes {'inputs' if len(declared) > 1 else 'exactly one input'} "
            f"named {wanted}, got {shown_names(names)}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} input(s); "
            "send one entry per input"
        )
    arrays = {
        tensor.name: one_input(tensor, declared[tensor.name], raw[k] if raw else None)
        for k, tensor in enumerate(request.inputs)
    }
    outputs = {o.name for o in spec.tensors.outputs}
    for output in request.outputs:
        if output.name not in outputs:
            known = ", ".join(repr(n) for n in outputs)
            raise InvalidArgument(
                f"model {spec.label} has output(s) {known}; unknown {shown(output.name)}"
            )
    return arrays[names[0]] if len(arrays) == 1 else arrays


def one_input(tensor: pb.ModelInferRequest.InferInputTensor, declared: TensorSpec,
              raw: bytes | None) -> np.ndarray:  # fmt: skip
    """One request input as [steps, ...] in its declared type (see :func:`input_chunk`)."""
    name, datatype = declared.name, KSERVE_DTYPES[declared.dtype]
    what = f"input {name!r}"
    if tensor.datatype != datatype:
        raise InvalidArgument(f"{what} must be {datatype}, got {shown_datatype(tensor.datatype)}")
    typed = typed_contents(tensor)
    if raw is not None:
        if typed:
            raise InvalidArgument(
                f"{what} has both raw_input_contents and {typed[0]}; send its values in one"
            )
        if datatype == "INT64":
            x = decode_int64(tensor.shape, raw, what)
        else:
            x = decode_float32(tensor.shape, raw, what)
    else:
        wrong = [kind for kind in typed if kind != TYPED_CONTENTS[datatype]]
        if wrong:
            raise InvalidArgument(
                f"{what} is {datatype}: send its values in {TYPED_CONTENTS[datatype]} or "
                f"raw_input_contents, not {wrong[0]}"
            )
        if datatype == "INT64":
            x = from_ints(tensor.shape, tensor.contents.int64_contents, what)
        else:
            x = from_floats(tensor.shape, tensor.contents.fp32_contents, what)
    if x.ndim != 2 + len(declared.shape) or x.shape[0] != 1:
        wanted = f"[1, steps, {declared.size}]" if declared.shape else "[1, steps]"
        raise InvalidArgument(
            f"{what} must be {wanted} (a sequence request carries batch size 1), got "
            f"{list(x.shape)}"
        )
    chunk: np.ndarray = x[0]
    return chunk


DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
    | {"FP16", "FP32", "FP64", "BF16", "BYTES"}
)
SHOWN_NAMES = 2  # names quoted in a message; the rest are counted


def shown_names(names: list[str]) -> str:
    """Input names a client sent, for a message: the first few, each quoted briefly."""
    quoted = [shown(name, 40) for name in names[:SHOWN_NAMES]]
    if len(names) > SHOWN_NAMES:
        quoted.append(f"... ({len(names)} inputs)")
    return f"[{', '.join(quoted)}]"


def shown_datatype(datatype: str) -> str:
    """A client's datatype for a message: a KServe datatype as it is, anything else quoted."""
    if not datatype:
        return "no datatype"
    return datatype if datatype in DATATYPES else shown(datatype)


def typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> list[str]:
    """The typed contents fields (``fp32_contents``, ``int_contents``...) that hold values."""
    if not tensor.HasField("contents"):
        return []
    return [field.name for field, _ in tensor.contents.ListFields()]


def unparsed_reply(message: str) -> pb.ModelStreamInferResponse:
    """A stream's in-band answer to a request that does not parse: no model or id to echo."""
    return error_reply(pb.ModelInferRequest(), message)


def fill_infer_response(
    message: pb.ModelInferResponse,
    request: pb.ModelInferRequest,
    spec: ModelSpec,
    result: StepResult,
) -> pb.ModelInferResponse:
    """Write ``result`` (output ``y`` as [1, steps, outputs]) into ``message`` in place: a stream's
    reply wraps the response, and filling it there saves copying a built one in."""
    message.model_name = spec.name
    message.model_version = result.model_version or spec.version
    message.id = request.id
    sig = spec.tensors
    requested = {o.name for o in request.outputs}  # none named: every output
    parts = [result.output] if len(sig.outputs) == 1 else sig.split_outputs(result.output)
    for tensor, y in zip(sig.outputs, parts, strict=True):
        if requested and tensor.name not in requested:
            continue
        message.outputs.add(name=tensor.name, datatype="FP32", shape=(1, *y.shape))
        message.raw_output_contents.append(float32_bytes(y))
    message.parameters["sequence_steps"].int64_param = result.steps
    start = request.parameters.get("sequence_start")
    if start is not None and start.bool_param:  # the incarnation changes only at a START
        message.parameters["sequence_incarnation"].string_param = incarnation_text(
            result.incarnation
        )
    return message


def model_metadata(
    spec: ModelSpec, signature: ModelSignature, versions: list[str]
) -> pb.ModelMetadataResponse:
    """Every input and output with its datatype and shape, as Triton reports a model whose config
    has ``max_batch_size > 0``: the batch dimension first (-1), then one sequence's shape
    (``[-1, features]``: steps, then features). The states are kept by the server, not sent by
    clients (Triton's implicit state): they are declared in the ModelConfig, not here."""
    tensor = pb.ModelMetadataResponse.TensorMetadata

    def described(t: TensorDescription) -> pb.ModelMetadataResponse.TensorMetadata:
        return tensor(name=t.name, datatype=t.datatype, shape=[DYNAMIC, *t.shape])

    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=versions,
        platform=PLATFORM,
        inputs=[described(t) for t in signature.inputs],
        outputs=[described(t) for t in signature.outputs],
    )


# KServe datatype names as the model configuration's enum (BYTES is TYPE_STRING there).
CONFIG_DATATYPES: dict[str, mc.DataType] = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BF16": mc.TYPE_BF16,
    "BYTES": mc.TYPE_STRING,
}


def config_datatype(datatype: str) -> mc.DataType:
    return CONFIG_DATATYPES.get(datatype, mc.TYPE_INVALID)


def model_config(spec: ModelSpec, signature: ModelSignature, settings: Settings) -> mc.ModelConfig:
    """Triton's configuration of a sequence model: inputs and outputs with dims without the batch
    dimension (``max_batch_size > 0``), and the sequence batcher with every state declared as
    Triton declares implicit state (input and output name, datatype, one sequence's dims, zeros at
    the START). No ``control_input``: these models take no control tensors (the server itself
    starts a sequence's state from zeros at START and drops it at END)."""
    sequence = mc.ModelSequenceBatching
    return mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=settings.max_batch_size,
        input=[
            mc.ModelInput(name=t.name, data_type=config_datatype(t.datatype), dims=t.shape)
            for t in signature.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=config_datatype(t.datatype), dims=t.shape)
            for t in signature.outputs
        ],
        sequence_batching=sequence(
            max_sequence_idle_microseconds=int(settings.session_ttl_s * 1e6),
            oldest=sequence.StrategyOldest(
                max_candidate_sequences=settings.max_sessions,
                max_queue_delay_microseconds=int(settings.max_queue_delay_s * 1e6),
            ),
            state=[
                sequence.State(
                    input_name=s.input_name,
                    output_name=s.output_name,
                    data_type=config_datatype(s.datatype),
                    dims=s.shape,
                    initial_state=initial_state_config(s),
                )
                for s in signature.states
            ],
        ),
    )


def initial_state_config(state: StateDescription) -> list[mc.ModelSequenceBatching.InitialState]:
    """Where a state starts at a sequence's START, in Triton's words: zeros are ``zero_data``;
    a value model.json's signature declares has no Triton form but a file, so none is listed
    (GetModel's ``initial`` says "declared"; the value is in model.json)."""
    if state.initial != ZEROS:
        return []
    return [
        mc.ModelSequenceBatching.InitialState(
            name=f"{state.input_name} zeros",
            data_type=config_datatype(state.datatype),
            dims=state.shape,
            zero_data=True,
        )
    ]


ERROR_REPLY_OVERHEAD_BYTES = 256  # field framing and the sequence_steps parameter


def error_reply(
    request: pb.ModelInferRequest,
    message: str,
    session_steps: int | None = None,
    max_bytes: int | None = None,
) -> pb.ModelStreamInferResponse:
    """A stream's in-band answer to a failed request: Triton's error_message, the request's id,
    and (parameter ``sequence_steps``) the sequence's step count when it is known: a failed
    request is never applied. The request's model name, version and id are echoed only if the
    reply then fits ``max_bytes``: a reply too large to send would end the whole stream."""
    echoed = len(request.id) + len(request.model_name) + len(request.model_version)
    size = echoed + len(message.encode()) + ERROR_REPLY_OVERHEAD_BYTES
    echo = max_bytes is None or size <= max_bytes
    reply = pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name if echo else "",
            model_version=request.model_version if echo else "",
            id=request.id if echo else "",
        ),
    )
    if session_steps is not None:
        reply.infer_response.parameters["sequence_steps"].int64_param = session_steps
    return reply


# ----- the model repository extension (RepositoryIndex, RepositoryModelLoad / Unload) -----------


def repository_index(entries: Sequence[IndexEntry]) -> pb.RepositoryIndexResponse:
    """The index as Triton answers it: a line per model version, its state and why."""
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries
        ]
    )


def check_load_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    """RepositoryModelLoad's parameters: none is taken. A model comes from the repository with
    its model.json and serving.json, never from a configuration or files in the request
    (tritonclient's ``load_model(config=..., files=...)``)."""
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            raise InvalidArgument(
                f"RepositoryModelLoad parameter {shown(key, 40)} is not supported: a model loads "
                "from the repository as it is there (<name>/<version>/model.onnx + model.json, "
                "<name>/serving.json); write it there, then load it by name"
            )
        raise InvalidArgument(f"unknown RepositoryModelLoad parameter {shown(key, 40)}")


def check_unload_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    """RepositoryModelUnload's parameters: ``unload_dependents`` (bool; tritonclient always sends
    it) is taken and means nothing here: no model depends on another."""
    for key, value in parameters.items():
        if key != "unload_dependents":
            raise InvalidArgument(f"unknown RepositoryModelUnload parameter {shown(key, 40)}")
        if value.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidArgument("unload_dependents must be a bool parameter")
