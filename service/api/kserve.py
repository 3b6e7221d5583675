"""KServe v2 inference protocol with Triton's sequence extension (package ``inference``).

Sequence semantics follow Triton: ``sequence_id`` (int64 or string; int ids are kept as their
decimal text, so 5 and "5" name the same sequence), ``sequence_start`` opens (or restarts) the
sequence, ``sequence_end`` closes it after the request, and a request without START for an unknown
id fails with INVALID_ARGUMENT. Each request carries one chunk: ``x`` of shape [1, steps, features].
The recurrent state never appears in this API.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from service import __version__
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as mc
from service.api.auth import caller_of
from service.api.status import count_failure, deadline_of, translate_errors
from service.api.tensors import decode_float32, float32_bytes, from_floats
from service.engine import Caller, InferenceEngine, ModelHandle, StepResult
from service.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from service.metrics import Metrics
from service.session_store import Session, check_session_id

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
    start = bool_parameter(params, "sequence_start")
    end = bool_parameter(params, "sequence_end")
    if not sequence_id:
        raise InvalidArgument(
            f"inference request to model {request.model_name!r} must specify a non-zero or non-empty "
            "sequence_id: this model keeps state per sequence"
        )
    return SequenceControl(sequence_id, start, end)


def bool_parameter(params: Mapping[str, pb.InferParameter], name: str) -> bool:
    p = params.get(name)
    if p is None:
        return False
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


def fill_infer_response(
    message: pb.ModelInferResponse,
    request: pb.ModelInferRequest,
    handle: ModelHandle,
    result: StepResult,
) -> pb.ModelInferResponse:
    """Write ``result`` (output ``y`` as [1, steps, outputs]) into ``message`` in place: a stream's
    reply wraps the response, and filling it there saves copying a built one in."""
    spec = handle.spec
    message.model_name = spec.name
    message.model_version = spec.version
    message.id = request.id
    y = result.output
    message.outputs.add(name="y", datatype="FP32", shape=(1, *y.shape))
    message.raw_output_contents.append(float32_bytes(y))
    message.parameters["sequence_steps"].int64_param = result.steps
    return message


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
        handle, session, x, end = self.prepare(request, caller_of(context))
        result = await self.engine.step_session(
            handle,
            session,
            x,
            api=API,
            end=end,
            received_s=received,
            deadline_s=deadline_of(context, received),
        )
        return fill_infer_response(pb.ModelInferResponse(), request, handle, result)

    def prepare(
        self, request: pb.ModelInferRequest, caller: Caller, control: SequenceControl | None = None
    ) -> tuple[ModelHandle, Session, np.ndarray, bool]:
        """Everything before the chunk is queued: the model, the sequence (opened or restarted on
        START), the chunk. Returns them and whether END closes the sequence after this chunk.
        ``control``: the request's sequence parameters if the caller has read them already."""
        handle = self.engine.model(request.model_name, request.model_version)
        if control is None:
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
        return handle, session, x, control.end

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of different sequences run concurrently (and batch together); requests of one
        sequence run in arrival order. Replies come in completion order, each echoing its request id;
        a failed request answers with ``error_message`` and the stream stays open."""
        # A stream's deadline is fixed when it starts, so it is read once, not per request.
        stream = StreamRequests(self, caller_of(context), deadline_of(context, time.perf_counter()))

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    stream.receive(request)
            finally:  # the client half-closed, or the read failed: reply to what came, then end
                stream.input_ended()

        reader = asyncio.create_task(read_requests())
        try:
            while (reply := await stream.replies.get()) is not None:
                yield reply
        finally:
            stream.closed = True
            reader.cancel()


class StreamRequests:
    """The requests of one ModelStreamInfer stream, from arrival to reply.

    Concurrency (all on the loop thread, no task per request): a request's chunk is queued with
    the engine as it arrives (:meth:`InferenceEngine.submit_step`) and its reply is built in the
    done callback of the chunk's future. A request whose sequence already has one in flight waits
    in that sequence's line and starts when the one before it has finished, so the chunks of a
    sequence apply in arrival order while different sequences share batches. Once the stream has
    closed, waiting requests are dropped; chunks already queued still apply (see the scheduler).
    """

    def __init__(self, servicer: KServeServicer, caller: Caller, deadline_s: float | None) -> None:
        self.servicer = servicer
        self.engine = servicer.engine
        self.caller = caller
        self.deadline_s = deadline_s
        self.replies = ReplyChannel()
        self.closed = False
        # A key per sequence with a request in flight, holding the requests waiting behind it.
        self._lines: dict[str, collections.deque[tuple[pb.ModelInferRequest, SequenceControl | None]]] = {}  # fmt: skip
        self._unanswered = 0
        self._input_ended = False

    def receive(self, request: pb.ModelInferRequest) -> None:
        try:
            control: SequenceControl | None = sequence_control(request)
        except ServiceError:  # reported by the request's own reply; malformed ids share a line
            control = None
        key = f"{request.model_name}\0{control.sequence_id if control else '?'}"
        self._unanswered += 1
        line = self._lines.get(key)
        if line is not None:
            line.append((request, control))
            return
        self._lines[key] = collections.deque()
        self._start(request, control, key)

    def input_ended(self) -> None:
        self._input_ended = True
        if not self._unanswered:
            self.replies.put(None)

    def _start(
        self, request: pb.ModelInferRequest, control: SequenceControl | None, key: str
    ) -> None:
        received = time.perf_counter()
        try:
            handle, session, x, end = self.servicer.prepare(request, self.caller, control)
            future = self.engine.submit_step(handle, session, x, self.deadline_s)
        except Exception as error:
            self._answer(key, self._error_reply(request, error))
            return
        future.add_done_callback(
            functools.partial(self._computed, request, key, handle, session, end, received)
        )

    def _computed(
        self,
        request: pb.ModelInferRequest,
        key: str,
        handle: ModelHandle,
        session: Session,
        end: bool,
        received_s: float,
        future: asyncio.Future[np.ndarray],
    ) -> None:
        reply = pb.ModelStreamInferResponse()
        try:
            output = future.result()
            result = self.engine.finish_step(
                handle, session, output, api=API, received_s=received_s, end=end
            )
            fill_infer_response(reply.infer_response, request, handle, result)
        except asyncio.CancelledError:  # nothing cancels these futures; never leave one unanswered
            reply = self._error_reply(request, Unavailable("the request was cancelled"))
        except Exception as error:
            reply = self._error_reply(request, error)
        self._answer(key, reply)

    def _answer(self, key: str, reply: pb.ModelStreamInferResponse) -> None:
        self.replies.put(reply)
        self._unanswered -= 1
        line = self._lines[key]
        if line and not self.closed:
            request, control = line.popleft()
            self._start(request, control, key)
        else:
            del self._lines[key]
        if self._input_ended and not self._unanswered:
            self.replies.put(None)

    def _error_reply(
        self, request: pb.ModelInferRequest, error: Exception
    ) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(
            error_message=count_failure(error, self.servicer.metrics, API),
            infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            ),
        )


class ReplyChannel:
    """A stream's replies in completion order: the stream's done callbacks put, its generator
    gets.

    Leaner than ``asyncio.Queue`` on this per-request path: unbounded, and only ever one waiter
    (the generator), so a put just wakes that waiter's future if there is one. Loop thread only.
    """

    def __init__(self) -> None:
        self._items: collections.deque[pb.ModelStreamInferResponse | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: pb.ModelStreamInferResponse | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> pb.ModelStreamInferResponse | None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()
