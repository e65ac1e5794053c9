"""Values the API hands back: results, events, container information."""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Literal, Optional, Union

Size = Union[int, str]
EventKind = Literal["exit", "oom", "gone"]
ContainerStatus = Literal["created", "running", "stopped"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Size, what: str = "size") -> int:
    """Bytes from an int or a string such as "256M", "1G", "512KiB" (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: {value} is negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{what}: {value!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class ExecResult:
    """How a process ended and what it wrote (each stream bounded by max_output)."""

    exit_code: Optional[int]        # None when killed by a signal
    signal: Optional[int]           # the signal that killed it, if one did
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False         # killed (SIGKILL) because its timeout passed

    @property
    def status(self) -> int:
        """The shell's convention: exit_code, or 128+N when killed by signal N."""
        return 128 + self.signal if self.signal else int(self.exit_code or 0)

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out

    @classmethod
    def from_wire(cls, result: dict) -> "ExecResult":
        return cls(exit_code=result["exit_code"], signal=result["signal"],
                   stdout=binascii.a2b_base64(result["stdout"]), stderr=binascii.a2b_base64(result["stderr"]),
                   stdout_truncated=result["stdout_truncated"], stderr_truncated=result["stderr_truncated"],
                   timed_out=result["timed_out"])


@dataclass(frozen=True)
class Event:
    """Something that happened in the sandbox, pushed by its owner as it happened.

    kind "exit": a process ended (`init`: the container's init, so the
    container stopped); "oom": the container's cgroup OOM-killed a process
    (`oom_kill` counts them so far); "gone": the sandbox ended (`reason`).
    `time` is when the owner learned of it (host clock, time.time()),
    `received` when this process did.
    """

    kind: EventKind
    time: float
    received: float
    container: Optional[str] = None
    process_id: Optional[str] = None
    init: bool = False
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    status: Optional[int] = None
    oom_kill: Optional[int] = None
    reason: Optional[str] = None

    @classmethod
    def from_wire(cls, event: dict, received: float) -> "Event":
        return cls(kind=event["event"], time=event["time"], received=received, container=event.get("container"),
                   process_id=event.get("process_id"), init=bool(event.get("init", False)),
                   exit_code=event.get("exit_code"), signal=event.get("signal"), status=event.get("status"),
                   oom_kill=event.get("oom_kill"), reason=event.get("reason"))


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    status: ContainerStatus
    rootfs: Optional[str] = None
    pid: Optional[int] = None           # the init's pid in the guest
    exit_status: Optional[int] = None
    oom_kill: int = 0

    @classmethod
    def from_wire(cls, info: dict) -> "ContainerInfo":
        return cls(name=info["name"], status=info["status"], rootfs=info.get("rootfs"), pid=info.get("pid"),
                   exit_status=info.get("exit_status"), oom_kill=info.get("oom_kill", 0))
