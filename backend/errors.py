"""One error hierarchy for the backend, translated once at each edge.

Every error carries the status code TensorFlow Serving would report (a `grpc.StatusCode`), from which the REST edge
derives the HTTP status with the same table TF Serving's HTTP server uses. Model code raises these; foreign exceptions
become `ServingError`s at the boundary that caught them (`raise ... from`).
"""

from __future__ import annotations

import grpc

# What a client is told of an unexpected error (a bug), on either edge; the server log has the rest.
INTERNAL_MESSAGE = "Internal error while serving the request; see the server log"
# gRPC status details travel as the grpc-message trailer, percent-encoded, and clients refuse metadata past 16 KB: a
# message echoing a 100 KB name reached the client as RESOURCE_EXHAUSTED "Stream removed" instead of its own code.
MAX_DETAILS_CHARS = 1000


def status_details(message: str) -> str:
    """`message` as gRPC status details: cut to MAX_DETAILS_CHARS, since it may echo a client's name of any length."""
    return message if len(message) <= MAX_DETAILS_CHARS else message[:MAX_DETAILS_CHARS] + "… (cut)"

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class ServingError(Exception):
    """An error a client is told about: a status code and a message safe to show."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.code]


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BodyTooLarge(ResourceExhausted):
    """A request body past the server's limit: 413 over HTTP, where the server's own limit answers the same."""

    @property
    def http_status(self) -> int:
        return 413


class Internal(ServingError):
    code = grpc.StatusCode.INTERNAL


class Unknown(ServingError):
    code = grpc.StatusCode.UNKNOWN
