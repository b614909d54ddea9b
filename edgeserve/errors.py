"""Domain errors. Each carries the HTTP status it maps to; the web layer maps them in one place.

Messages are shown to clients as they are, so they must never contain a secret,
a token, a path outside the model repository, or a stack trace.
"""

from __future__ import annotations


class EdgeserveError(Exception):
    """Base of every error a client may see; `status` is the HTTP status code."""

    status: int = 500
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if headers is not None:
            self.headers = headers


class InvalidInput(EdgeserveError):
    status = 400


class Unauthorized(EdgeserveError):
    status = 401


class Forbidden(EdgeserveError):
    status = 403


class ModelNotFound(EdgeserveError):
    status = 404


class NotFound(EdgeserveError):
    status = 404


class MethodNotAllowed(EdgeserveError):
    status = 405


class Conflict(EdgeserveError):
    status = 409


class PayloadTooLarge(EdgeserveError):
    status = 413


class UnsupportedMediaType(EdgeserveError):
    status = 415


class InsufficientStorage(EdgeserveError):
    """A disk quota or the free-space floor would be passed: refused before it is."""

    status = 507


class Overloaded(EdgeserveError):
    """The model's queue is full: refused at once so the client can retry elsewhere or later."""

    status = 429


class ClientClosed(EdgeserveError):
    """The client went away before its answer (nginx's 499): not a server error."""

    status = 499


class ModelNotReady(EdgeserveError):
    status = 503


class DeadlineExceeded(EdgeserveError):
    status = 504


class InferenceFailed(EdgeserveError):
    """The runtime raised while computing; the backend's own message is logged, not returned."""

    status = 500
