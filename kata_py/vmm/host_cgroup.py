"""A host cgroup for each VM's QEMU, with limits.

QEMU runs the untrusted guest; bounding its memory and its task count on the
host means that a guest driving QEMU to grow (or a QEMU bug it triggers)
hits a wall in its own cgroup instead of the host's OOM killer. cgroup v2
(unified) and v1 (one hierarchy per controller, as on Debian hosts booted
with hybrid cgroups) are both handled. Where they cannot be made (no memory
or pids hierarchy, a host that delegates none to us), the VM does not start:
HostCgroupError says why. QEMU never runs unbounded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..errors import HostCgroupError

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PARENT = "kata-py"
# QEMU's own memory beside guest RAM: TCG keeps translated code (up to 1 GiB
# by default) and its buffers; KVM needs far less.
OVERHEAD_MIB = {"tcg": 1024, "kvm": 256}
PIDS_MAX = 512      # QEMU's vCPU, I/O and RCU threads, with room
V1_CONTROLLERS = ("memory", "pids")  # the hierarchies a v1 (hybrid) host must have


def _directories(name: str) -> list[tuple[Path, dict[str, str]]]:
    """(cgroup dir, {limit file: value}) per hierarchy, for a VM named `name`."""
    if (ROOT / "cgroup.controllers").exists():  # unified (v2)
        return [(ROOT / PARENT / name, {"memory.max": "{memory}", "pids.max": str(PIDS_MAX)})]
    found = []
    if (ROOT / "memory" / "cgroup.procs").exists():
        found.append((ROOT / "memory" / PARENT / name, {"memory.limit_in_bytes": "{memory}"}))
    if (ROOT / "pids" / "cgroup.procs").exists():
        found.append((ROOT / "pids" / PARENT / name, {"pids.max": str(PIDS_MAX)}))
    return found


class HostCgroup:
    def __init__(self, name: str, guest_mib: int, accel: str) -> None:
        self.name = name
        self.memory = (guest_mib + OVERHEAD_MIB.get(accel, OVERHEAD_MIB["tcg"])) << 20
        self.paths: list[Path] = []

    def create(self) -> None:
        """Make the cgroups with their limits, or raise HostCgroupError and
        leave none behind."""
        sweep_stale()
        unified = (ROOT / "cgroup.controllers").exists()
        if not unified:
            missing = [c for c in V1_CONTROLLERS if not (ROOT / c / "cgroup.procs").exists()]
            if missing:
                raise HostCgroupError(f"QEMU's host cgroup cannot be made: no {' or '.join(missing)} cgroup "
                                      f"hierarchy under {ROOT}; kata-py starts no VM without its limits")
        for path, limits in _directories(self.name):
            where = path
            try:
                if unified:
                    _enable_v2_controllers(path.parent)
                path.mkdir(parents=True, exist_ok=True)
                self.paths.append(path)
                for file, value in limits.items():
                    where = path / file
                    where.write_text(value.format(memory=self.memory))
            except OSError as err:
                self.remove()
                raise HostCgroupError(f"QEMU's host cgroup cannot be made: {where}: {err.strerror or err}; "
                                      "kata-py starts no VM without its limits") from err

    def join(self) -> None:
        """In the forked child, before exec: move itself into the cgroups."""
        for path in self.paths:
            try:
                with open(path / "cgroup.procs", "w") as f:
                    f.write("0")
            except OSError:
                pass

    def remove(self) -> None:
        remove_host_cgroups(self.name)
        self.paths = []


def _enable_v2_controllers(parent: Path) -> None:
    parent.mkdir(exist_ok=True)
    for directory in (ROOT, parent):
        try:
            (directory / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError:
            pass


def remove_host_cgroups(name: str, timeout: float = 2.0) -> None:
    """Remove a VM's cgroups (empty once its QEMU is gone; the kernel may take
    a moment to notice an exit, hence the short retry)."""
    for path, _ in _directories(name):
        deadline = time.monotonic() + timeout
        while path.exists():
            try:
                os.rmdir(path)
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("host cgroup %s is still busy", path)
                    break
                time.sleep(0.05)


STALE_AFTER = 120.0  # seconds: long past any launch that made a cgroup and has yet to join it


def sweep_stale() -> None:
    """Remove empty VM cgroups whose QEMU is long gone: what a monitor killed
    before it could report its run directory leaves behind. Empty and old
    only, so that a cgroup another launch just made is never taken from it."""
    now = time.time()
    for path, _ in _directories("x"):
        try:
            entries = list(os.scandir(path.parent))
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith("vm-") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                if now - entry.stat().st_mtime < STALE_AFTER:
                    continue
                with open(os.path.join(entry.path, "cgroup.procs")) as f:
                    if f.read().strip():
                        continue
                os.rmdir(entry.path)
            except OSError:
                continue  # busy, or gone meanwhile
