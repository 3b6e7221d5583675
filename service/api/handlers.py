"""A service's gRPC method handlers, built from its protobuf service descriptor, whose request
deserialisers never raise.

The generated ``add_*Servicer_to_server`` functions register protobuf's ``FromString``: bytes that
do not parse (garbage, or a proto3 string field that is not UTF-8) then fail inside gRPC before any
of our code runs, and the client sees UNKNOWN. Here such a request becomes an :class:`Unparsed`
marker instead. A unary call given one ends with INVALID_ARGUMENT, counted in
``rnnserve_failures_total``; a stream's request pump (:mod:`service.api.streams`) answers one as
its API answers any failed request: a native stream fails with the status, a KServe stream replies
in-band (the marker carries that reply) and goes on.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from service.api.status import abort, count_failure
from service.errors import InvalidArgument
from service.metrics import Metrics

InBandReply = Callable[[str], Message]  # an error message -> a stream's in-band reply to it


@dataclass(frozen=True, slots=True)
class Unparsed:
    """What a handler gets in place of a request whose bytes do not parse as ``message_type``.

    ``reply``: the stream's in-band answer to it, where the stream's API answers failed requests
    in-band (its failure is counted when it is built); None: the failure ends the call.
    """

    message_type: str
    reply: Message | None = None

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request does not parse as {self.message_type}: it is not a valid protobuf "
            "message of that type (or a string field in it is not UTF-8)"
        )


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    api: str,
    metrics: Metrics,
    in_band: InBandReply | None = None,
) -> None:
    """Register ``servicer``'s methods for every RPC of ``service`` (its method of the same name).

    ``in_band``: how this API's streams answer a failed request without ending (None: a failed
    request ends its stream)."""
    handlers = {
        method.name: method_handler(method, getattr(servicer, method.name), api, metrics, in_band)
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def method_handler(
    method: MethodDescriptor,
    behavior: Callable[..., Any],
    api: str,
    metrics: Metrics,
    in_band: InBandReply | None,
) -> grpc.RpcMethodHandler:
    """The handler of one RPC, of the kind (unary or stream, each way) its descriptor says."""
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    streams_in, streams_out = method.client_streaming, method.server_streaming
    parse = lenient_parser(request_class, api, metrics, in_band if streams_in else None)
    serialize = response_class.SerializeToString
    if streams_in and streams_out:  # the servicer's request pump answers the markers
        return grpc.stream_stream_rpc_method_handler(
            behavior, request_deserializer=parse, response_serializer=serialize
        )
    if streams_in:
        raise NotImplementedError(f"{method.full_name}: client-streaming RPCs are not served")
    if streams_out:  # a servicer writes a stream by yielding, or by awaiting context.write
        generator = inspect.isasyncgenfunction(behavior)
        wrap: Callable[..., Any] = refusing_unparsed_stream if generator else refusing_unparsed
        return grpc.unary_stream_rpc_method_handler(
            wrap(behavior, api, metrics),
            request_deserializer=parse,
            response_serializer=serialize,
        )
    return grpc.unary_unary_rpc_method_handler(
        refusing_unparsed(behavior, api, metrics),
        request_deserializer=parse,
        response_serializer=serialize,
    )


def lenient_parser(
    request_class: type[Message], api: str, metrics: Metrics, in_band: InBandReply | None
) -> Callable[[bytes], Message | Unparsed]:
    """A request deserialiser that never raises: bytes that do not parse give an Unparsed."""
    message_type = request_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Unparsed:
        try:
            return request_class.FromString(data)
        except Exception:  # DecodeError, whatever the protobuf backend says in detail
            unparsed = Unparsed(message_type)
            if in_band is None:
                return unparsed
            return Unparsed(message_type, in_band(count_failure(unparsed.error(), metrics, api)))

    return parse


def refusing_unparsed(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], api: str, metrics: Metrics
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """A coroutine ``behavior`` that ends the call with INVALID_ARGUMENT on an Unparsed."""

    @functools.wraps(behavior)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsed):
            await abort(context, request.error(), metrics, api)
        return await behavior(request, context)

    return unary


def refusing_unparsed_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    api: str,
    metrics: Metrics,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """An async generator ``behavior`` that ends the call with INVALID_ARGUMENT on an Unparsed."""

    @functools.wraps(behavior)
    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Unparsed):
            await abort(context, request.error(), metrics, api)
        async for response in behavior(request, context):
            yield response

    return unary_stream
