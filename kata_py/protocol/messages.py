"""Every message on the agent connection, described by a schema.

A connection opens with one `hello` frame that says what it is for:
- role "control": then request and reply frames follow;
- role "stream": it carries one stdio stream of one process as raw bytes
  after the hello (stdin host->guest; stdout/stderr guest->host; with a tty,
  "stdin" and "stdout" carry the terminal both ways).

Requests are {"id", "type", "args"}; replies are {"id", "ok", "result"} or
{"id", "ok": false, "error": {"code", "message"}}. Replies may come out of
order (a `wait_process` can outlive later requests), so the id matches them.
"""

from __future__ import annotations

from .schema import SchemaError, validate

MAX_ARGV = 4096
MAX_ENV = 4096
MAX_STRING = 128 * 1024
MAX_ID = 256
PROCESS_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*\Z"  # \Z: "$" would let a trailing newline in

STREAMS = ("stdin", "stdout", "stderr")

# `kata_agent.prefork=off` on the guest kernel's command line: the agent forks
# no process ahead for the first container's (agent/kata_agent/zygote.py). The
# host adds it under KATA_PY_GUEST_PREFORK=off, for measuring what it saves.
PREFORK_PARAM = "kata_agent.prefork"

_str = {"type": "string", "maxLength": MAX_STRING}
_process_id = {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": PROCESS_ID_PATTERN}
_request_id = {"type": "integer", "minimum": 0, "maximum": 2**53}
_uint32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
_empty = {"type": "object", "additionalProperties": False}


def _obj(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


HELLO = _obj({
    "role": {"enum": ["control", "stream"]},
    "process_id": _process_id,
    "stream": {"enum": list(STREAMS)},
}, required=["role"])

_int64 = {"type": ["integer", "null"], "minimum": -1, "maximum": 2**63 - 1}
_uint64 = {"type": "integer", "minimum": 0, "maximum": 2**64 - 1}
_uint64_or_max = {"type": ["integer", "null"], "minimum": 0, "maximum": 2**64 - 1}  # null: no limit
_cpuset = {"type": "string", "maxLength": 1024, "pattern": "^[0-9,-]*\\Z"}

# The part of OCI linux.resources that the guest applies to the container's
# cgroup v2; other members are allowed and ignored.
RESOURCES = {"type": "object", "properties": {
    "memory": {"type": "object", "properties": {k: _int64 for k in ("limit", "reservation", "swap")}},
    "cpu": {"type": "object", "properties": {
        "shares": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**32},
        "quota": _int64, "period": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**32},
        "cpus": _cpuset, "mems": _cpuset}},
    "pids": {"type": "object", "properties": {"limit": _int64}},
    "blockIO": {"type": "object", "properties": {"weight": {"type": ["integer", "null"], "minimum": 0,
                                                             "maximum": 1000}}},
}}

# The container's own view, built by the agent (OCI mounts, devices, ...).
MAX_MOUNTS = 1024
MAX_DEVICES = 1024
GUEST_NAMESPACES = ("pid", "mount", "ipc", "uts", "cgroup", "user")
# The namespaces a container may join instead of making its own: those of
# another container's init, named by its agent id (a pod's containers join
# its sandbox container's uts, ipc and, when the pod shares it, pid).
JOINABLE_NAMESPACES = ("uts", "ipc", "pid")
SYSCTL_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z"
_guest_path = {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^/"}
_share_entry = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[A-Za-z0-9_.-]+\Z"}
_id_mappings = {"type": "array", "maxItems": 340, "items": _obj(
    {"container_id": _uint32, "host_id": _uint32, "size": {"type": "integer", "minimum": 1, "maximum": 2**32 - 1}},
    required=["container_id", "host_id", "size"])}
MOUNT = _obj({
    "destination": _guest_path,
    "type": {"type": "string", "maxLength": 64},
    # from "share": source names an entry of the container's share (a host bind
    # source); "guest": a guest device path; absent: the filesystem's source.
    "from": {"enum": ["share", "guest"]},
    "source": {"type": "string", "maxLength": 4096},
    "options": {"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 4096}},
}, required=["destination"])
DEVICE = _obj({
    "path": _guest_path,
    "type": {"enum": ["c", "b", "u", "p"]},
    "major": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    "minor": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    "file_mode": {"type": "integer", "minimum": 0, "maximum": 0o7777},
    "uid": _uint32, "gid": _uint32,
}, required=["path", "type"])

# configure_network: the guest NICs (matched by MAC), their addresses and
# routes, and the files the container gets as /etc/hosts, /etc/resolv.conf
# and /etc/hostname.
MAX_NICS = 8
MAX_NET_FILE = 64 * 1024
_ip = {"type": "string", "minLength": 2, "maxLength": 45, "pattern": "^[0-9A-Fa-f:.]+\\Z"}
_ifname = {"type": "string", "minLength": 1, "maxLength": 15, "pattern": "^[A-Za-z0-9_.-]+\\Z"}
_mac = {"type": "string", "pattern": "^[0-9a-f]{2}(:[0-9a-f]{2}){5}\\Z"}
NIC = _obj({
    "name": _ifname,
    "mac": _mac,
    "mtu": {"type": "integer", "minimum": 68, "maximum": 65535},
    "addresses": {"type": "array", "maxItems": 64, "items": _obj({
        "address": _ip, "prefix_len": {"type": "integer", "minimum": 0, "maximum": 128}},
        required=["address", "prefix_len"])},
    # Without dst: the default route. scope defaults to link without a gateway.
    "routes": {"type": "array", "maxItems": 256, "items": _obj({
        "dst": _ip, "dst_len": {"type": "integer", "minimum": 0, "maximum": 128},
        "gateway": _ip, "source": _ip, "metric": _uint32,
        "scope": {"enum": ["universe", "link", "host"]}, "onlink": {"type": "boolean"}})},
}, required=["name", "mac", "mtu"])
CONFIGURE_NETWORK = _obj({
    "interfaces": {"type": "array", "maxItems": MAX_NICS, "items": NIC},
    "hosts": {"type": "string", "maxLength": MAX_NET_FILE},
    "resolv_conf": {"type": "string", "maxLength": MAX_NET_FILE},
    "hostname": {"type": "string", "maxLength": 64},
}, required=["interfaces", "hosts", "resolv_conf"])

# The process-level fields of an OCI process (agent/kata_agent/credentials.py).
RLIMIT_TYPES = ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
                "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS", "RLIMIT_SIGPENDING",
                "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME")
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
_cap_names = {"type": "array", "maxItems": 64,
              "items": {"type": "string", "maxLength": 64, "pattern": "^CAP_[A-Z_]+\\Z"}}
PROCESS_SECURITY = {
    "umask": {"type": "integer", "minimum": 0, "maximum": 0o7777},
    "rlimits": {"type": "array", "maxItems": 64, "items": _obj(
        {"type": {"enum": list(RLIMIT_TYPES)}, "soft": _uint64, "hard": _uint64}, required=["type", "soft", "hard"])},
    "capabilities": _obj({name: _cap_names for name in CAP_SETS}),
    "no_new_privileges": {"type": "boolean"},
    "oom_score_adj": {"type": "integer", "minimum": -1000, "maximum": 1000},
}

# OCI linux.seccomp, compiled in the agent (agent/kata_agent/seccomp.py), which
# names the actions, operators, architectures and flags it knows: the patterns
# here only bound the strings.
MAX_SECCOMP_RULES = 1024
MAX_SECCOMP_NAMES = 1024
_seccomp_errno = {"type": "integer", "minimum": 0, "maximum": 65535}
_seccomp_action = {"type": "string", "maxLength": 64, "pattern": "^SCMP_ACT_[A-Z_]+\\Z"}
SECCOMP = _obj({
    "defaultAction": _seccomp_action,
    "defaultErrnoRet": _seccomp_errno,
    "architectures": {"type": "array", "maxItems": 32,
                      "items": {"type": "string", "maxLength": 64, "pattern": "^SCMP_ARCH_[A-Z0-9_]+\\Z"}},
    "flags": {"type": "array", "maxItems": 16,
              "items": {"type": "string", "maxLength": 64, "pattern": "^SECCOMP_FILTER_FLAG_[A-Z_]+\\Z"}},
    "syscalls": {"type": "array", "maxItems": MAX_SECCOMP_RULES, "items": _obj({
        "names": {"type": "array", "minItems": 1, "maxItems": MAX_SECCOMP_NAMES,
                  "items": {"type": "string", "minLength": 1, "maxLength": 64}},
        "action": _seccomp_action,
        "errnoRet": _seccomp_errno,
        "args": {"type": "array", "maxItems": 6, "items": _obj({
            "index": {"type": "integer", "minimum": 0, "maximum": 5},
            "value": _uint64, "valueTwo": _uint64,
            "op": {"type": "string", "maxLength": 32, "pattern": "^SCMP_CMP_[A-Z_]+\\Z"}}, required=["index", "op"])},
    }, required=["names", "action"])},
}, required=["defaultAction"])

# A container's files, read and written by the agent as the container sees
# them (agent/kata_agent/files.py), base64 in chunks a frame can carry.
MAX_FILE_CHUNK = 512 * 1024
_base64 = {"type": "string", "maxLength": 4 * ((MAX_FILE_CHUNK + 2) // 3), "pattern": "^[A-Za-z0-9+/]*={0,2}\\Z"}

# type -> (args schema, result schema)
REQUESTS: dict[str, tuple[dict, dict]] = {
    "ping": (_empty, _obj({
        "agent_version": {"type": "string", "maxLength": 64},
        "protocol": {"type": "integer", "minimum": 0, "maximum": 1000},
        "kernel": {"type": "string", "maxLength": 256},
        "uptime": {"type": "number", "minimum": 0},
    }, required=["agent_version", "protocol", "kernel", "uptime"])),
    "create_process": (_obj({
        "process_id": _process_id,
        "argv": {"type": "array", "minItems": 1, "maxItems": MAX_ARGV, "items": _str},
        "env": {"type": "array", "maxItems": MAX_ENV, "items": _str},
        "cwd": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^/"},
        "tty": {"type": "boolean"},
        "rows": {"type": "integer", "minimum": 0, "maximum": 65535},
        "cols": {"type": "integer", "minimum": 0, "maximum": 65535},
        # Streams the host will attach before start; the others read/write /dev/null.
        "streams": {"type": "array", "maxItems": 3, "items": {"enum": list(STREAMS)}},
        # In a container: its init creates the container's namespaces, others join them.
        "container_id": _process_id,
        "init": {"type": "boolean"},
        "user": _obj({"uid": _uint32, "gid": _uint32,
                      "additional_gids": {"type": "array", "maxItems": 256, "items": _uint32}},
                     required=["uid", "gid"]),
        **PROCESS_SECURITY,
    }, required=["process_id", "argv"]), _empty),
    "create_container": (_obj({
        "container_id": _process_id,
        "resources": RESOURCES,
        "mount_tag": {"type": "string", "minLength": 1, "maxLength": 31, "pattern": "^[A-Za-z0-9_.-]+$"},
        # Where the rootfs is inside the share (the rest holds bind sources).
        "rootfs_path": _share_entry,
        "readonly": {"type": "boolean"},
        "hostname": {"type": "string", "maxLength": 64},
        "seccomp": SECCOMP,
        "domainname": {"type": "string", "maxLength": 64},
        "namespaces": {"type": "array", "maxItems": 8, "items": {"enum": list(GUEST_NAMESPACES)}},
        "uid_mappings": _id_mappings,
        "gid_mappings": _id_mappings,
        "mounts": {"type": "array", "maxItems": MAX_MOUNTS, "items": MOUNT},
        "devices": {"type": "array", "maxItems": MAX_DEVICES, "items": DEVICE},
        "masked_paths": {"type": "array", "maxItems": MAX_MOUNTS, "items": _guest_path},
        "readonly_paths": {"type": "array", "maxItems": MAX_MOUNTS, "items": _guest_path},
        "rootfs_propagation": {"enum": ["private", "rprivate", "slave", "rslave", "shared", "rshared",
                                        "unbindable", "runbindable"]},
        "sysctl": {"type": "array", "maxItems": 256, "items": _obj({
            "key": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": SYSCTL_PATTERN},
            "value": {"type": "string", "maxLength": 4096}}, required=["key", "value"])},
        "no_pivot": {"type": "boolean"},
        # Namespace type -> the container whose init's namespace of that type
        # this container's init enters (setns) instead of making one: a type
        # named here is not in `namespaces`. A joined uts namespace keeps its
        # hostname and domainname: this container's are not set.
        "join": _obj({name: _process_id for name in JOINABLE_NAMESPACES}),
    }, required=["container_id", "mount_tag"]), _empty),
    # Kill what runs in the container, remove its cgroup, unmount its share.
    "delete_container": (_obj({"container_id": _process_id}, required=["container_id"]), _empty),
    # Fork the process and set it up, but hold it before exec until start_process.
    "prepare_process": (_obj({"process_id": _process_id}, required=["process_id"]),
                        _obj({"pid": {"type": "integer", "minimum": 1, "maximum": 2**22}}, required=["pid"])),
    "start_process": (_obj({"process_id": _process_id}, required=["process_id"]),
                      _obj({"pid": {"type": "integer", "minimum": 1, "maximum": 2**22}}, required=["pid"])),
    "signal_process": (_obj({"process_id": _process_id, "signal": {"type": "integer", "minimum": 0, "maximum": 64}},
                            required=["process_id", "signal"]), _empty),
    "wait_process": (_obj({"process_id": _process_id}, required=["process_id"]), _obj({
        "exit_code": {"type": ["integer", "null"], "minimum": 0, "maximum": 255},
        "signal": {"type": ["integer", "null"], "minimum": 1, "maximum": 64},
    }, required=["exit_code", "signal"])),
    "resize_tty": (_obj({"process_id": _process_id,
                         "rows": {"type": "integer", "minimum": 0, "maximum": 65535},
                         "cols": {"type": "integer", "minimum": 0, "maximum": 65535}},
                        required=["process_id", "rows", "cols"]), _empty),
    # The guest processes that share the container init's mount namespace.
    "list_processes": (_obj({"container_id": _process_id}, required=["container_id"]), _obj({
        "processes": {"type": "array", "maxItems": 65536, "items": _obj({
            "pid": {"type": "integer", "minimum": 1, "maximum": 2**22},
            "cmd": {"type": "string", "maxLength": 4096}}, required=["pid", "cmd"])},
    }, required=["processes"])),
    "signal_container": (_obj({"container_id": _process_id,
                               "signal": {"type": "integer", "minimum": 0, "maximum": 64}},
                              required=["container_id", "signal"]), _empty),
    "update_container": (_obj({"container_id": _process_id, "resources": RESOURCES},
                              required=["container_id", "resources"]), _empty),
    "container_stats": (_obj({"container_id": _process_id}, required=["container_id"]), _obj({
        "cpu": _obj({k: _uint64 for k in ("usage_usec", "user_usec", "system_usec")}),
        "memory": _obj({"usage": _uint64, "limit": _uint64_or_max, "swap_usage": _uint64, "oom": _uint64,
                        "oom_kill": _uint64, "anon": _uint64, "file": _uint64}),
        "pids": _obj({"current": _uint64, "limit": _uint64_or_max}),
    }, required=["cpu", "memory", "pids"])),
    "configure_network": (CONFIGURE_NETWORK, _obj({"interfaces": {"type": "array", "maxItems": MAX_NICS, "items": _obj({
        "name": _ifname, "mac": _mac, "index": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}},
        required=["name", "mac", "index"])}}, required=["interfaces"])),
    "read_file": (_obj({"container_id": _process_id, "path": _guest_path, "offset": _uint64,
                        "length": {"type": "integer", "minimum": 0, "maximum": MAX_FILE_CHUNK}},
                       required=["container_id", "path", "length"]),
                  _obj({"data": _base64, "size": _uint64, "eof": {"type": "boolean"}}, required=["data", "size", "eof"])),
    "write_file": (_obj({"container_id": _process_id, "path": _guest_path, "data": _base64, "offset": _uint64,
                         "truncate": {"type": "boolean"}, "mode": {"type": "integer", "minimum": 0, "maximum": 0o7777},
                         "parents": {"type": "boolean"}}, required=["container_id", "path", "data"]), _empty),
    # Blocks until the container's cgroup has OOM-killed more than `seen`
    # times (a push: the agent waits on memory.events), or the container is gone.
    "watch_oom": (_obj({"container_id": _process_id, "seen": _uint64}, required=["container_id"]),
                  _obj({"oom_kill": _uint64, "ended": {"type": "boolean"}}, required=["oom_kill", "ended"])),
    "shutdown": (_empty, _empty),
}

REQUEST = _obj({
    "id": _request_id,
    "type": {"enum": sorted(REQUESTS)},
    "args": {"type": "object"},
}, required=["id", "type", "args"])

ERROR_CODES = ["invalid", "not_found", "exists", "state", "failed", "internal"]
_error = _obj({"code": {"enum": ERROR_CODES}, "message": {"type": "string", "maxLength": 4096}},
              required=["code", "message"])

# The agent's one-frame answer to a stream hello; raw bytes follow only after ok.
STREAM_ACK = _obj({"ok": {"type": "boolean"}, "error": _error}, required=["ok"])

REPLY = _obj({
    "id": _request_id,
    "ok": {"type": "boolean"},
    "result": {"type": "object"},
    "error": _error,
}, required=["id", "ok"])


def check_request(message: dict) -> tuple[int, str, dict]:
    """Validate a whole request; return (id, type, args). Raises SchemaError."""
    validate(message, REQUEST)
    args_schema, _ = REQUESTS[message["type"]]
    validate(message["args"], args_schema, "/args")
    return message["id"], message["type"], message["args"]


def check_reply(message: dict, request_type: str) -> dict:
    """Validate a reply to a request of `request_type`; return its result.

    Raises SchemaError for a malformed reply. An error reply is returned as
    {"error": {...}} so the caller can raise its own typed error.
    """
    validate(message, REPLY)
    if message["ok"]:
        if "error" in message or "result" not in message:
            raise SchemaError("/", "a successful reply carries a result and no error")
        _, result_schema = REQUESTS[request_type]
        validate(message["result"], result_schema, "/result")
        return message["result"]
    if "error" not in message or "result" in message:
        raise SchemaError("/", "a failed reply carries an error and no result")
    return {"error": message["error"]}


def check_hello(message: dict) -> dict:
    validate(message, HELLO)
    if message["role"] == "stream" and ("process_id" not in message or "stream" not in message):
        raise SchemaError("/", "a stream hello names its process_id and stream")
    return message


def check_stream_ack(message: dict) -> dict:
    validate(message, STREAM_ACK)
    if message["ok"] == ("error" in message):
        raise SchemaError("/", "a stream ack carries an error exactly when it is not ok")
    return message


__all__ = ["HELLO", "STREAM_ACK", "check_stream_ack", "REQUESTS", "REQUEST", "REPLY", "ERROR_CODES", "STREAMS", "SchemaError",
           "check_request", "check_reply", "check_hello"]
