"""A sandbox's record: one JSON file in the owner's run directory.

    <run_dir()>/sb-<id>/sandbox.json    this record
    <run_dir()>/sb-<id>/owner.sock      the owner's socket (0600)
    <run_dir()>/sb-<id>/owner.log       its log
    <run_dir()>/sb-<id>/share/          the VM's 9p export (see share.py)
    <run_dir()>/vm-<id>/                the VM's run directory (QEMU's sockets,
                                        console log; its host cgroups take its name)

A sandbox on a pooled VM (`"vm": "pooled"`) names its standby instead of
QEMU: the VM, its run directory and its 9p share are the standby's.

It names the sandbox's processes with their start times (a pid alone may be
reused), so that whoever finds the owner dead can end what is left and
remove the rest: `clean_up_after(record)`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .. import paths
from ..vmm.host_cgroup import remove_vm_run_dir
from .share import remove_share_dir

RECORD = "sandbox.json"
SOCKET = "owner.sock"
LOG = "owner.log"
SHARE = "share"


def sandbox_dir(sandbox_id: str) -> Path:
    return paths.run_dir() / f"sb-{sandbox_id}"


def vm_dir(sandbox_id: str) -> Path:
    return paths.run_dir() / f"vm-{sandbox_id}"


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    try:
        return int(raw.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def same_process(pid: int | None, start: int | None) -> bool:
    """Whether `pid` is still the process that started at `start` (and not a zombie)."""
    if not pid or start is None:
        return False
    if start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def write(record: dict) -> None:
    """Atomically (a reader never sees half a record)."""
    directory = Path(record["run_dir"])
    tmp = directory / (RECORD + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, directory / RECORD)


def read(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _end(pid: int | None, start: int | None, timeout: float) -> None:
    """SIGKILL a leftover process of the record (if it is still that process)
    and wait a bounded time for it to go."""
    if not same_process(pid, start):
        return
    deadline = time.monotonic() + timeout
    # QEMU dies with its parent (PR_SET_PDEATHSIG) and the vsock back end when
    # QEMU does: give them a moment before the signal.
    while time.monotonic() < deadline - timeout / 2:
        if not same_process(pid, start):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while same_process(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)


def clean_up_after(record: dict, timeout: float = 5.0) -> None:
    """What a dead owner left: its VM's processes, run directories, host
    cgroups. Its mounts lived in its own mount namespace and went with the
    last process in it. Idempotent; never touches a live owner's sandbox."""
    if same_process(record.get("owner_pid"), record.get("owner_start")):
        return
    if record.get("vm") == "pooled":
        # The VM, its run directory and its share are its standby's, which
        # ends them once the owner's claim connection closes (with the owner).
        _wait_gone(record.get("standby_pid"), record.get("standby_start"), timeout)
        _remove_run_dir(Path(record["run_dir"]))
        return
    for key in ("qemu", "backend"):
        _end(record.get(f"{key}_pid"), record.get(f"{key}_start"), timeout)
    vm_run_dir = record.get("vm_run_dir")
    if vm_run_dir:
        remove_vm_run_dir(Path(vm_run_dir))
    run_dir = Path(record["run_dir"])
    remove_share_dir(Path(record.get("share_dir") or run_dir / SHARE))
    _remove_run_dir(run_dir)


def remove_leftovers(run_dir: Path) -> None:
    """A sandbox's run directory and what its record names, if its owner is
    dead (killed before it could clean up); nothing of a live owner's."""
    record = read(run_dir)
    if record is not None:
        if same_process(record.get("owner_pid"), record.get("owner_start")):
            return
        clean_up_after(record)
    _remove_run_dir(Path(run_dir))


def _wait_gone(pid: int | None, start: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while same_process(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)


def _remove_run_dir(run_dir: Path) -> None:
    for name in (RECORD, RECORD + ".tmp", SOCKET, LOG):
        try:
            (run_dir / name).unlink()
        except FileNotFoundError:
            pass
    try:
        run_dir.rmdir()
    except OSError:
        pass
