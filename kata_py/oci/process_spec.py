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


CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
UMASK_MAX = 0o7777
OOM_SCORE_ADJ_RANGE = (-1000, 1000)  # what the kernel accepts
RLIM_MAX = 2**64 - 1
# linux.seccomp members the agent compiles; the others (listenerPath,
# listenerMetadata: a seccomp agent kata-py does not have) are not sent.
SECCOMP_KEYS = ("defaultAction", "defaultErrnoRet", "architectures", "flags", "syscalls")
SECCOMP_RULE_KEYS = ("names", "action", "errnoRet", "args")
SECCOMP_ARG_KEYS = ("index", "value", "valueTwo", "op")


def process_args(process: dict) -> dict:
    """The agent's create_process arguments for an OCI process object.
    `security` holds the agent's process-level fields (see security_args)."""
    user = process.get("user", {})
    args = {
        "argv": list(process["args"]),
        "env": list(process.get("env", [])),
        "cwd": process.get("cwd", "/"),
        "user": {"uid": int(user.get("uid", 0)), "gid": int(user.get("gid", 0)),
                 "additional_gids": [int(g) for g in user.get("additionalGids", [])]},
        "security": security_args(process),
    }
    size = process.get("consoleSize")
    if size:
        args["rows"], args["cols"] = int(size.get("height", 0)), int(size.get("width", 0))
    return args


def _integer(value, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{where}: expected an integer in {low}..{high}, got {value!r}")
    return value


def security_args(process: dict) -> dict:
    """OCI process fields -> the agent's umask, rlimits, capabilities,
    no_new_privileges and oom_score_adj (agent/kata_agent/credentials.py).

    Absent capabilities stay absent: the process then keeps the guest root's
    full set (runc would give it none). The agent checks the names."""
    fields = {}
    user = process.get("user") or {}
    if user.get("umask") is not None:
        fields["umask"] = _integer(user["umask"], "process.user.umask", 0, UMASK_MAX)
    rlimits = process.get("rlimits") or []
    if not isinstance(rlimits, list):
        raise ConfigError("process.rlimits: expected a list")
    if rlimits:
        fields["rlimits"] = []
        for index, rlimit in enumerate(rlimits):
            where = f"process.rlimits[{index}]"
            if not isinstance(rlimit, dict) or not isinstance(rlimit.get("type"), str):
                raise ConfigError(f"{where}: expected an object with a type")
            fields["rlimits"].append({"type": rlimit["type"],
                                      "soft": _integer(rlimit.get("soft"), f"{where}.soft", 0, RLIM_MAX),
                                      "hard": _integer(rlimit.get("hard"), f"{where}.hard", 0, RLIM_MAX)})
    caps = process.get("capabilities")
    if caps is not None:
        if not isinstance(caps, dict):
            raise ConfigError("process.capabilities: expected an object")
        fields["capabilities"] = {}
        for name in CAP_SETS:
            names = caps.get(name) or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"process.capabilities.{name}: expected a list of names")
            fields["capabilities"][name] = list(names)
    if process.get("noNewPrivileges") is not None:
        fields["no_new_privileges"] = bool(process["noNewPrivileges"])
    if process.get("oomScoreAdj") is not None:
        fields["oom_score_adj"] = _integer(process["oomScoreAdj"], "process.oomScoreAdj", *OOM_SCORE_ADJ_RANGE)
    return fields


def seccomp_args(config: dict) -> dict:
    """{"seccomp": linux.seccomp as the agent takes it}, or {} without one."""
    profile = (config.get("linux") or {}).get("seccomp")
    if not profile:
        return {}
    if not isinstance(profile, dict):
        raise ConfigError("linux.seccomp: expected an object")
    result = {key: profile[key] for key in SECCOMP_KEYS if profile.get(key) is not None}
    rules = result.get("syscalls")
    if isinstance(rules, list):
        result["syscalls"] = [_trimmed(rule, SECCOMP_RULE_KEYS) for rule in rules]
        for rule in result["syscalls"]:
            if isinstance(rule.get("args"), list):
                rule["args"] = [_trimmed(arg, SECCOMP_ARG_KEYS) for arg in rule["args"]]
    return {"seccomp": result}


def _trimmed(item, keys) -> dict:
    if not isinstance(item, dict):
        return item  # the agent names what is wrong with it
    return {key: item[key] for key in keys if item.get(key) is not None}


def vm_mib_for(limit: int) -> int:
    """The VM memory (MiB) that a memory limit of `limit` bytes needs: the
    limit, rounded up, and the guest's own overhead beside it."""
    return math.ceil(limit / (1 << 20)) + GUEST_OVERHEAD_MIB


def vm_size(config: dict) -> tuple[int, int]:
    """(memory MiB, vCPUs) for the sandbox VM, from linux.resources.

    The same limits also go to the container's cgroup inside the guest; the VM
    only has to be big enough to honour them.
    """
    resources = config.get("linux", {}).get("resources", {}) or {}
    memory = MIN_MEMORY_MIB
    limit = (resources.get("memory") or {}).get("limit")
    if isinstance(limit, int) and limit > 0:
        memory = max(MIN_MEMORY_MIB, vm_mib_for(limit))
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
