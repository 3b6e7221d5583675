"""Domain errors to gRPC status codes, in one place, and the failure counter."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics

logger = logging.getLogger(__name__)

GRPC_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Trailing metadata of an error about a session's chunk: the session's step count (the chunk was
# not applied; no error ever follows an applied chunk).
SESSION_STEPS_KEY = "rnnserve-session-steps"

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def deadline_of(context: grpc.aio.ServicerContext, received_s: float) -> float | None:
    """The RPC's deadline as a ``time.perf_counter()`` instant (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else received_s + remaining


class ModelNames(Protocol):
    """What :func:`model_label` needs of the engine: the versions served under a name."""

    def versions(self, name: str) -> list[str]: ...


def model_label(engine: ModelNames, name: str) -> str:
    """The ``model`` label of a failure: the name the request gave if a model of that name is
    served, else "" (a client's made-up name must never become a label value)."""
    return name if name and engine.versions(name) else ""


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for any exception raised by the core."""
    if isinstance(error, ServiceError):
        return GRPC_CODES[error.kind], error.message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"


def counted_code(error: BaseException, code: grpc.StatusCode) -> str:
    """The ``code`` label under which ``error``, answered with ``code``, is counted in
    ``rnnserve_failures_total``: ``code``, unless the error says it is counted as another kind
    (``counted_as``): an answer whose wire code a protocol fixes (UNAVAILABLE for a model load
    that model_control forbids, as Triton answers) but which is a client's mistake, not a
    fault of the server, must not fire the alert on the server's own failures."""
    kind = getattr(error, "counted_as", None)
    counted = GRPC_CODES[kind] if isinstance(kind, ErrorKind) else code
    name: str = counted.name
    return name


async def abort(
    context: grpc.aio.ServicerContext,
    error: BaseException,
    metrics: Metrics,
    api: str,
    model: str = "",
) -> NoReturn:
    """Count the failure (``model``: a :func:`model_label`) and end the RPC with its status."""
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("internal error in %s api", api, exc_info=error)
    metrics.failures.labels(api, counted_code(error, code), model).inc()
    steps = error.session_steps if isinstance(error, ServiceError) else None
    if steps is not None:  # a refused chunk is never applied: where its session stands
        context.set_trailing_metadata(((SESSION_STEPS_KEY, str(steps)),))
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def count_failure(error: BaseException, metrics: Metrics, api: str, model: str = "") -> str:
    """Count a failure reported in-band (Triton's stream error_message); returns the message."""
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("internal error in %s api", api, exc_info=error)
    metrics.failures.labels(api, counted_code(error, code), model).inc()
    return message


def translate_errors(api: str, model_field: str = "model") -> Callable[[Handler], Handler]:
    """Decorate a unary servicer method (of a servicer with ``engine`` and ``metrics``): domain
    errors become their gRPC status, counted under the model the request's ``model_field``
    names (if one of that name is served)."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await handler(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                model = model_label(self.engine, getattr(request, model_field, ""))
                await abort(context, error, self.metrics, api, model)

        return wrapper  # type: ignore[return-value]

    return decorate
