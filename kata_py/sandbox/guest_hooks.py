"""OCI hooks that run inside the VM (createContainer, startContainer): in the
container's namespaces and root, the only place their binaries can be (the
host's filesystem is not in the guest), with the state on stdin and the
timeout enforced from the host. A failure is an error, as the spec says.

HookError is shared with the host-side hooks (kata_py.oci.hooks)."""

from __future__ import annotations

import asyncio
import json
import os

from ..errors import KataError
from .handle import SandboxHandle
from .process import ProcessSession


class HookError(KataError):
    def __init__(self, kind: str, path: str, reason: str) -> None:
        self.kind = kind
        self.path = path
        super().__init__(f"{kind} hook {path} failed: {reason}")


async def run_guest_hooks(handle: SandboxHandle, agent_container_id: str, kind: str, hooks: list[dict],
                          state: dict) -> None:
    for hook in hooks or []:
        path = hook["path"]
        argv = [path] + list((hook.get("args") or [path])[1:])
        read_fd, write_fd = os.pipe()
        os.write(write_fd, json.dumps(state).encode())  # far below a pipe's capacity
        os.close(write_fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        session = ProcessSession(handle, argv, env=list(hook.get("env", [])), stdin_fd=read_fd,
                                 stdout_fd=devnull, stderr_fd=devnull, container_id=agent_container_id)
        try:
            await session.create()
            await session.start()
            status = await asyncio.wait_for(session.relay_and_wait(), hook.get("timeout"))
        except asyncio.TimeoutError as exc:
            await session.signal(9)
            raise HookError(kind, path, f"timed out after {hook.get('timeout')} s") from exc
        except KataError as exc:
            raise HookError(kind, path, str(exc)) from exc
        finally:
            os.close(read_fd)
            os.close(devnull)
        if status != 0:
            raise HookError(kind, path, f"exit status {status}")
