"""ttrpc's status codes and the errors that carry them.

ttrpc answers with gRPC status codes. A handler raises the subclass for the
code it means (NotFound, FailedPrecondition, ...); the client raises the
subclass of the code it received, so callers catch by type and never compare
numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from google.protobuf.message import Message

from kata_py.errors import KataError


class Code(enum.IntEnum):
    """gRPC status codes, which ttrpc uses unchanged."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(KataError):
    """Root of everything kata_py.shim.ttrpc raises."""


class FrameError(TtrpcError):
    """A frame broke the framing (bad type, short header): the connection is
    out of step and is closed."""


class RegistrationError(TtrpcError):
    """A service was registered twice or with a malformed method table."""


class RpcError(TtrpcError):
    """A call ended with a non-OK status. Raised by Client.call with the
    server's status; raised by a handler to answer with a chosen code (use a
    subclass: NotFound("container x"), FailedPrecondition(...), ...)."""

    code: Code = Code.UNKNOWN

    def __init__(self, message: str = "", *, code: Code | int | None = None,
                 details: Sequence[Message] = ()) -> None:
        if code is not None:  # a code outside Code stays a plain int
            self.code = Code(code) if code in Code._value2member_map_ else code  # type: ignore[assignment]
        self.message = message
        self.details = list(details)  # google.protobuf.Any, passed through untouched
        super().__init__(message)

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{name}: {self.message}"

    @staticmethod
    def from_status(code: int, message: str, details: Sequence[Message] = ()) -> RpcError:
        """The typed error for a status code (an unknown code keeps its number)."""
        cls = _BY_CODE.get(code, RpcError)
        return cls(message, code=code, details=details)


class Cancelled(RpcError):
    code = Code.CANCELLED


class Unknown(RpcError):
    code = Code.UNKNOWN


class InvalidArgument(RpcError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(RpcError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(RpcError):
    code = Code.NOT_FOUND


class AlreadyExists(RpcError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(RpcError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(RpcError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    code = Code.FAILED_PRECONDITION


class Aborted(RpcError):
    code = Code.ABORTED


class OutOfRange(RpcError):
    code = Code.OUT_OF_RANGE


class Unimplemented(RpcError):
    code = Code.UNIMPLEMENTED


class Internal(RpcError):
    code = Code.INTERNAL


class Unavailable(RpcError):
    code = Code.UNAVAILABLE


class DataLoss(RpcError):
    code = Code.DATA_LOSS


class Unauthenticated(RpcError):
    code = Code.UNAUTHENTICATED


class ConnectionClosed(Unavailable):
    """The connection ended before the call's response came."""


_BY_CODE: dict[int, type[RpcError]] = {
    c.code: c for c in (Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound,
                        AlreadyExists, PermissionDenied, ResourceExhausted, FailedPrecondition,
                        Aborted, OutOfRange, Unimplemented, Internal, Unavailable, DataLoss,
                        Unauthenticated)}
