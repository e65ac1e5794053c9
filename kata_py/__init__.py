"""kata-py: a VM-backed OCI container runtime.

The public Python API (kata_py.api) is re-exported here and loaded on first
use, so that `import kata_py` stays cheap for the CLI's short commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = ("Sandbox", "Container", "Process", "EventStream", "AsyncSandbox", "AsyncContainer", "AsyncProcess",
        "AsyncEventStream", "ExecResult", "Event", "ContainerInfo", "SandboxError", "SandboxGone", "BootError",
        "SandboxTimeout", "ContainerExited", "RequestFailed", "NotFound", "InvalidRequest", "Conflict",
        "CommandFailed")

if TYPE_CHECKING:
    from .api import (AsyncContainer,  # noqa: F401 (re-exported, loaded lazily below) AsyncEventStream, AsyncProcess, AsyncSandbox, BootError, CommandFailed,
                      Conflict, Container, ContainerExited, ContainerInfo, Event, EventStream, ExecResult,
                      InvalidRequest, NotFound, Process, RequestFailed, Sandbox, SandboxError, SandboxGone,
                      SandboxTimeout)

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'kata_py' has no attribute {name!r}")
