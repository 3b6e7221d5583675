"""The client's path to the server: telling a broken path from a server's refusal, the
reconnect policy, and the ``x-session-id`` routing key on every call of a session.

A session's stream can break because the server restarted or crashed, or because a proxy in
front of it (nginx, Envoy) lost its path to the server; such a break is retried (reconnect,
attach, replay: service.client_session), while an error the server itself sent is raised at once.
:func:`is_dead_path` tells the two apart, :class:`Reconnect` bounds the retries, and
:class:`SessionRouting` adds ``x-session-id`` to every unary call that names a session, so that a
load balancer hashing it sends all of a session's calls to one server (docs/SCALING.md).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc

# Status codes that always mean a broken path (the server is restarting, or the call was cut).
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

# The routing key: a load balancer hashes it so that every call of a session reaches one server.
SESSION_HEADER = "x-session-id"
# Trailing metadata the server puts on every error about a session's chunk (its step count): an
# error that carries it comes from an rnnserve server, never from a proxy (service.api.status).
SESSION_STEPS_KEY = "rnnserve-session-steps"
# What gRPC reports when a proxy lost the path to the server (the server died or restarted under
# a stream, or could not be reached): nginx resets the stream ("Stream removed (RST_STREAM
# (Received RST_STREAM with error code 2))", INTERNAL), Envoy says "upstream connect error ...",
# and a proxy answering with an HTTP error instead of gRPC gets its status in the message (502,
# 503 and 504 as UNAVAILABLE, which is retried anyway; others as UNKNOWN). Matched in the details
# of INTERNAL and UNKNOWN errors only, lower-cased; an rnnserve server's own INTERNAL errors say
# "model ... failed" or "internal error (...)" and are never retried.
DEAD_PATH_SIGNATURES = (
    "stream removed",
    "rst_stream",
    "upstream connect error",
    "upstream prematurely closed",
    "upstream reset",
    "no healthy upstream",
    "connection reset",
    "socket closed",
    "goaway",
    "status: 502",
    "status: 503",
    "status: 504",
    "bad gateway",
    "gateway timeout",
)


def routing_value(session_id: str) -> str:
    """The ``x-session-id`` value for a session: the id itself, or, for an id that is not visible
    ASCII (which gRPC metadata cannot carry as it is), its UTF-8 percent-encoded. Any client of the
    session must send the same value (tritonclient users: ``str(sequence_id)``)."""
    if session_id and all("!" <= c <= "~" for c in session_id):
        return session_id
    return urllib.parse.quote(session_id, safe="")


def routing_metadata(session_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call of ``session_id`` (none for an id not known yet)."""
    return ((SESSION_HEADER, routing_value(session_id)),) if session_id else ()


def is_server_error(error: grpc.RpcError) -> bool:
    """Whether ``error`` visibly comes from an rnnserve server: it carries the session's step
    count in its trailing metadata."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return any(key == SESSION_STEPS_KEY for key, _ in trailing or ())


def is_dead_path(error: grpc.RpcError) -> bool:
    """Whether ``error`` says that the path to the server went away (reconnect and resume), rather
    than that the server refused or failed the call (raise it): UNAVAILABLE or CANCELLED, or an
    INTERNAL or UNKNOWN that no server sent and that reads as a proxy's (:data:`DEAD_PATH_SIGNATURES`).
    """
    code = error.code()
    if code in RECONNECT_CODES:
        return True
    if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) or is_server_error(error):
        return False
    details = (error.details() or "").lower()
    return any(signature in details for signature in DEAD_PATH_SIGNATURES)


@dataclasses.dataclass(frozen=True)
class Reconnect:
    """How a session reconnects after its stream breaks: at most ``attempts`` tries, for at most
    ``timeout_s`` seconds in all, waiting before each further try a random time between half and
    all of a backoff that starts at ``first_backoff_s`` and doubles up to ``max_backoff_s``."""

    timeout_s: float = 60.0
    attempts: int = 100
    first_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.timeout_s < 0 or self.first_backoff_s <= 0:
            raise ValueError(f"a reconnect policy needs attempts >= 1 and a backoff > 0: {self}")
        if self.max_backoff_s < self.first_backoff_s:
            raise ValueError(f"max_backoff_s is below first_backoff_s: {self}")


class ServerGone(Exception):
    """The stream told us the server is going away (shutdown notice), or ended without a reply."""


def in_flight_still(error: grpc.RpcError) -> bool:
    """The server refused a resumed chunk because the previous stream's send of it (or of one
    before it) may still be computing: the path broke, not the server. Attaching again shows
    whether it was applied."""
    code = error.code()
    if code == grpc.StatusCode.ABORTED:  # applied meanwhile: the next attach shows it
        return True
    return code == grpc.StatusCode.FAILED_PRECONDITION and "in flight" in (error.details() or "")


def describe_break(error: BaseException) -> str:
    """What broke a session's stream, as ``StreamingSession.breaks`` lists it ("CODE: details")."""
    if isinstance(error, grpc.RpcError):
        code = error.code()
        return f"{code.name if code is not None else 'RpcError'}: {error.details()}"
    return f"{type(error).__name__.lstrip('_')}: {error}"


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class SessionRouting(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``x-session-id`` to every unary call whose request names a session (CreateSession with
    a named id, Step, GetSession, CloseSession): made through ``Client.stub`` by this library
    or its user, they reach the server that holds the session. Streams get it when opened."""

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        session_id = getattr(request, "session_id", "")
        metadata = tuple(details.metadata or ())
        if session_id and not any(key == SESSION_HEADER for key, _ in metadata):
            details = _CallDetails(
                details.method, details.timeout, metadata + routing_metadata(session_id),
                details.credentials, details.wait_for_ready, details.compression,
            )  # fmt: skip
        return continuation(details, request)
