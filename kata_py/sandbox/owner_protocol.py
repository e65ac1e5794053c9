"""The sandbox owner's wire protocol: what its clients (kata_py.api, later
the CLI and the shim) send on its Unix socket, and what comes back.

The same frames as the agent protocol (kata_py.protocol.framing: a 4-byte
length and a JSON object), checked against these schemas on both ends with
the protocol's own validator. Requests are {"id", "type", "args"}; replies
{"id", "ok": true, "result"} or {"id", "ok": false, "error": {"code",
"message"}}, possibly out of order (a `wait` outlives later requests).
Events carry no id: {"event": "exit" | "oom" | "gone", ...}. They go to the
connections that sent `subscribe`, except `gone` (the sandbox is ending and
why), which every connection gets before the owner closes it.

The frame cap is larger than the agent's: files and captured output travel
in one frame (base64), bounded by MAX_FILE and MAX_OUTPUT. The peer is a
local process of the same user, not the guest; the owner still checks all
of it, and the guest's answers were checked by the agent client already.
"""

from __future__ import annotations

from ..protocol.messages import GUEST_NAMESPACES, MOUNT, PROCESS_SECURITY, RESOURCES, STREAMS
from ..protocol.schema import SchemaError, validate

PROTOCOL_VERSION = 1
MAX_FRAME = 32 << 20
MAX_FILE = 16 << 20             # put_file / get_file
MAX_OUTPUT = 8 << 20            # captured stdout or stderr of one process
DEFAULT_OUTPUT = 1 << 20
MAX_STDIN = 8 << 20
MAX_CONTAINERS = 64
MAX_TIMEOUT = 7 * 86400.0
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z"
PROCESS_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z"

ERROR_CODES = ["invalid", "not_found", "exists", "state", "exited", "timeout", "gone", "failed", "internal"]


def _b64(limit: int) -> dict:
    return {"type": "string", "maxLength": 4 * ((limit + 2) // 3), "pattern": "^[A-Za-z0-9+/]*={0,2}\\Z"}


def _obj(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_empty = _obj({})
_str = {"type": "string", "maxLength": 128 * 1024}
_name = {"type": "string", "pattern": NAME_PATTERN}
_process_id = {"type": "string", "pattern": PROCESS_ID_PATTERN}
_host_path = {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^/"}
_guest_path = {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": "^/"}
_uint32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
_uint64 = {"type": "integer", "minimum": 0, "maximum": 2**64 - 1}
_timeout = {"type": ["number", "null"], "minimum": 0, "maximum": MAX_TIMEOUT}
_signal = {"type": "integer", "minimum": 0, "maximum": 64}
_exit_code = {"type": ["integer", "null"], "minimum": 0, "maximum": 255}
_signum = {"type": ["integer", "null"], "minimum": 1, "maximum": 64}
_time = {"type": "number", "minimum": 0}
_user = _obj({"uid": _uint32, "gid": _uint32, "additional_gids": {"type": "array", "maxItems": 256, "items": _uint32}},
             required=["uid", "gid"])
_max_output = {"type": "integer", "minimum": 0, "maximum": MAX_OUTPUT}

# A process: what to run and how.
_PROCESS = {
    "args": {"type": "array", "minItems": 1, "maxItems": 4096, "items": _str},
    "env": {"type": "array", "maxItems": 4096, "items": _str},
    "cwd": _guest_path,
    "user": _user,
    # Absent: the guest root's full set (the VM is the boundary); kata_py.api
    # passes Docker's default set, so that containers of one sandbox cannot
    # reconfigure the network they share or one another's kernel state.
    "capabilities": PROCESS_SECURITY["capabilities"],
    "no_new_privileges": {"type": "boolean"},
    # The guest root's full capability set, whatever the container's own processes get.
    "privileged": {"type": "boolean"},
    "stdin": _b64(MAX_STDIN),
    "max_output": _max_output,
}
# A container: its rootfs on the host and what the guest builds around it.
# Filesystem mounts only (proc, tmpfs, ...): a bind of a host path needs the
# share, which the owner fills from `rootfs` alone for now.
_FS_MOUNT = dict(MOUNT, properties={k: v for k, v in MOUNT["properties"].items() if k != "from"})
_CONTAINER = {
    "rootfs": _host_path,
    "readonly": {"type": "boolean"},
    "hostname": {"type": "string", "maxLength": 64},
    "resources": RESOURCES,
    "namespaces": {"type": "array", "maxItems": 8, "items": {"enum": [n for n in GUEST_NAMESPACES if n != "user"]}},
    "mounts": {"type": "array", "maxItems": 256, "items": _FS_MOUNT},
    "masked_paths": {"type": "array", "maxItems": 256, "items": _guest_path},
    "readonly_paths": {"type": "array", "maxItems": 256, "items": _guest_path},
}

CONTAINER_STATUS = ["created", "running", "stopped"]
CONTAINER_INFO = _obj({
    "name": _name, "status": {"enum": CONTAINER_STATUS}, "rootfs": _host_path,
    "pid": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**22},
    "exit_status": {"type": ["integer", "null"], "minimum": 0, "maximum": 255 + 128},
    "oom_kill": _uint64,
}, required=["name", "status"])

VSOCK = _obj({"uds": _host_path, "cid": {"type": "integer", "minimum": 3, "maximum": 2**32 - 2}})

RECORD = _obj({
    "id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}\\Z"},
    "protocol": {"type": "integer", "minimum": 0, "maximum": 1000},
    "status": {"enum": ["booting", "running", "stopping"]},
    "run_dir": _host_path,
    "socket": _host_path,
    "share_dir": _host_path,
    "vm_run_dir": {"type": ["string", "null"], "maxLength": 4096},
    "vm": {"enum": ["booted", "pooled"]},          # a pooled VM is its standby's (the factory's)
    "standby_pid": {"type": ["integer", "null"], "minimum": 1},
    "standby_start": {"type": ["integer", "null"], "minimum": 0},
    "owner_pid": {"type": "integer", "minimum": 1},
    "owner_start": _uint64,
    "qemu_pid": {"type": ["integer", "null"], "minimum": 1},
    "qemu_start": {"type": ["integer", "null"], "minimum": 0},
    "backend_pid": {"type": ["integer", "null"], "minimum": 1},
    "backend_start": {"type": ["integer", "null"], "minimum": 0},
    "vsock": dict(VSOCK, type=["object", "null"]),
    "memory_mib": {"type": "integer", "minimum": 1},
    "cpus": {"type": "integer", "minimum": 1},
    "boot_seconds": {"type": ["number", "null"], "minimum": 0},
    "created": _time,
    "containers": {"type": "array", "maxItems": MAX_CONTAINERS + 1, "items": CONTAINER_INFO},
}, required=["id", "protocol", "status", "run_dir", "socket", "share_dir", "owner_pid", "owner_start",
             "memory_mib", "cpus", "containers"])

EXEC_RESULT = _obj({
    "exit_code": _exit_code, "signal": _signum,
    "status": {"type": "integer", "minimum": 0, "maximum": 255 + 128},
    "stdout": _b64(MAX_OUTPUT), "stderr": _b64(MAX_OUTPUT),
    "stdout_truncated": {"type": "boolean"}, "stderr_truncated": {"type": "boolean"},
    "timed_out": {"type": "boolean"},
}, required=["exit_code", "signal", "status", "stdout", "stderr", "stdout_truncated", "stderr_truncated",
             "timed_out"])

# type -> (args schema, result schema)
REQUESTS: dict[str, tuple[dict, dict]] = {
    # Waits for the VM to be up (or its boot to fail); the sandbox record.
    "ready": (_empty, RECORD),
    "info": (_empty, RECORD),
    # Creates the container and its init process, held before exec until `start`.
    "create_container": (_obj({"name": _name, **_CONTAINER, **_PROCESS}, required=["name", "rootfs", "args"]),
                         _obj({"pid": {"type": "integer", "minimum": 1, "maximum": 2**22}}, required=["pid"])),
    "start": (_obj({"name": _name}, required=["name"]),
              _obj({"pid": {"type": "integer", "minimum": 1, "maximum": 2**22}}, required=["pid"])),
    # A further process in a container, its output captured (bounded); killed after `timeout`.
    "exec": (_obj({"name": _name, **_PROCESS, "timeout": _timeout}, required=["name", "args"]), EXEC_RESULT),
    # A further process whose stdio the client attaches itself (over vsock,
    # see `vsock`), then starts with start_process.
    "exec_stream": (_obj({"name": _name, **{k: v for k, v in _PROCESS.items() if k not in ("stdin", "max_output")},
                          "streams": {"type": "array", "maxItems": 3, "items": {"enum": list(STREAMS)}}},
                         required=["name", "args"]),
                    _obj({"process_id": _process_id, "agent_process_id": _process_id, "vsock": VSOCK},
                         required=["process_id", "agent_process_id", "vsock"])),
    "start_process": (_obj({"name": _name, "process_id": _process_id}, required=["name", "process_id"]),
                      _obj({"pid": {"type": "integer", "minimum": 1, "maximum": 2**22}}, required=["pid"])),
    # Without process_id: the container's init.
    "signal": (_obj({"name": _name, "process_id": _process_id, "signal": _signal}, required=["name", "signal"]),
               _empty),
    "wait": (_obj({"name": _name, "process_id": _process_id, "timeout": _timeout}, required=["name"]), EXEC_RESULT),
    "delete_container": (_obj({"name": _name}, required=["name"]), _empty),
    "put_file": (_obj({"name": _name, "path": _guest_path, "data": _b64(MAX_FILE),
                       "mode": {"type": "integer", "minimum": 0, "maximum": 0o7777}, "parents": {"type": "boolean"}},
                      required=["name", "path", "data"]), _empty),
    "get_file": (_obj({"name": _name, "path": _guest_path,
                       "max_size": {"type": "integer", "minimum": 0, "maximum": MAX_FILE}},
                      required=["name", "path"]),
                 _obj({"data": _b64(MAX_FILE), "size": _uint64}, required=["data", "size"])),
    # A one-shot container: created, started, waited for (killed after
    # `timeout`) and deleted; its init's result.
    "run": (_obj({"name": _name, **_CONTAINER, **_PROCESS, "timeout": _timeout}, required=["rootfs", "args"]),
            EXEC_RESULT),
    # From now on this connection gets the sandbox's events.
    "subscribe": (_empty, _empty),
    # Ends the sandbox; the reply comes once the VM and everything of it is gone.
    "shutdown": (_empty, _empty),
}

REQUEST = _obj({"id": {"type": "integer", "minimum": 0, "maximum": 2**53},
                "type": {"enum": sorted(REQUESTS)}, "args": {"type": "object"}}, required=["id", "type", "args"])
_error = _obj({"code": {"enum": ERROR_CODES}, "message": {"type": "string", "maxLength": 4096}},
              required=["code", "message"])
REPLY = _obj({"id": {"type": "integer", "minimum": 0, "maximum": 2**53}, "ok": {"type": "boolean"},
              "result": {"type": "object"}, "error": _error}, required=["id", "ok"])

EVENTS: dict[str, dict] = {
    # A process ended: the container's init (`init`: the container stopped) or an exec.
    "exit": _obj({"event": {"enum": ["exit"]}, "container": _name, "process_id": _process_id,
                  "init": {"type": "boolean"}, "exit_code": _exit_code, "signal": _signum,
                  "status": {"type": "integer", "minimum": 0, "maximum": 255 + 128}, "time": _time},
                 required=["event", "container", "process_id", "init", "exit_code", "signal", "status", "time"]),
    # The container's cgroup OOM-killed a process: oom_kill is its count so far.
    "oom": _obj({"event": {"enum": ["oom"]}, "container": _name, "oom_kill": _uint64, "time": _time},
                required=["event", "container", "oom_kill", "time"]),
    # The sandbox is ending: shut down on request, its client gone, or its VM died.
    "gone": _obj({"event": {"enum": ["gone"]}, "reason": {"type": "string", "maxLength": 4096}, "time": _time},
                 required=["event", "reason", "time"]),
}


def check_request(message: dict) -> tuple[int, str, dict]:
    """(id, type, args) of a valid request; raises SchemaError."""
    validate(message, REQUEST)
    validate(message["args"], REQUESTS[message["type"]][0], "/args")
    return message["id"], message["type"], message["args"]


def check_reply(message: dict, request_type: str) -> dict:
    """A reply's result, or {"error": {...}}; raises SchemaError."""
    validate(message, REPLY)
    if message["ok"]:
        if "error" in message or "result" not in message:
            raise SchemaError("/", "a successful reply carries a result and no error")
        validate(message["result"], REQUESTS[request_type][1], "/result")
        return message["result"]
    if "error" not in message or "result" in message:
        raise SchemaError("/", "a failed reply carries an error and no result")
    return {"error": message["error"]}


def check_event(message: dict) -> dict:
    kind = message.get("event")
    if kind not in EVENTS:
        raise SchemaError("/event", f"unknown event {str(kind)[:64]!r}")
    validate(message, EVENTS[kind])
    return message


def error_reply(request_id: int, code: str, message: str) -> dict:
    return {"id": request_id, "ok": False, "error": {"code": code if code in ERROR_CODES else "internal",
                                                     "message": message[:4000]}}
