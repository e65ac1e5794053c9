"""A host cgroup for each VM's QEMU, with limits.

QEMU runs the untrusted guest; bounding its memory and its task count on the
host means that a guest driving QEMU to grow (or a QEMU bug it triggers)
hits a wall in its own cgroup instead of the host's OOM killer. cgroup v2
(unified) and v1 (one hierarchy per controller, as on Debian hosts booted
with hybrid cgroups) are both handled. Where they cannot be made (no memory
or pids hierarchy, a host that delegates none to us), the VM does not start:
HostCgroupError says why. QEMU never runs unbounded.

Two layouts:
- by default each VM has a cgroup of its own, `<hierarchy>/kata-py/<name>`
  (the VM's run directory's name), with guest RAM + QEMU's overhead;
- given the cgroup the runtime is told to use (OCI `linux.cgroupsPath`, a
  pod's cgroup under CRI), the sandbox's host processes live there, as
  Kata's `sandbox_cgroup_only`: QEMU, and whatever the caller adopts (its
  vsock back end, the sandbox's owner or shim), under the sandbox's limits
  plus the measured overhead, so that the node accounts for what the VM
  really uses. The path is taken as cgroupfs does, absolute within each
  hierarchy (a relative one under the root too); the systemd form
  `slice:prefix:name` (containerd's and CRI-O's with a systemd cgroup
  driver) is mapped to the directory systemd would make for that unit,
  `<slice path>/<prefix>-<name>.scope`, without asking systemd for the unit
  (cgroupfs only, whatever `--systemd-cgroup` says). Only the
  directories kata-py made are removed again, never one that existed
  before; which those are is recorded in the runtime's run directory
  (`<KATA_PY_RUN_DIR>/<name>.cgroups`, beside an OCI container's VM run
  directory), so that the cleanup after a killed owner or shim
  (`remove_host_cgroups(name)`, which has only the name) removes them too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import paths
from ..errors import ConfigError, HostCgroupError

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
PARENT = "kata-py"
# QEMU's own memory beside guest RAM: TCG keeps translated code (up to 1 GiB
# by default) and its buffers; KVM needs far less.
OVERHEAD_MIB = {"tcg": 1024, "kvm": 256}
# In a cgroup of the runtime's choosing the sandbox's own processes are
# charged too: its owner (or shim) and the vsock back end, Python processes
# of ~15 and ~8 MiB anonymous memory once loaded (measured here), with room
# for their buffers.
RUNTIME_MIB = 64
PIDS_MAX = 512      # QEMU's vCPU, I/O and RCU threads, with room
V1_CONTROLLERS = ("memory", "pids")  # the hierarchies a v1 (hybrid) host must have
V2_CONTROLLERS = ("memory", "pids", "cpu")
MAX_PATH = 4096
CPU_PERIOD = 100000  # the kernel's default CFS period (µs)


@dataclass(frozen=True)
class HostLimits:
    """The sandbox's limits for a cgroup of the runtime's choosing, from the
    spec's linux.resources: its memory limit (else the VM's RAM counts) and
    its CPU quota, period and shares (else the cgroup's defaults)."""

    memory: int | None = None       # bytes
    cpu_quota: int | None = None    # µs per period
    cpu_period: int | None = None   # µs
    cpu_shares: int | None = None

    @classmethod
    def from_resources(cls, resources: dict | None) -> "HostLimits":
        resources = resources if isinstance(resources, dict) else {}
        memory = resources.get("memory") if isinstance(resources.get("memory"), dict) else {}
        cpu = resources.get("cpu") if isinstance(resources.get("cpu"), dict) else {}

        def positive(value) -> int | None:
            # What is absent, unlimited (-1) or not a number leaves the default.
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        return cls(memory=positive(memory.get("limit")), cpu_quota=positive(cpu.get("quota")),
                   cpu_period=positive(cpu.get("period")), cpu_shares=positive(cpu.get("shares")))


def cgroup_path(value: str) -> PurePosixPath:
    """The cgroup directory, relative to each hierarchy's root, that a
    cgroupsPath names; ConfigError if it names none we would make."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH or "\0" in value:
        raise ConfigError(f"linux.cgroupsPath {str(value)[:80]!r}: not a cgroup path")
    fields = value.split(":")
    if not value.startswith("/") and len(fields) == 3:
        relative = _systemd_path(value, *fields)
    else:
        parts = [p for p in value.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ConfigError(f"linux.cgroupsPath {value!r}: '..' is not allowed")
        # A relative path is placed under each hierarchy's root too: the
        # location the spec leaves to the runtime.
        relative = PurePosixPath(*parts) if parts else PurePosixPath()
    if not relative.parts:
        raise ConfigError(f"linux.cgroupsPath {value!r}: a hierarchy's root cannot be a sandbox's cgroup")
    return relative


def _systemd_path(value: str, slice_: str, prefix: str, name: str) -> PurePosixPath:
    """`slice:prefix:name` as the directory systemd would make: a slice
    `a-b.slice` is `a.slice/a-b.slice`; the unit is `prefix-name.scope`
    (or `name` itself when it is a slice)."""
    slice_ = slice_ or "system.slice"
    stem = slice_[:-len(".slice")] if slice_.endswith(".slice") else None
    if stem is None or "/" in slice_ or (stem != "-" and (not stem or "" in stem.split("-"))) \
            or not name or "/" in name or "/" in prefix or name in (".", ".."):
        raise ConfigError(f"linux.cgroupsPath {value!r}: not a cgroupfs path nor slice:prefix:name")
    parts: list[str] = []
    if stem != "-":         # -.slice is the root slice
        words = stem.split("-")
        parts = ["-".join(words[:i]) + ".slice" for i in range(1, len(words) + 1)]
    unit = name if name.endswith(".slice") else (f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
    return PurePosixPath(*parts, unit)


def _unified() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def _directories(name: str) -> list[tuple[Path, dict[str, str]]]:
    """(cgroup dir, {limit file: value}) per hierarchy, for a VM named `name`."""
    if _unified():
        return [(ROOT / PARENT / name, {"memory.max": "{memory}", "pids.max": str(PIDS_MAX)})]
    found = []
    if (ROOT / "memory" / "cgroup.procs").exists():
        found.append((ROOT / "memory" / PARENT / name, {"memory.limit_in_bytes": "{memory}"}))
    if (ROOT / "pids" / "cgroup.procs").exists():
        found.append((ROOT / "pids" / PARENT / name, {"pids.max": str(PIDS_MAX)}))
    return found


def _chosen_directories(relative: PurePosixPath, memory: int,
                        limits: HostLimits) -> list[tuple[Path, Path, dict[str, str]]]:
    """(hierarchy root, cgroup dir, {limit file: value}) for a cgroup of the
    runtime's choosing. Files are written in order: a CFS period before the
    quota measured in it."""
    if _unified():
        files = {"memory.max": str(memory), "pids.max": str(PIDS_MAX)}
        if limits.cpu_quota or limits.cpu_period:
            files["cpu.max"] = f"{limits.cpu_quota or 'max'} {limits.cpu_period or CPU_PERIOD}"
        if limits.cpu_shares:
            files["cpu.weight"] = str(shares_to_weight(limits.cpu_shares))
        return [(ROOT, ROOT / relative, files)]
    cpu: dict[str, str] = {}
    if limits.cpu_period:
        cpu["cpu.cfs_period_us"] = str(limits.cpu_period)
    if limits.cpu_quota:
        cpu["cpu.cfs_quota_us"] = str(limits.cpu_quota)
    if limits.cpu_shares:
        cpu["cpu.shares"] = str(limits.cpu_shares)
    # cpu and cpuacct too where mounted: CPU limits and accounting land
    # where the node looks for them.
    wanted = {"memory": {"memory.limit_in_bytes": str(memory)}, "pids": {"pids.max": str(PIDS_MAX)},
              "cpu": cpu, "cpuacct": {}}
    found: dict[str, tuple[Path, Path, dict[str, str]]] = {}
    for controller, files in wanted.items():
        hierarchy = ROOT / controller
        if not (hierarchy / "cgroup.procs").exists():
            continue
        # cpu and cpuacct may be one hierarchy (cpu,cpuacct) under two names: made once.
        mount = os.path.realpath(hierarchy)
        if mount in found:
            found[mount][2].update(files)
        else:
            found[mount] = (hierarchy, hierarchy / relative, dict(files))
    return list(found.values())


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares [2, 262144] onto v2 cpu.weight [1, 10000], as runc and crun map them."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def _record_path(name: str) -> Path:
    return paths.run_dir() / f"{name}.cgroups"


def _write_record(name: str, made: list[Path]) -> None:
    record = _record_path(name)
    paths.ensure_private_dir(record.parent)
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps({"made": [str(p) for p in made]}))
    os.replace(tmp, record)


def _unique(found: list[Path]) -> list[Path]:
    return list(dict.fromkeys(found))


def _recorded(name: str) -> list[Path]:
    """The directories a VM's cgroup of the runtime's choosing made, deepest first."""
    try:
        made = json.loads(_record_path(name).read_text())["made"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    root = os.path.realpath(ROOT)
    # Only cgroup directories: the record is ours, but a path outside the
    # cgroup root must never be removed on its word.
    found = [Path(p) for p in made if isinstance(p, str) and os.path.realpath(p).startswith(root + os.sep)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


class HostCgroup:
    def __init__(self, name: str, guest_mib: int, accel: str, path: str | None = None,
                 limits: HostLimits | None = None) -> None:
        self.name = name
        overhead = OVERHEAD_MIB.get(accel, OVERHEAD_MIB["tcg"])
        self.relative = cgroup_path(path) if path is not None else None
        self.limits = limits or HostLimits()
        if self.relative is None:
            self.memory = (guest_mib + overhead) << 20
        else:
            self.memory = (self.limits.memory or guest_mib << 20) + ((overhead + RUNTIME_MIB) << 20)
        self.paths: list[Path] = []
        self.made: list[Path] = []
        self.adopted: dict[int, dict[Path, Path]] = {}   # pid: {our dir: where it came from}

    def create(self) -> None:
        """Make the cgroups with their limits, or raise HostCgroupError and
        leave none behind."""
        sweep_stale()
        unified = _unified()
        if not unified:
            missing = [c for c in V1_CONTROLLERS if not (ROOT / c / "cgroup.procs").exists()]
            if missing:
                raise HostCgroupError(f"QEMU's host cgroup cannot be made: no {' or '.join(missing)} cgroup "
                                      f"hierarchy under {ROOT}; kata-py starts no VM without its limits")
        if self.relative is not None:
            self._create_chosen(unified)
            return
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

    def _create_chosen(self, unified: bool) -> None:
        layout = _chosen_directories(self.relative, self.memory, self.limits)
        levels = [PurePosixPath(*self.relative.parts[:i]) for i in range(1, len(self.relative.parts) + 1)]
        # Recorded before any is made: a process killed half-way leaves
        # nothing that the cleanup after it does not know of. An earlier VM
        # of this name that nobody cleaned up after made its own: kept.
        earlier = _recorded(self.name)
        missing = [hierarchy / level for hierarchy, _, _ in layout for level in levels
                   if not (hierarchy / level).exists()]
        where = self.relative
        try:
            if missing:
                _write_record(self.name, _unique(earlier + missing))
            for hierarchy, path, files in layout:
                where = path
                for attempt in range(3):
                    try:
                        self._make_levels(hierarchy, levels, unified)
                        break
                    except FileNotFoundError:
                        # A parent went between our look and our mkdir (the
                        # last sandbox in it that had made it ended): again.
                        if attempt == 2:
                            raise
                self.paths.append(path)
                for file, value in files.items():
                    where = path / file
                    where.write_text(value)
            if missing or self.made:
                _write_record(self.name, _unique(earlier + self.made))
        except OSError as err:
            self.remove()
            raise HostCgroupError(f"the sandbox's host cgroup cannot be made: {where}: {err.strerror or err}; "
                                  "kata-py starts no VM without its limits") from err

    def _make_levels(self, hierarchy: Path, levels: list[PurePosixPath], unified: bool) -> None:
        for level in levels:
            if unified:
                # A v2 child has a controller only where its parent hands it
                # down; each alone, as a host may lack one.
                _enable_controllers(hierarchy / level.parent)
            try:
                (hierarchy / level).mkdir()
            except FileExistsError:
                continue        # not ours to remove
            self.made.append(hierarchy / level)

    def join(self) -> None:
        """In the forked child, before exec: move itself into the cgroups."""
        for path in self.paths:
            try:
                with open(path / "cgroup.procs", "w") as f:
                    f.write("0")
            except OSError:
                pass

    def adopt(self, pid: int) -> bool:
        """Move another of the sandbox's host processes (its vsock back end,
        its owner or shim) into a cgroup of the runtime's choosing; it is
        moved back where it came from before the cgroup is removed. False,
        with a warning, if it could not be moved."""
        if self.relative is None or not self.paths:
            return False
        origins = _origins(pid, self.paths)
        self.adopted[pid] = origins
        try:
            for path in self.paths:
                (path / "cgroup.procs").write_text(str(pid))
        except OSError as err:
            log.warning("process %d cannot join the sandbox's host cgroup %s: %s", pid, path, err.strerror or err)
            return False
        return True

    def remove(self) -> None:
        for pid, origins in self.adopted.items():
            for origin in origins.values():
                try:
                    (origin / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass        # gone already, or its old cgroup is: it goes with the process
        self.adopted = {}
        remove_host_cgroups(self.name)
        self.paths = []
        self.made = []


def _origins(pid: int, ours: list[Path]) -> dict[Path, Path]:
    """For each of our cgroup dirs, the cgroup of the same hierarchy that
    `pid` is in now (/proc/PID/cgroup)."""
    try:
        lines = (PROC / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return {}
    where: dict[str, str] = {}
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        for controller in controllers.split(",") if controllers else [""]:
            where[controller] = path
    found = {}
    for path in ours:
        if _unified():
            hierarchy, key = ROOT, ""
        else:
            hierarchy = ROOT / path.relative_to(ROOT).parts[0]
            key = hierarchy.name
        if key in where:
            found[path] = hierarchy / where[key].lstrip("/")
    return found


def _enable_v2_controllers(parent: Path) -> None:
    parent.mkdir(exist_ok=True)
    for directory in (ROOT, parent):
        try:
            (directory / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError:
            pass


def _enable_controllers(directory: Path) -> None:
    for controller in V2_CONTROLLERS:
        try:
            (directory / "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError:
            pass        # writing a limit file it lacks says so


def remove_vm_run_dir(run_dir: Path, timeout: float = 2.0) -> None:
    """What a VM whose QEMU is gone (or going: up to `timeout`) leaves: its
    run directory (sockets and logs only: its 9p export is elsewhere) and
    the host cgroups named after it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_host_cgroups(Path(run_dir).name, timeout)


def remove_host_cgroups(name: str, timeout: float = 2.0) -> None:
    """Remove a VM's cgroups (empty once its QEMU is gone; the kernel may take
    a moment to notice an exit, hence the short retry): those of the default
    layout, and those it made for a cgroup of the runtime's choosing."""
    for path, _ in _directories(name):
        _rmdir(path, timeout)
    record = _record_path(name)
    if not record.exists():
        return
    left = []
    for path in _recorded(name):
        if any(path in busy.parents for busy in left):
            left.append(path)       # above one of ours still busy: for the later cleanup too
            continue
        if _has_children(path):
            # Someone else's cgroups below one kata-py made (a parent shared
            # with another sandbox, or with the engine's own): theirs now.
            # runc leaves the parents it makes; neither waited for nor kept.
            log.info("host cgroup %s: others' cgroups below it, left", path)
            continue
        if not _rmdir(path, timeout):
            left.append(path)
    if left:
        _write_record(name, left)   # for a later cleanup
    else:
        record.unlink(missing_ok=True)


def _has_children(path: Path) -> bool:
    try:
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(path))
    except OSError:
        return False


def _rmdir(path: Path, timeout: float) -> bool:
    """Remove an empty cgroup directory; False if it is still there."""
    deadline = time.monotonic() + timeout
    while path.exists():
        try:
            os.rmdir(path)
        except FileNotFoundError:
            break
        except OSError:
            if time.monotonic() > deadline:
                log.warning("host cgroup %s is still busy", path)
                return False
            time.sleep(0.05)
    return True


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
