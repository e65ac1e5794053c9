"""OCI hooks on the host: run with the container state on stdin, in order,
each with its timeout. A failing hook before start fails the operation; a
failing poststart or poststop hook only warns, as the spec says. (The hooks
that run in the guest: kata_py.sandbox.guest_hooks.)"""

from __future__ import annotations

import json
import logging
import subprocess

from ..sandbox.guest_hooks import HookError

log = logging.getLogger(__name__)


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
