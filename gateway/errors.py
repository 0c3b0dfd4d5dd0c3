"""The gateway's errors: each carries its HTTP status, and the edge turns it into TF Serving's `{"error": "..."}`
body in one place. Foreign exceptions (upstream I/O, config) become these at the boundary where they happen."""

from __future__ import annotations


class GatewayError(Exception):
    status = 500

    def __init__(self, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers  # sent with the error: WWW-Authenticate, Retry-After, RateLimit-*


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class TooManyRequests(GatewayError):
    status = 429


class BadRequest(GatewayError):
    status = 400


class NotFound(GatewayError):
    status = 404


class PayloadTooLarge(GatewayError):
    """A request past limits.max_body_bytes; over gRPC, RESOURCE_EXHAUSTED, as gRPC answers a message too large."""

    status = 413


class BadGateway(GatewayError):
    """The backend failed before a complete answer, and no retry could save the request."""

    status = 502


class Unavailable(GatewayError):
    """No backend can take the request now (none healthy), or the gateway is shutting down."""

    status = 503


class GatewayTimeout(GatewayError):
    status = 504
