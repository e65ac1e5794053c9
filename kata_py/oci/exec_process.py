"""One more process in a running container, over the agent's vsock socket.

Used inline by an attached `kata-py exec`, and by the exec monitor process
for `exec --detach` (whose pid goes in --pid-file and which exits with the
process's status, as the container's monitor does for init).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

from ..errors import KataError
from ..sandbox.handle import ReattachedSandbox
from ..sandbox.process import ProcessSession
from ..vsock.transport import VsockTransport
from .process_spec import agent_container_id, process_args
from .state import ContainerState, StateStore, Status

CONNECT_TIMEOUT = 10.0
# What an exec'd process takes from the container's own process unless it
# names its own, as with runc (oomScoreAdj: runc applies the container's to
# every process it starts in it).
INHERITED = ("capabilities", "noNewPrivileges", "oomScoreAdj")
CAP_SETS_ADDED = ("bounding", "effective", "permitted")


def container_process(store: StateStore, container_id: str) -> dict:
    """The `process` of the container's config.json, the base for exec."""
    from .spec import load_bundle

    state = store.load(container_id)
    _, config, _ = load_bundle(state.bundle, validate=False)
    return config.get("process") or {}


def with_container_defaults(spec: dict, container: dict, add_caps=(), no_new_privs: bool = False) -> dict:
    """An exec's process spec completed from the container's process, then
    `exec --cap` and `--no-new-privs` applied (runc's exec rules)."""
    spec = copy.deepcopy(spec)
    for key in INHERITED:
        if key not in spec and key in container:
            spec[key] = copy.deepcopy(container[key])
    if not spec.get("rlimits") and container.get("rlimits"):
        spec["rlimits"] = copy.deepcopy(container["rlimits"])
    caps = spec.get("capabilities")
    # Without capabilities the process keeps all of them: nothing to add to.
    if add_caps and caps is not None:
        for name in add_caps:
            for which in CAP_SETS_ADDED:
                if name not in caps.setdefault(which, []):
                    caps[which].append(name)
            # Ambient needs inheritable; runc adds to it only where the spec has an inheritable set.
            if caps.get("inheritable") is not None and name not in caps.setdefault("ambient", []):
                caps["ambient"].append(name)
    if no_new_privs:
        spec["noNewPrivileges"] = True
    return spec


def transport_for(state: ContainerState) -> VsockTransport:
    """Reach the agent of a container's VM from any process."""
    from ..vsock.transport import HybridVsock, KernelVsock

    if "cid" in state.vsock:
        return KernelVsock(int(state.vsock["cid"]))
    return HybridVsock(Path(state.run_dir))


async def connect(state: ContainerState) -> ReattachedSandbox:
    """The container's VM, owned by its monitor, as a handle of this process
    (its own agent connection) for ProcessSession and friends."""
    handle = ReattachedSandbox(transport_for(state), run_dir=Path(state.run_dir) if state.run_dir else None, timeout=CONNECT_TIMEOUT)
    try:
        await handle.start()
    except (KataError, OSError) as exc:
        raise KataError(f"container {state.id!r}: cannot reach its VM's agent: {exc}") from None
    return handle


async def exec_in_container(store: StateStore, container_id: str, spec: dict, console_socket: str | None,
                            report=None) -> int:
    state = store.load(container_id)
    state.require("exec in", Status.can_exec)
    handle = await connect(state)
    console = None
    try:
        if spec.get("terminal"):
            from .console import HostConsole

            if not console_socket:
                raise KataError("exec with a terminal needs --console-socket")
            console = HostConsole()
        args = process_args(spec)
        stdio = ({"stdin_fd": console.slave, "stdout_fd": console.slave, "stderr_fd": None, "tty": True}
                 if console else {"stdin_fd": 0, "stdout_fd": 1, "stderr_fd": 2})
        if console is not None:
            console.send_master(console_socket)
            rows, cols = console.size()
            args.setdefault("rows", rows)
            args.setdefault("cols", cols)
        session = ProcessSession(handle, args["argv"], env=args["env"], cwd=args["cwd"], user=args["user"],
                                 security=args["security"],
                                 rows=args.get("rows", 0), cols=args.get("cols", 0),
                                 container_id=agent_container_id(container_id), **stdio)
        await session.create()
        await session.start()
        if report is not None:
            report.send("ok", {"process": session.process_id, "guest_pid": session.pid})
        if console is not None:
            console.attach_session(session)
        session.forward_signals()
        return await session.relay_and_wait()
    finally:
        if console is not None:
            console.close()
        await handle.stop()


def run_attached(store: StateStore, container_id: str, spec: dict, console_socket: str | None) -> int:
    return asyncio.run(exec_in_container(store, container_id, spec, console_socket))
