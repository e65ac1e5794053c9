"""Helpers shared by the OCI CLI test modules."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import pytest

from kata_py.oci.state import StateStore
from tests.conftest import KATA, RUN_DIR, qemu_processes_under

PR_SET_CHILD_SUBREAPER = 36
MONITOR = b"kata_py.oci.monitor"


def cli(root: Path, *args, input: bytes | None = None, stdin=None, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess:
    """`kata-py --root ROOT ARGS...`. A create or a detached run hands its stdio
    to the container's monitor, so give those files, not pipes we wait on."""
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    return subprocess.run(KATA + ["--root", str(root), *map(str, args)], input=input, stdin=stdin,
                          stdout=stdout, stderr=stderr, timeout=timeout)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def monitors_under(root: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            line = cmdline(int(proc.name))
            if MONITOR in line and str(root).encode() in line.split(b"\0"):
                found.append(int(proc.name))
    return found


def assert_nothing_left(root: Path) -> None:
    """Nothing of the containers under `root` is left. A running VM factory's
    own directory and pooled VMs (kept under it) do not count."""
    entries = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert entries == [], f"left under --root: {entries}"
    assert monitors_under(root) == []
    factory = str(RUN_DIR / "factory").encode()
    assert [pid for pid in qemu_processes_under(RUN_DIR) if factory not in cmdline(pid)] == []
    sandboxes = sorted(p.name for p in RUN_DIR.iterdir() if p.name != "factory") if RUN_DIR.exists() else []
    assert sandboxes == [], f"left in the run directory: {sandboxes}"


@pytest.fixture(scope="module", autouse=True)
def subreaper(image):
    """Become a child subreaper, as conmon and containerd's shim are: the monitor
    that `create` leaves behind is re-parented to us, and its exit status (the
    container's, by contract) can be read with waitpid."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    # Orphans re-parented to us that no test waited for (a killed monitor's
    # helpers): no zombies left behind. Every subprocess.run has finished.
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.2)
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
        except ChildProcessError:
            break


@pytest.fixture(autouse=True)
def force_delete_leftovers(tmp_path):
    """A test that fails half-way must not leave its container's VM running."""
    yield
    root = tmp_path / "root"
    for container_id in StateStore(root).list_ids():
        cli(root, "delete", "--force", container_id)


def reap(pid: int, timeout: float = 30) -> int:
    """The exit status of a process re-parented to us (we are a subreaper)."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == os.getpid(), f"{pid} is not our child (parent {parent}): not re-parented to the subreaper"
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < deadline, f"process {pid} did not exit within {timeout} s"
        time.sleep(0.05)
