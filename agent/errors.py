"""Errors that cross the API boundary.

Every error a client can see is a subclass of :class:`ApiError`. Protocol errors keep
JSON-RPC 2.0's codes; application errors use the canonical status vocabulary (the
numbers of gRPC's status codes) so a client can decide what to do from the name alone::

    ApiError                      code   what the caller should conclude
    ├── ProtocolError
    │   ├── ParseError           -32700  the message was not JSON (or not Unicode)
    │   ├── InvalidRequest       -32600  not a JSON-RPC 2.0 request (or too large)
    │   ├── MethodNotFound       -32601  no such method on this agent
    │   ├── InvalidParams        -32602  params do not match the method's schema
    │   └── InternalError        -32603  a bug in the agent; nothing to retry
    └── StatusError
        ├── Cancelled                 1  the operation was cancelled
        ├── InvalidArgument           3  params are well-formed but not acceptable
        ├── DeadlineExceeded          4  the operation did not finish in time
        ├── NotFound                  5  the named object does not exist
        ├── AlreadyExists             6  an object with that name or id exists
        ├── PermissionDenied          7  the caller's role or the VM policy does not allow it
        ├── ResourceExhausted         8  a limit was hit; retry later
        ├── FailedPrecondition        9  the object is not in a state that allows it
        ├── Aborted                  10  a conflicting operation is in progress
        ├── Unimplemented            12  not supported on this host
        ├── Internal                 13  an invariant broke inside the agent
        ├── Unavailable              14  a dependency (libvirtd...) is down; retry
        └── Unauthenticated          16  the caller could not be identified

``error.data`` always carries ``name`` (the word above) and ``reason`` (a stable
machine-readable detail such as ``vm_running``), plus ``object``/``id`` when the error
is about one object, plus any extra fields the raiser supplies.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    """Base class of every error that is reported to a client."""

    code: ClassVar[int] = -32603
    name: ClassVar[str] = "InternalError"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        object: str | None = None,
        id: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.object = object
        self.id = id
        self.details = details

    def to_error(self) -> dict[str, Any]:
        """Return the JSON-RPC ``error`` member for this exception."""
        data: dict[str, Any] = {"name": self.name}
        if self.reason is not None:
            data["reason"] = self.reason
        if self.object is not None:
            data["object"] = self.object
        if self.id is not None:
            data["id"] = self.id
        data.update(self.details)
        return {"code": self.code, "message": self.message, "data": data}


class ProtocolError(ApiError):
    """A JSON-RPC 2.0 protocol-level error."""


class ParseError(ProtocolError):
    code = -32700
    name = "ParseError"


class InvalidRequest(ProtocolError):
    code = -32600
    name = "InvalidRequest"


class MethodNotFound(ProtocolError):
    code = -32601
    name = "MethodNotFound"


class InvalidParams(ProtocolError):
    code = -32602
    name = "InvalidParams"


class InternalError(ProtocolError):
    code = -32603
    name = "InternalError"


class StatusError(ApiError):
    """An application error from the canonical status vocabulary."""


class Cancelled(StatusError):
    code = 1
    name = "Cancelled"


class InvalidArgument(StatusError):
    code = 3
    name = "InvalidArgument"


class DeadlineExceeded(StatusError):
    code = 4
    name = "DeadlineExceeded"


class NotFound(StatusError):
    code = 5
    name = "NotFound"


class AlreadyExists(StatusError):
    code = 6
    name = "AlreadyExists"


class PermissionDenied(StatusError):
    code = 7
    name = "PermissionDenied"


class ResourceExhausted(StatusError):
    code = 8
    name = "ResourceExhausted"


class FailedPrecondition(StatusError):
    code = 9
    name = "FailedPrecondition"


class Aborted(StatusError):
    code = 10
    name = "Aborted"


class Unimplemented(StatusError):
    code = 12
    name = "Unimplemented"


class Internal(StatusError):
    code = 13
    name = "Internal"


class Unavailable(StatusError):
    code = 14
    name = "Unavailable"


class Unauthenticated(StatusError):
    code = 16
    name = "Unauthenticated"


def _all_error_classes() -> list[type[ApiError]]:
    found: list[type[ApiError]] = []
    pending: list[type[ApiError]] = [ApiError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub not in (ProtocolError, StatusError):
                found.append(sub)
            pending.append(sub)
    return found


#: Every concrete error class by its wire name.
ERRORS_BY_NAME: dict[str, type[ApiError]] = {cls.name: cls for cls in _all_error_classes()}
