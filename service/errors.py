"""Domain errors of the core. The protocol adapters map each kind to a status code in one place
(``service.api.status``); the core never imports grpc."""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ABORTED = "aborted"
    INTERNAL = "internal"


MAX_SHOWN_CHARS = 100


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` (something a client sent) quoted for an error message, cut to ``limit`` characters:
    a message never grows with what the client sent, so it always fits in a status."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class ServiceError(Exception):
    """An error a client can act on; ``message`` is safe to send to it (never holds input data).

    ``session_steps``: where the error concerns a session's chunk, the session's step count when it
    was refused (a refused chunk is never applied); the adapters send it to the client.
    """

    kind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, session_steps: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.session_steps = session_steps

    def with_session_steps(self, steps: int | None) -> ServiceError:
        """This error carrying the step count ``steps`` (a copy if it carries another: one error
        object may fail the chunks of several sessions; None: unchanged)."""
        if steps is None or self.session_steps == steps:
            return self
        copy = self._copy()
        copy.session_steps = steps
        return copy

    def reworded(self, message: str) -> ServiceError:
        """This error, of its kind and with its fields, saying ``message`` (an API's own words)."""
        copy = self._copy()
        copy.message = message
        copy.args = (message,)
        return copy

    def _copy(self) -> ServiceError:
        copy = type(self).__new__(type(self))  # no __init__: a subclass's takes other arguments
        copy.args = self.args
        copy.__dict__.update(self.__dict__)  # a subclass's own fields too
        return copy


class InvalidArgument(ServiceError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(ServiceError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(ServiceError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    kind = ErrorKind.FAILED_PRECONDITION


class Unconfirmed(FailedPrecondition):
    """The session was restored from a snapshot that may be behind the last reply its client got
    (the server stopped without a final snapshot), and the chunk does not state the step count it
    expects and the session's incarnation. The KServe adapter answers it as Triton answers an
    unknown sequence, in its own words (:meth:`situation`)."""

    def __init__(self, session_id: str, steps: int) -> None:
        self.session_id = session_id
        super().__init__(
            f"{self.situation('session', session_id, steps)}; send the chunk with the step count "
            "you expect (expected_steps) and the session's incarnation (StepRequest.incarnation, "
            "or attach with it) to go on from there",
            session_steps=steps,
        )

    @staticmethod
    def situation(noun: str, session_id: str, steps: int) -> str:
        """What happened to the session (``noun``: what the API calls it)."""
        return (
            f"{noun} {shown(session_id)} was restored after an unclean stop from its last saved "
            f"state (a snapshot, or the cluster store) at step {steps}, which may be behind the "
            "last reply you got"
        )


class OtherIncarnation(NotFound):
    """The client named an incarnation the session is not: the id was closed and opened again, or
    the sequence restarted (START), since the client knew it."""


class ResourceExhausted(ServiceError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    """A chunk stated the step count it expects its session to be at, and the session is not
    there (its chunk was applied already, or the session is another history): not applied."""

    kind = ErrorKind.ABORTED


class InternalError(ServiceError):
    kind = ErrorKind.INTERNAL


class UsageError(ValueError):
    """A command line asked for something that cannot be (a value out of range, a setting that
    does not apply): ``rnnserve`` prints it in one line and exits 2."""


class ModelContractError(Exception):
    """A model in the repository does not follow the ONNX contract; raised at load, stops start-up."""
