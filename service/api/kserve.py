"""KServe v2 inference protocol with Triton's sequence extension (package ``inference``).

Each RPC converts its message (``service.api.kserve_messages``) and calls the engine once. A
request without START for a sequence the server does not know fails with INVALID_ARGUMENT, as in
Triton; requests of one sequence wait their turn in the core and apply in arrival order.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator

import grpc

from service import __version__
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.auth import caller_of
from service.api.kserve_messages import (
    API,
    EXTENSIONS,
    check_load_parameters,
    check_unload_parameters,
    error_reply,
    fill_infer_response,
    input_chunk,
    model_config,
    model_metadata,
    repository_index,
    sequence_control,
    sequence_id_of,
)
from service.api.native_messages import model_signature
from service.api.status import (
    abort,
    count_failure,
    deadline_of,
    model_label,
    translate_errors,
)
from service.api.streams import RequestPump
from service.chunks import StepResult
from service.cluster import Reservation
from service.engine import InferenceEngine
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OtherIncarnation,
    ServiceError,
    Unavailable,
    Unconfirmed,
    shown,
)
from service.metrics import Metrics
from service.repository import ModelSpec
from service.session import Caller, broken_sequence


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # untyped base
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
            handle = self.engine.model(request.name, request.version)
        except (NotFound, Unavailable, FailedPrecondition):  # unknown, loading, unloaded
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.engine.ready and handle.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="rnnserve", version=__version__, extensions=EXTENSIONS
        )

    @translate_errors(API, "name")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        handle = self.engine.model(request.name, request.version)
        signature = model_signature(handle.spec, handle.runtime)
        return model_metadata(handle.spec, signature, self.engine.versions(handle.spec.name))

    @translate_errors(API, "name")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        handle = self.engine.model(request.name, request.version)
        signature = model_signature(handle.spec, handle.runtime)
        return pb.ModelConfigResponse(
            config=model_config(handle.spec, signature, handle.settings)  # its own max_batch_size
        )

    @translate_errors(API)
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every model of the repository (the one there is: ``repository_name`` is not
        consulted) and its versions' states; ``ready``: only those serving."""
        return repository_index(
            await self.engine.control.repository_index(ready_only=request.ready)
        )

    @translate_errors(API, "model_name")
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Load (or follow again) a model from the repository; answers once it serves."""
        check_load_parameters(request.parameters)
        await self.engine.control.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @translate_errors(API, "model_name")
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload a model: it takes no new sessions at once; its live sessions go on."""
        check_unload_parameters(request.parameters)
        await self.engine.control.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @translate_errors(API, "model_name")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        caller = caller_of(context)
        try:
            reserved = await self.bring(request, caller)
        except ServiceError as error:
            raise as_triton(error) from None
        spec, future = self.submit(
            request, caller, deadline_of(context, time.perf_counter()), reserved
        )
        try:
            result = await future
        except ServiceError as error:
            raise as_triton(error) from None
        return fill_infer_response(pb.ModelInferResponse(), request, spec, result)

    async def bring(
        self,
        request: pb.ModelInferRequest,
        caller: Caller,
        broken: dict[str, str] | None = None,
    ) -> Reservation | None:
        """In a cluster, bring the request's sequence to this replica before :meth:`submit`
        (a hand-over), or reserve a START's new id (:meth:`InferenceEngine.bring`). A malformed
        request brings nothing: :meth:`submit` refuses it as it would anyway.

        ``broken`` (a stream's): sequences whose request on the stream failed here, before its
        sequence was here to be marked broken. The requests sent behind it must not apply to a
        history without it, so they are refused the same way until one re-anchors the sequence
        (a START, or a stated step count), as :func:`service.session.break_sequence` does."""
        if self.engine.cluster is None:
            return None
        sequence_id = routing_id(request)
        if not sequence_id:
            return None
        try:
            control = sequence_control(request, sequence_id)
        except ServiceError:
            return None
        anchored = control.start or control.expected_steps is not None
        if broken is not None and sequence_id in broken and not anchored:
            raise broken_sequence(sequence_id, broken[sequence_id])
        name, version = request.model_name, request.model_version
        try:
            reserved = await self.engine.bring(
                name, version, sequence_id, caller, start=control.start
            )
        except ServiceError as error:
            if broken is not None:
                broken.setdefault(sequence_id, error.message)
            raise
        if broken is not None:
            broken.pop(sequence_id, None)
        return reserved

    def submit(
        self,
        request: pb.ModelInferRequest,
        caller: Caller,
        deadline_s: float | None,
        reserved: Reservation | None = None,
    ) -> tuple[ModelSpec, asyncio.Future[StepResult]]:
        """Convert a request and hand its chunk to the engine; returns the spec of the model
        version that computes it and the chunk's future. The one path of both ModelInfer and
        ModelStreamInfer (which, in a cluster, :meth:`bring` the sequence here first)."""
        received = time.perf_counter()
        name, version = request.model_name, request.model_version
        try:
            spec = self.engine.model(name, version).spec
        except FailedPrecondition:  # no version takes new sequences: this one may live on one
            spec = self.engine.route(name, version, routing_id(request), caller).spec
        sequence_id = sequence_id_of(request)  # any error after this one is its sequence's
        try:
            control = sequence_control(request, sequence_id)
            # The request is read, and answered, in the tensor names of the version that computes
            # it: the one its sequence lives on, which need not be the newest.
            spec = self.computing_spec(name, version, sequence_id, control.start, caller)
            x = input_chunk(request, spec)
            future = self.engine.submit(
                spec.name,
                request.model_version,  # "": the newest, or the version the sequence is on
                sequence_id,
                x,
                api=API,
                received_s=received,
                caller=caller,
                deadline_s=deadline_s,
                start=control.start,
                end=control.end,
                wait_if_busy=True,
                expected_steps=control.expected_steps,
                incarnation=control.incarnation,
                reply_extra_bytes=len(request.id),
                reserved=reserved,
            )
        except NotFound as error:
            if isinstance(error, OtherIncarnation):
                steps = self.engine.sequence_failed(
                    spec.name, request.model_version, sequence_id, caller, error
                )
                raise as_triton(error.with_session_steps(steps)) from None
            # The model exists (looked up above): the sequence does not.
            if control.expected_steps is not None or control.incarnation:
                raise InvalidArgument(
                    f"sequence {shown(sequence_id)} of model {shown(spec.name)} is not known "
                    "here: it ended, or it began after the last snapshot before an unclean stop "
                    "of the server; send START to begin it again"
                ) from None
            raise InvalidArgument(
                f"inference request for sequence {shown(sequence_id)} to model "
                f"{shown(spec.name)} must specify the START flag on the first request of the "
                "sequence"
            ) from None
        except ServiceError as error:  # the requests sent behind it must not skip it
            steps = self.engine.sequence_failed(
                spec.name, request.model_version, sequence_id, caller, error
            )
            raise error.with_session_steps(steps) from None
        return spec, future

    def computing_spec(
        self, name: str, version: str, sequence_id: str, start: bool, caller: Caller
    ) -> ModelSpec:
        """The spec of the version :meth:`InferenceEngine.submit` will compute this request on:
        a START naming no version begins its sequence on the newest version; any other request
        goes to the version it names, else to the one its sequence lives on (else the newest)."""
        if start and not version:
            return self.engine.model(name).spec
        return self.engine.route(name, version, sequence_id, caller).spec

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of different sequences run concurrently (and batch together); requests of one
        sequence apply in arrival order. Replies come in completion order, each echoing its
        request id; a failed request answers with ``error_message`` and the stream stays open. At
        most ``max_stream_requests_in_flight`` requests are unanswered before reading pauses."""
        caller = caller_of(context)
        # A stream's deadline is fixed when it starts, so it is read once, not per request.
        deadline_s = deadline_of(context, time.perf_counter())
        pump: RequestPump[pb.ModelInferRequest, pb.ModelStreamInferResponse] = RequestPump(
            self.engine.settings.max_stream_requests_in_flight
        )

        broken: dict[str, str] = {}  # see bring()

        async def handle(request: pb.ModelInferRequest) -> None:
            try:
                # (awaited before the next request is read: a sequence's order is kept)
                reserved = await self.bring(request, caller, broken)
                spec, future = self.submit(request, caller, deadline_s, reserved)
            except Exception as error:
                pump.reply(failed_reply(request, error))
                return
            future.add_done_callback(functools.partial(answer, request, spec))

        def answer(
            request: pb.ModelInferRequest, spec: ModelSpec, future: asyncio.Future[StepResult]
        ) -> None:
            reply = pb.ModelStreamInferResponse()
            try:
                fill_infer_response(reply.infer_response, request, spec, future.result())
            except (Exception, asyncio.CancelledError) as error:  # every request is answered
                reply = failed_reply(request, error)
            pump.reply(reply)

        def failed_reply(
            request: pb.ModelInferRequest, error: BaseException
        ) -> pb.ModelStreamInferResponse:
            if isinstance(error, ServiceError):
                error = as_triton(error)
            steps = error.session_steps if isinstance(error, ServiceError) else None
            model = model_label(self.engine, request.model_name)
            message = count_failure(error, self.metrics, API, model)
            return error_reply(request, message, steps, self.engine.settings.max_message_bytes)

        try:
            async for reply in pump.replies(request_iterator, handle):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # the request stream broke (a failed request answers in-band)
            await abort(context, error, self.metrics, API)


def routing_id(request: pb.ModelInferRequest) -> str:
    """The request's sequence id to find the version it lives on; "" when it has none or a
    malformed one (then the request fails as it would anyway)."""
    try:
        return sequence_id_of(request)
    except InvalidArgument:
        return ""


def as_triton(error: ServiceError) -> ServiceError:
    """``error`` in the words of a KServe client: a sequence restored after an unclean stop and
    continued without its step count and incarnation, or one that is no longer the incarnation
    the client names, is refused as Triton refuses a sequence it does not know
    (INVALID_ARGUMENT), saying how to go on; elsewhere "session" reads "sequence"."""
    message = error.message.replace("session", "sequence", 1)
    steps = error.session_steps
    if isinstance(error, Unconfirmed):
        what = Unconfirmed.situation("sequence", error.session_id, steps or 0)
        return InvalidArgument(
            f"{what}; send sequence_start to begin the sequence again, or resume it: replay your "
            f"requests from step {steps} with the parameters sequence_expected_steps and "
            "sequence_incarnation (from the reply to its START)",
            session_steps=steps,
        )
    if isinstance(error, OtherIncarnation):
        return InvalidArgument(
            f"{message}; send sequence_start to begin it again", session_steps=steps
        )
    return error.reworded(message)
