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
    INTERNAL = "internal"


class ServiceError(Exception):
    """An error a client can act on; ``message`` is safe to send to it (never holds input data)."""

    kind = ErrorKind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(ServiceError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(ServiceError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    kind = ErrorKind.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class InternalError(ServiceError):
    kind = ErrorKind.INTERNAL


class ModelContractError(Exception):
    """A model in the repository does not follow the ONNX contract; raised at load, stops start-up."""
