"""kata_py's public Python API: sandboxes (one VM each) holding containers.

    import kata_py

    with kata_py.Sandbox(memory="256M", cpus=1) as sb:
        c = sb.create_container("web", rootfs="/srv/rootfs", args=["httpd", "-f"], env={"MODE": "x"})
        c.start()
        r = c.exec(["sh", "-c", "echo hi"], timeout=10)      # r.exit_code, r.stdout, r.stderr
        c.put_file("/data/in", b"..."); c.get_file("/data/out")
        sb.run(["python3", "-c", code], rootfs="/srv/py", stdin=b"...", timeout=5)   # one-shot

The asyncio twin is AsyncSandbox / AsyncContainer. Events (a container's
exit, an OOM kill, the sandbox's end) are pushed as they happen:
`sb.events()` or `sb.on_event(callback)`. Errors derive from SandboxError
(a kata_py.errors.KataError).

A sandbox lives until it is closed or the process that made it exits or
dies (see kata_py.sandbox.owner, "Lifetime"); either way nothing is left.
"""

from .aio import AsyncContainer, AsyncEventStream, AsyncProcess, AsyncSandbox
from .errors import (BootError, CommandFailed, Conflict, ContainerExited, InvalidRequest, NotFound, RequestFailed,
                     SandboxError, SandboxGone, SandboxTimeout)
from .sync import Container, EventStream, Process, Sandbox
from .types import ContainerInfo, Event, ExecResult, parse_size

__all__ = [
    "Sandbox", "Container", "Process", "EventStream",
    "AsyncSandbox", "AsyncContainer", "AsyncProcess", "AsyncEventStream",
    "ExecResult", "Event", "ContainerInfo", "parse_size",
    "SandboxError", "SandboxGone", "BootError", "SandboxTimeout", "ContainerExited", "RequestFailed", "NotFound",
    "InvalidRequest", "Conflict", "CommandFailed",
]
