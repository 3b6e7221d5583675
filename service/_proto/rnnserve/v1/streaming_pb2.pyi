from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_CLOSED: _ClassVar[EndReason]
    END_REASON_IDLE_TIMEOUT: _ClassVar[EndReason]
    END_REASON_EVICTED: _ClassVar[EndReason]
    END_REASON_SHUTDOWN: _ClassVar[EndReason]
    END_REASON_FAILED: _ClassVar[EndReason]
    END_REASON_MOVED: _ClassVar[EndReason]
END_REASON_UNSPECIFIED: EndReason
END_REASON_CLOSED: EndReason
END_REASON_IDLE_TIMEOUT: EndReason
END_REASON_EVICTED: EndReason
END_REASON_SHUTDOWN: EndReason
END_REASON_FAILED: EndReason
END_REASON_MOVED: EndReason

class Tensor(_message.Message):
    __slots__ = ("shape", "data", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    dtype: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., dtype: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "version", "session_id", "initial_state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    session_id: str
    initial_state: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., session_id: _Optional[str] = ..., initial_state: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("model", "version", "session_id", "input", "end", "expected_steps", "incarnation", "inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    session_id: str
    input: Tensor
    end: bool
    expected_steps: int
    incarnation: str
    inputs: _containers.MessageMap[str, Tensor]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., session_id: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., end: _Optional[bool] = ..., expected_steps: _Optional[int] = ..., incarnation: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "output", "steps", "ended", "durable_steps", "outputs")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    output: Tensor
    steps: int
    ended: bool
    durable_steps: int
    outputs: _containers.MessageMap[str, Tensor]
    def __init__(self, session_id: _Optional[str] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., steps: _Optional[int] = ..., ended: _Optional[bool] = ..., durable_steps: _Optional[int] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("model", "version", "session_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    session_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("model", "version", "session_id", "include_state", "incarnation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    session_id: str
    include_state: bool
    incarnation: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., session_id: _Optional[str] = ..., include_state: _Optional[bool] = ..., incarnation: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "version", "steps", "idle_seconds", "state", "durable_steps", "last_output", "incarnation")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: str
    steps: int
    idle_seconds: float
    state: _containers.RepeatedCompositeFieldContainer[Tensor]
    durable_steps: int
    last_output: Tensor
    incarnation: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., steps: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., state: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., durable_steps: _Optional[int] = ..., last_output: _Optional[_Union[Tensor, _Mapping]] = ..., incarnation: _Optional[str] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("session_id", "reason", "steps")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: EndReason
    steps: int
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[_Union[EndReason, str]] = ..., steps: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("open", "attach", "chunk", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: CreateSessionRequest
    attach: GetSessionRequest
    chunk: Chunk
    close: Close
    def __init__(self, open: _Optional[_Union[CreateSessionRequest, _Mapping]] = ..., attach: _Optional[_Union[GetSessionRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("input", "expected_steps", "inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    INPUT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    expected_steps: int
    inputs: _containers.MessageMap[str, Tensor]
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., expected_steps: _Optional[int] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("opened", "output", "ended")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionInfo
    output: StepResponse
    ended: SessionEnded
    def __init__(self, opened: _Optional[_Union[SessionInfo, _Mapping]] = ..., output: _Optional[_Union[StepResponse, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "refused")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[RefusedModel, _Mapping]]] = ...) -> None: ...

class RefusedModel(_message.Message):
    __slots__ = ("name", "version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "datatype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    datatype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., datatype: _Optional[str] = ...) -> None: ...

class StateSpec(_message.Message):
    __slots__ = ("input_name", "output_name", "datatype", "shape", "initial")
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    input_name: str
    output_name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    initial: str
    def __init__(self, input_name: _Optional[str] = ..., output_name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., initial: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "cell", "layers", "hidden_size", "input_size", "output_size", "task", "output_kind", "description", "sha256", "input", "output", "state", "metadata_json", "inputs", "outputs", "states", "labels", "vocabulary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    cell: str
    layers: int
    hidden_size: int
    input_size: int
    output_size: int
    task: str
    output_kind: str
    description: str
    sha256: str
    input: TensorSpec
    output: TensorSpec
    state: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    metadata_json: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    states: _containers.RepeatedCompositeFieldContainer[StateSpec]
    labels: _containers.RepeatedScalarFieldContainer[str]
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., input_size: _Optional[int] = ..., output_size: _Optional[int] = ..., task: _Optional[str] = ..., output_kind: _Optional[str] = ..., description: _Optional[str] = ..., sha256: _Optional[str] = ..., input: _Optional[_Union[TensorSpec, _Mapping]] = ..., output: _Optional[_Union[TensorSpec, _Mapping]] = ..., state: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., metadata_json: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., states: _Optional[_Iterable[_Union[StateSpec, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., vocabulary: _Optional[_Iterable[str]] = ...) -> None: ...
