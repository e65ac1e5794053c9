"""One more process in a running container: the OCI process completed
from the container's (runc's rules), run through kata_py.sandbox.relay,
inline for an attached `kata-py exec` (`exec --detach` starts the relay as a
process of its own: kata_py.oci.container.exec_detached).
"""

from __future__ import annotations

import asyncio
import copy

from ..sandbox.handle import ReattachedSandbox
from .process_spec import agent_container_id, process_args
from .state import ContainerState, StateStore, Status

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


async def connect(state: ContainerState) -> ReattachedSandbox:
    """The container's VM, owned by its sandbox owner, as a handle of this
    process (its own agent connection) for ProcessSession and friends."""
    from ..sandbox.relay import connect as connect_vm

    return await connect_vm(state.vsock, state.run_dir, f"container {state.id!r}")


async def exec_in_container(store: StateStore, container_id: str, spec: dict, console_socket: str | None) -> int:
    from ..sandbox.relay import run_in

    state = store.load(container_id)
    state.require("exec in", Status.can_exec)
    args = process_args(spec)
    handle = await connect(state)
    return await run_in(handle, agent_container_id(container_id), args, bool(spec.get("terminal")), console_socket)


def run_attached(store: StateStore, container_id: str, spec: dict, console_socket: str | None) -> int:
    return asyncio.run(exec_in_container(store, container_id, spec, console_socket))
