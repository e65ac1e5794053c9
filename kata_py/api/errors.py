"""The API's errors: one root, SandboxError (a kata_py.errors.KataError),
and a subclass for each thing a caller may want to catch on its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import KataError

if TYPE_CHECKING:
    from .types import ExecResult


class SandboxError(KataError):
    """Root of every error kata_py.api raises."""


class SandboxGone(SandboxError):
    """The sandbox no longer exists: closed, its VM died, or its owner process
    died. `reason` says which, in the owner's words where it could say them."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the sandbox is gone: {reason}")


class BootError(SandboxGone):
    """The sandbox's VM could not be booted."""


class SandboxTimeout(SandboxError):
    """Something did not finish in time. For a process that was killed for
    it (exec/run with a timeout), `result` holds what it wrote until then."""

    def __init__(self, message: str, result: "ExecResult | None" = None) -> None:
        self.result = result
        super().__init__(message)


class ContainerExited(SandboxError):
    """The container's init process has exited: it runs nothing any more
    (it can still be waited for and deleted)."""


class RequestFailed(SandboxError):
    """The sandbox refused or failed a request; `code` is the owner's word for how."""

    def __init__(self, message: str, code: str = "failed") -> None:
        self.code = code
        super().__init__(message)


class NotFound(RequestFailed, LookupError):
    """No such container or process."""


class InvalidRequest(RequestFailed, ValueError):
    """A bad argument (a path that is not absolute, an unknown signal, too large...)."""


class Conflict(RequestFailed):
    """The container exists already, or is not in a state that allows it (already started...)."""


class CommandFailed(SandboxError):
    """With check=True: the process ended with a status other than 0."""

    def __init__(self, result: "ExecResult", args: list[str]) -> None:
        self.result = result
        self.args_ = list(args)
        super().__init__(f"{args[0] if args else '?'} exited with status {result.status}: "
                         f"{result.stderr[-500:].decode(errors='replace').strip()}")
