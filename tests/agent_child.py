"""Run a program the way the guest agent does (spawn.spawn, with a
credentials finalizer and a seccomp filter), on the host, for unit tests.

The tests run as root on the host: the finalizer's system calls are the real
ones, in a forked child, and the program's own view (/proc/self/status,
`ulimit`, a failing mkdir) is what the tests read back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))

from kata_agent import credentials  # noqa: E402
from kata_agent.spawn import spawn  # noqa: E402

BUSYBOX = "/bin/busybox"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def run(argv: list[str], security: dict | None = None, seccomp_filter=None, cwd: str = "/") -> tuple[int, str]:
    """(exit status as os.waitstatus_to_exitcode gives it, stdout + stderr).
    Raises SpawnError when the child fails before exec (it is reaped first)."""
    finish = credentials.finalize(security or {}, seccomp_filter)
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    pids: list[int] = []

    def setup() -> None:
        finish.early()
        finish()

    try:
        spawn(argv, ENV, cwd, (null, out_w, out_w), setup=setup, pre_exec=finish.pre_exec, on_fork=pids.append)
    except BaseException:
        os.close(out_r)
        for pid in pids:
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(out_w)
        os.close(null)
    chunks = []
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(out_r)
    _, status = os.waitpid(pids[0], 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def status_fields(text: str) -> dict[str, str]:
    """The `Name:\tvalue` lines of a /proc/PID/status inside `text`."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":\t")
        if sep and name and " " not in name:
            fields[name] = value.strip()
    return fields


def cap_mask(names) -> int:
    mask = 0
    for name in names:
        mask |= 1 << credentials.CAP_NUMBERS[name]
    return mask


def cap_hex(mask: int) -> str:
    return f"{mask:016x}"
