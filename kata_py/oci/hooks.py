"""OCI hooks on the host: run with the container state on stdin, in order,
each with its timeout. A failing hook before start fails the operation; a
failing poststart or poststop hook only warns, as the spec says."""

from __future__ import annotations

import json
import logging
import subprocess
from typing import TYPE_CHECKING

from ..errors import KataError

if TYPE_CHECKING:
    from ..sandbox.handle import SandboxHandle

log = logging.getLogger(__name__)


class HookError(KataError):
    def __init__(self, kind: str, path: str, reason: str) -> None:
        self.kind = kind
        self.path = path
        super().__init__(f"{kind} hook {path} failed: {reason}")


def run_hooks(kind: str, hooks: list[dict], state: dict, fatal: bool = True) -> None:
    for hook in hooks or []:
        try:
            _run_one(kind, hook, state)
        except HookError as exc:
            if fatal:
                raise
            log.warning("%s", exc)


def _run_one(kind: str, hook: dict, state: dict) -> None:
    path = hook["path"]
    argv = hook.get("args") or [path]
    env = {}
    for item in hook.get("env", []):
        key, _, value = item.partition("=")
        env[key] = value
    timeout = hook.get("timeout")
    try:
        proc = subprocess.run(argv, executable=path, input=json.dumps(state).encode(),
                              env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HookError(kind, path, f"timed out after {timeout} s") from None
    except OSError as exc:
        raise HookError(kind, path, exc.strerror) from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise HookError(kind, path, f"exit status {proc.returncode}" + (f": {detail[-1]}" if detail else ""))


async def run_guest_hooks(handle: SandboxHandle, container_id: str, kind: str, hooks: list[dict], state: dict) -> None:
    """createContainer / startContainer hooks: inside the VM, in the container's
    namespaces and root (the only place their binaries can be: the host's
    filesystem is not in the guest), with the state on stdin and the timeout
    enforced from the host. A failure is an error, as the spec says."""
    import asyncio
    import os

    from ..sandbox.process import ProcessSession
    from .process_spec import agent_container_id

    for hook in hooks or []:
        path = hook["path"]
        argv = [path] + list((hook.get("args") or [path])[1:])
        read_fd, write_fd = os.pipe()
        os.write(write_fd, json.dumps(state).encode())  # far below a pipe's capacity
        os.close(write_fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        session = ProcessSession(handle, argv, env=list(hook.get("env", [])), stdin_fd=read_fd,
                                 stdout_fd=devnull, stderr_fd=devnull,
                                 container_id=agent_container_id(container_id))
        try:
            await session.create()
            await session.start()
            status = await asyncio.wait_for(session.relay_and_wait(), hook.get("timeout"))
        except asyncio.TimeoutError:
            await session.signal(9)
            raise HookError(kind, path, f"timed out after {hook.get('timeout')} s") from None
        except KataError as exc:
            raise HookError(kind, path, str(exc)) from None
        finally:
            os.close(read_fd)
            os.close(devnull)
        if status != 0:
            raise HookError(kind, path, f"exit status {status}")
