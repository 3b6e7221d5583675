"""Who is calling: bearer tokens checked in one interceptor, client certificates, peer addresses.

The interceptor runs before every RPC except health checks (probes carry no token). A request with
a missing or unknown token ends with UNAUTHENTICATED before any servicer code runs. A known token
names an identity, which the interceptor hands to the servicers in a context variable: the RPC's
handler runs in its own task, so the value is private to that RPC. Tokens are compared in constant
time and never logged.
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from service.session import Caller
from service.settings import Settings

logger = logging.getLogger(__name__)

AUTHENTICATED_OWNER: contextvars.ContextVar[str] = contextvars.ContextVar(
    "authenticated_owner", default=""
)
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenFileError(ValueError):
    """The tokens file or variable is malformed."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """``identity:token`` entries (lines or commas) as {token: identity}."""
    tokens: dict[str, str] = {}
    for number, entry in enumerate(text.replace(",", "\n").splitlines(), 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        identity, sep, token = entry.partition(":")
        if not sep or not identity.strip() or len(token.strip()) < 16:
            raise TokenFileError(
                f"{source} entry {number}: expected 'identity:token' with a token of at least "
                "16 characters"
            )
        tokens[token.strip()] = identity.strip()
    return tokens


def load_tokens(settings: Settings) -> dict[str, str]:
    tokens = parse_tokens(settings.auth_tokens.get_secret_value(), "RNNSERVE_AUTH_TOKENS")
    if settings.auth_tokens_file is not None:
        path: Path = settings.auth_tokens_file
        tokens.update(parse_tokens(path.read_text(), str(path)))
    return tokens


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return ""


def _identity_for(token: str, tokens: dict[str, str]) -> str | None:
    found = None
    for known, identity in tokens.items():  # every entry, to take the same time for any token
        if hmac.compare_digest(known.encode(), token.encode()):
            found = identity
    return found


def _kind(handler: grpc.RpcMethodHandler) -> str:
    request = "stream" if handler.request_streaming else "unary"
    return f"{request}_{'stream' if handler.response_streaming else 'unary'}"


def _refuse(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED. (A
    streaming call must get a streaming handler: a unary one would wait for a request message
    that a bidirectional client may never send first.)"""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    factory = getattr(grpc, f"{_kind(handler)}_rpc_method_handler")
    return factory(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _with_owner(handler: grpc.RpcMethodHandler, owner: str) -> grpc.RpcMethodHandler:
    """The same handler, run with ``owner`` in :data:`AUTHENTICATED_OWNER`."""
    kind = _kind(handler)
    behavior: Callable[..., Any] = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            AUTHENTICATED_OWNER.set(owner)
            async for response in behavior(request, context):
                yield response

        wrapped: Callable[..., Any] = generator
    else:

        async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            AUTHENTICATED_OWNER.set(owner)
            return await behavior(request, context)

        wrapped = coroutine
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise ValueError("no tokens configured")
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if not token:
            return _refuse(handler, "this server needs 'authorization: Bearer <token>' metadata")
        owner = _identity_for(token, self.tokens)
        if owner is None:
            logger.warning("refused a call to %s with an unknown token", method)
            return _refuse(handler, "unknown token")
        return _with_owner(handler, owner)


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """The caller of an RPC: its token identity, else its client certificate's common name (mutual
    TLS), else anonymous; per-client limits count anonymous callers by peer address."""
    owner = AUTHENTICATED_OWNER.get()
    if not owner:
        names = context.auth_context().get("x509_common_name")
        if names:
            owner = "cert:" + names[0].decode(errors="replace")
    if owner:
        return Caller(owner=owner, client=owner)
    peer = context.peer() or ""
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return Caller(owner="", client=host)
