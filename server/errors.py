"""What the server's rooms raise, and the one table that maps each onto a gRPC status code, an HTTP status and an
OpenAI error type: both front doors answer an exception the same way."""

from __future__ import annotations

from dataclasses import dataclass

from ttt.lease import LeaseHeld, LeaseLost
from ttt.model import BaseModelMismatch
from ttt.storage import StoreUnavailable
from ttt.store import SessionFormatError


class AuthError(Exception):
    """No key, or an unknown one."""


class NotFound(KeyError):
    """No such session for this user (also another user's: never say it exists)."""


class AlreadyExists(ValueError):
    pass


class Conflict(Exception):
    """The request clashes with the session's state now (another document being read into it, a resumed upload that
    does not start where the session's unfinished document ends): nothing changed; try again once it is settled.
    ``error_code`` names which, for clients that retry ("session_busy", "document_offset")."""

    def __init__(self, message: str, error_code: str):
        super().__init__(message)
        self.error_code = error_code


class QuotaExceeded(Exception):
    """Over a per-user quota or limit: refused before anything changed."""


class TooLarge(QuotaExceeded):
    """A request body over the server's limit (HTTP 413): refused while it streams in, before it is parsed."""


class Forbidden(Exception):
    """A request the server will not take from where it came (open mode: another web page, a foreign Host)."""


class QueueFull(Exception):
    """More units are waiting for the device than the configured limit."""


class ShuttingDown(Exception):
    """The server is starting, or no longer accepts work."""


class StreamIdle(Exception):
    """A stream whose client sent nothing within the allowed time (cancelled; the client sees it as a timeout)."""


@dataclass(frozen=True)
class Status:
    grpc: str  # a grpc.StatusCode name
    http: int
    kind: str  # OpenAI's error type


# The first entry whose types the exception is an instance of (subclasses before their bases). The message is
# the exception's own text: it names no path or other user.
STATUSES: list[tuple[type[Exception] | tuple[type[Exception], ...], Status]] = [
    (AuthError, Status("UNAUTHENTICATED", 401, "authentication_error")),
    (Forbidden, Status("PERMISSION_DENIED", 403, "permission_error")),
    (TooLarge, Status("RESOURCE_EXHAUSTED", 413, "invalid_request_error")),
    (NotFound, Status("NOT_FOUND", 404, "not_found_error")),
    (AlreadyExists, Status("ALREADY_EXISTS", 409, "conflict_error")),
    ((Conflict, LeaseLost), Status("ABORTED", 409, "conflict_error")),
    ((QuotaExceeded, QueueFull), Status("RESOURCE_EXHAUSTED", 429, "rate_limit_error")),
    ((SessionFormatError, BaseModelMismatch), Status("FAILED_PRECONDITION", 409, "conflict_error")),
    ((ShuttingDown, LeaseHeld, StoreUnavailable), Status("UNAVAILABLE", 503, "service_unavailable")),
    (StreamIdle, Status("DEADLINE_EXCEEDED", 408, "timeout_error")),
    # a bad value; OverflowError: a number too big (e.g. in a layers spec); UnicodeDecodeError is a ValueError
    ((ValueError, OverflowError), Status("INVALID_ARGUMENT", 400, "invalid_request_error")),
]
INTERNAL = Status("INTERNAL", 500, "server_error")


def status_of(e: BaseException) -> Status:
    """How both doors answer ``e``; INTERNAL for an exception nobody expected (logged, its text not shown)."""
    return next((status for types, status in STATUSES if isinstance(e, types)), INTERNAL)


def message_of(e: BaseException) -> str:
    """What the client is told: the exception's own text (a KeyError's would be its repr), but nothing of an
    unexpected one (INTERNAL: its text may name paths or internals; it is logged instead)."""
    if status_of(e) is INTERNAL:
        return "internal error"
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
