"""OCI `process` objects -> what the guest agent and the VM need."""

from __future__ import annotations

import hashlib
import math
import os

from ..errors import ConfigError

GUEST_OVERHEAD_MIB = 128  # kernel, the unreclaimable initramfs, agent, page cache beside the limit
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 16384


def agent_container_id(container_id: str) -> str:
    """A short id for the agent: OCI ids may be 255 characters long."""
    return "c-" + hashlib.sha256(container_id.encode()).hexdigest()[:16]


def process_args(process: dict) -> dict:
    """The agent's create_process arguments for an OCI process object."""
    user = process.get("user", {})
    args = {
        "argv": list(process["args"]),
        "env": list(process.get("env", [])),
        "cwd": process.get("cwd", "/"),
        "user": {"uid": int(user.get("uid", 0)), "gid": int(user.get("gid", 0)),
                 "additional_gids": [int(g) for g in user.get("additionalGids", [])]},
    }
    size = process.get("consoleSize")
    if size:
        args["rows"], args["cols"] = int(size.get("height", 0)), int(size.get("width", 0))
    return args


def vm_size(config: dict) -> tuple[int, int]:
    """(memory MiB, vCPUs) for the sandbox VM, from linux.resources.

    The same limits also go to the container's cgroup inside the guest; the VM
    only has to be big enough to honour them.
    """
    resources = config.get("linux", {}).get("resources", {}) or {}
    memory = MIN_MEMORY_MIB
    limit = (resources.get("memory") or {}).get("limit")
    if isinstance(limit, int) and limit > 0:
        memory = max(MIN_MEMORY_MIB, math.ceil(limit / (1 << 20)) + GUEST_OVERHEAD_MIB)
    if memory > MAX_MEMORY_MIB:
        raise ConfigError(f"config.json /linux/resources/memory/limit: {limit} needs a {memory} MiB VM; "
                          f"the most kata-py gives one VM is {MAX_MEMORY_MIB} MiB")
    cpus = 1
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period") or 100000
    if isinstance(quota, int) and quota > 0:
        cpus = max(1, math.ceil(quota / period))
    cpus = min(cpus, os.cpu_count() or 1)
    return memory, cpus


def parse_user(text: str) -> dict:
    """`--user UID[:GID]` as runc takes it (numbers only: names need the
    container's /etc/passwd, which lives in the guest)."""
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ConfigError(f"--user {text!r}: expected UID[:GID] as numbers")
    return {"uid": int(uid), "gid": int(gid or 0)}
