"""KServe v2 inference protocol with Triton's sequence extension (package ``inference``).

Sequence semantics follow Triton: ``sequence_id`` (int64 or string; int ids are kept as their
decimal text, so 5 and "5" name the same sequence), ``sequence_start`` opens (or restarts) the
sequence, ``sequence_end`` closes it after the request, and a request without START for an unknown
id fails with INVALID_ARGUMENT. Each request carries one chunk: ``x`` of shape [1, steps, features].
The recurrent state never appears in this API.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from service import __version__
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as mc
from service.api.auth import caller_of
from service.api.status import count_failure, deadline_of, translate_errors
from service.api.tensors import decode_float32, encode_float32, from_floats
from service.engine import Caller, InferenceEngine, ModelHandle
from service.errors import InvalidArgument, NotFound, ServiceError
from service.metrics import Metrics
from service.session_store import check_session_id

API = "kserve"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["sequence", "sequence(string_id)", "model_configuration"]


@dataclass(frozen=True)
class SequenceControl:
    sequence_id: str
    start: bool
    end: bool


def sequence_control(request: pb.ModelInferRequest) -> SequenceControl:
    """Read Triton's sequence parameters; a sequence id is required for these stateful models."""
    params = request.parameters
    sequence_id = ""
    if "sequence_id" in params:
        p = params["sequence_id"]
        choice = p.WhichOneof("parameter_choice")
        if choice == "int64_param":
            sequence_id = "" if p.int64_param == 0 else str(p.int64_param)
        elif choice == "uint64_param":
            sequence_id = "" if p.uint64_param == 0 else str(p.uint64_param)
        elif choice == "string_param":
            sequence_id = p.string_param
            if sequence_id:
                check_session_id(sequence_id)
        else:
            raise InvalidArgument("sequence_id must be an int64, uint64 or string parameter")
    start = bool_parameter(request, "sequence_start")
    end = bool_parameter(request, "sequence_end")
    if not sequence_id:
        raise InvalidArgument(
            f"inference request to model {request.model_name!r} must specify a non-zero or non-empty "
            "sequence_id: this model keeps state per sequence"
        )
    return SequenceControl(sequence_id, start, end)


def bool_parameter(request: pb.ModelInferRequest, name: str) -> bool:
    if name not in request.parameters:
        return False
    p = request.parameters[name]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"{name} must be a bool parameter")
    return p.bool_param


def input_chunk(request: pb.ModelInferRequest, handle: ModelHandle) -> np.ndarray:
    """The request's ``x`` as [steps, features]; it must be FP32 with a batch of exactly 1."""
    if len(request.inputs) != 1 or request.inputs[0].name != "x":
        names = [i.name for i in request.inputs]
        raise InvalidArgument(
            f"model {handle.spec.label} takes exactly one input named 'x', got {names}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InvalidArgument(f"input 'x' must be FP32, got {tensor.datatype or 'no datatype'}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument("raw_input_contents must hold one entry per input (1)")
        x = decode_float32(tensor.shape, request.raw_input_contents[0], "input 'x'")
    else:
        x = from_floats(tensor.shape, tensor.contents.fp32_contents, "input 'x'")
    if x.ndim != 3 or x.shape[0] != 1:
        raise InvalidArgument(
            f"input 'x' must be [1, steps, {handle.spec.input_size}] (a sequence request carries "
            f"batch size 1), got {list(x.shape)}"
        )
    for output in request.outputs:
        if output.name != "y":
            raise InvalidArgument(
                f"model {handle.spec.label} has one output, 'y'; unknown {output.name!r}"
            )
    return x[0]


def infer_response(
    request: pb.ModelInferRequest, handle: ModelHandle, y: np.ndarray, steps: int
) -> pb.ModelInferResponse:
    shape, data = encode_float32(y[None])
    response = pb.ModelInferResponse(
        model_name=handle.spec.name,
        model_version=handle.spec.version,
        id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=shape)],
        raw_output_contents=[data],
    )
    response.parameters["sequence_steps"].int64_param = steps
    return response


def model_config(handle: ModelHandle, engine: InferenceEngine) -> mc.ModelConfig:
    spec, settings = handle.spec, engine.settings
    return mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=settings.max_batch_size,
        input=[mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=[-1, spec.input_size])],
        output=[mc.ModelOutput(name="y", data_type=mc.TYPE_FP32, dims=[-1, spec.output_size])],
        sequence_batching=mc.ModelSequenceBatching(
            max_sequence_idle_microseconds=int(settings.session_ttl_s * 1e6),
            oldest=mc.ModelSequenceBatching.StrategyOldest(
                max_candidate_sequences=settings.max_sessions,
                max_queue_delay_microseconds=int(settings.max_queue_delay_s * 1e6),
            ),
        ),
    )


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self.engine.model(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.engine.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="rnnserve", version=__version__, extensions=EXTENSIONS
        )

    @translate_errors(API)
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        handle = self.engine.model(request.name, request.version)
        spec = handle.spec
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=self.engine.versions(spec.name),
            platform=PLATFORM,
            inputs=[tensor(name="x", datatype="FP32", shape=[-1, -1, spec.input_size])],
            outputs=[tensor(name="y", datatype="FP32", shape=[-1, -1, spec.output_size])],
        )

    @translate_errors(API)
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        handle = self.engine.model(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(handle, self.engine))

    @translate_errors(API)
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        received = time.perf_counter()
        return await self.infer(
            request, caller_of(context), deadline_of(context, received), received
        )

    async def infer(
        self,
        request: pb.ModelInferRequest,
        caller: Caller,
        deadline_s: float | None,
        received_s: float,
    ) -> pb.ModelInferResponse:
        handle = self.engine.model(request.model_name, request.model_version)
        control = sequence_control(request)
        x = input_chunk(request, handle)
        spec = handle.spec
        if control.start:
            self.engine.check_chunk(spec, x)  # before START opens anything (step checks it too)
            self.engine.open_session(
                spec.name, spec.version, control.sequence_id, api=API, restart=True, caller=caller
            )
        try:
            _, session = self.engine.session(spec.name, spec.version, control.sequence_id, caller)
        except NotFound:  # never after a START, which has just opened it
            raise InvalidArgument(
                f"inference request for sequence {control.sequence_id} to model {spec.name!r} must "
                "specify the START flag on the first request of the sequence"
            ) from None
        result = await self.engine.step_session(
            handle,
            session,
            x,
            api=API,
            end=control.end,
            received_s=received_s,
            deadline_s=deadline_s,
        )
        return infer_response(request, handle, result.output, result.steps)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of different sequences run concurrently (and batch together); requests of one
        sequence run in arrival order. Replies come in completion order, each echoing its request id;
        a failed request answers with ``error_message`` and the stream stays open."""
        caller = caller_of(context)
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        last_of_sequence: dict[str, asyncio.Task[None]] = {}
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest, before: asyncio.Task[None] | None) -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                received = time.perf_counter()
                response = await self.infer(
                    request, caller, deadline_of(context, received), received
                )
                reply = pb.ModelStreamInferResponse(infer_response=response)
            except Exception as error:
                message = count_failure(error, self.metrics, API)
                reply = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            await replies.put(reply)

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    key = sequence_key(request)
                    task = asyncio.create_task(answer(request, last_of_sequence.get(key)))
                    last_of_sequence[key] = task
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    task.add_done_callback(functools.partial(forget, key))
            finally:
                if pending:
                    await asyncio.wait(list(pending))
                await replies.put(None)

        def forget(key: str, task: asyncio.Task[None]) -> None:
            if last_of_sequence.get(key) is task:
                del last_of_sequence[key]

        reader = asyncio.create_task(read_requests())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()


def sequence_key(request: pb.ModelInferRequest) -> str:
    """Orders requests of one sequence within a stream; malformed ids still get a stable key."""
    try:
        return f"{request.model_name}\0{sequence_control(request).sequence_id}"
    except ServiceError:
        return f"{request.model_name}\0?"
