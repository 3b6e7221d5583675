"""The native API (package rnnserve.v1): each RPC converts its message and calls the engine once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.auth import caller_of
from service.api.native_messages import (
    chunk_inputs,
    fill_step_response,
    initial_state,
    model_info,
    session_ended,
    session_info,
    stream_output,
)
from service.api.status import abort, deadline_of, translate_errors
from service.api.streams import RequestPump
from service.chunks import StepResult
from service.engine import InferenceEngine
from service.errors import FailedPrecondition, InvalidArgument, Unavailable
from service.metrics import Metrics
from service.session import Caller, EndReason, Session, SessionEnd

API = "native"


class NativeServicer(pb_grpc.StreamingInferenceServicer):  # type: ignore[misc]  # untyped base
    def __init__(self, engine: InferenceEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    @translate_errors(API)
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        view = await self.engine.open_session(
            request.model,
            request.version,
            request.session_id or None,
            initial_state(list(request.initial_state)),
            api=API,
            caller=caller_of(context),
        )
        return session_info(view)

    @translate_errors(API)
    async def Step(
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        received = time.perf_counter()
        caller = caller_of(context)
        await self.engine.bring(request.model, request.version, request.session_id, caller)
        result = await self.engine.submit(
            request.model,
            request.version,
            request.session_id,
            chunk_inputs(request.input, request.inputs, request.HasField("input")),
            api=API,
            received_s=received,
            caller=caller,
            deadline_s=deadline_of(context, received),
            end=request.end,
            expected_steps=request.expected_steps if request.HasField("expected_steps") else None,
            incarnation=request.incarnation,
        )
        return fill_step_response(pb.StepResponse(), result)

    @translate_errors(API)
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionEnded:
        caller = caller_of(context)
        await self.engine.bring(request.model, request.version, request.session_id, caller)
        end = await self.engine.close_session(
            request.model, request.version, request.session_id, caller
        )
        return session_ended(end)

    @translate_errors(API)
    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        caller = caller_of(context)
        await self.engine.bring(request.model, request.version, request.session_id, caller)
        view = self.engine.session_view(
            request.model,
            request.version,
            request.session_id,
            request.include_state,
            caller,
            request.incarnation,
        )
        return session_info(view)

    @translate_errors(API)
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        handles = self.engine.handles()
        refused = []
        for label, reason in self.engine.registry.refused.items():
            name, _, version = label.partition("/")
            refused.append(pb.RefusedModel(name=name, version=version, reason=reason))
        return pb.ListModelsResponse(
            models=[model_info(h, self.engine.versions(h.spec.name)) for h in handles],
            refused=refused,
        )

    @translate_errors(API)
    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        handle = self.engine.model(request.model, request.version)
        return model_info(handle, self.engine.versions(handle.spec.name))

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """One session per stream; requests are answered one at a time, in order."""
        stream = SessionStream(self.engine, context, caller_of(context))
        try:
            async for reply in stream.pump.replies(request_iterator, stream.handle):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await abort(context, error, self.metrics, API, stream.model)
        finally:
            stream.detach()


class SessionStream:
    """The state of one native stream: the session it is bound to, and its request pump.

    A stream handles one request at a time: a request sent before the previous chunk's reply
    waits for it, so chunks apply in order and replies come in request order (its pump's window
    is 1: reading pauses while more than one request is unanswered). A session that ends from
    outside the stream (idle timeout, eviction, shutdown, a close by another call) is announced
    with a final ``SessionEnded`` message: the session's end listener hands it to the pump, which
    sends it and ends the stream.
    """

    def __init__(
        self, engine: InferenceEngine, context: grpc.aio.ServicerContext, caller: Caller
    ) -> None:
        self.engine = engine
        self.caller = caller
        self.pump: RequestPump[pb.StreamRequest, pb.StreamResponse] = RequestPump(window=1)
        self.model = ""
        self.version = ""
        self.session_id = ""
        self.incarnation = ""
        self.bound: Session | None = None  # the session, while it lives
        self.in_flight: asyncio.Future[StepResult] | None = None  # the last chunk's future
        # A stream's deadline is fixed when it starts, so it is read once, not per chunk.
        self.deadline_s = deadline_of(context, time.perf_counter())

    async def handle(self, request: pb.StreamRequest) -> None:
        if self.in_flight is not None and not self.in_flight.done():
            # Sent before the previous chunk's reply (a pipelining client): wait for it, so that
            # requests are handled one at a time and replies keep their order.
            await asyncio.wait([self.in_flight])
        kind = request.WhichOneof("kind")
        if kind == "open" or kind == "attach":
            await self._bind(request, kind)
            return
        if kind not in ("chunk", "close"):
            raise InvalidArgument("empty stream message: set open, attach, chunk or close")
        if not self.session_id:
            raise FailedPrecondition("open or attach a session before sending chunks")
        if kind == "close":
            self.detach()
            await self.engine.bring(self.model, self.version, self.session_id, self.caller)
            end = await self.engine.close_session(
                self.model, self.version, self.session_id, self.caller
            )
            self.pump.finish(pb.StreamResponse(ended=session_ended(end)))
            return
        chunk = request.chunk
        self.in_flight = self.engine.submit(
            self.model,
            self.version,
            self.session_id,
            chunk_inputs(chunk.input, chunk.inputs, chunk.HasField("input")),
            api=API,
            received_s=time.perf_counter(),
            caller=self.caller,
            deadline_s=self.deadline_s,
            expected_steps=chunk.expected_steps if chunk.HasField("expected_steps") else None,
            incarnation=self.incarnation,
        )
        self.in_flight.add_done_callback(self._answer)

    async def _bind(self, request: pb.StreamRequest, kind: str) -> None:
        """``open`` a new session or ``attach`` to one: the stream's session from now on."""
        if self.session_id:
            raise FailedPrecondition("this stream already has a session; open a new stream")
        if kind == "open":
            o = request.open
            view = await self.engine.open_session(
                o.model,
                o.version,
                o.session_id or None,
                initial_state(list(o.initial_state)),
                api=API,
                caller=self.caller,
            )
        else:
            a = request.attach
            await self.engine.bring(a.model, a.version, a.session_id, self.caller)
            view = self.engine.session_view(
                a.model, a.version, a.session_id, a.include_state, self.caller, a.incarnation
            )
        self.model, self.version, self.session_id = view.model, view.version, view.session_id
        # The incarnation the client knows: the one this stream opened, or the one it named when
        # attaching ("" if none: then a session restored unconfirmed cannot be confirmed here).
        self.incarnation = view.incarnation if kind == "open" else request.attach.incarnation
        _, self.bound = self.engine.session(view.model, view.version, view.session_id, self.caller)
        self.bound.add_end_listener(self._on_end)
        self.pump.reply(pb.StreamResponse(opened=session_info(view)))

    def _answer(self, future: asyncio.Future[StepResult]) -> None:
        """Done callback of a chunk's future: its reply, or the error that ends the stream."""
        if future.cancelled():
            self.pump.fail(Unavailable("the chunk was cancelled"))
        elif (error := future.exception()) is not None:
            self.pump.fail(error)
        else:
            self.pump.reply(stream_output(future.result()))

    def _on_end(self, session: Session, reason: EndReason) -> None:
        """The session ended from outside this stream (its own close detaches first): a close by
        another call included, so that the stream can never go on with a session opened again
        under the same id."""
        self.bound = None
        end = SessionEnd(session.session_id, reason, session.steps)
        self.pump.finish(pb.StreamResponse(ended=session_ended(end)))

    def detach(self) -> None:
        if self.bound is not None:
            self.bound.remove_end_listener(self._on_end)
        self.bound = None
