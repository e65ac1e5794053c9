"""cgroup v2 inside the guest: one cgroup per container, its limits and figures.

The VM is sized from the same limits on the host; here they are enforced
for the container's processes, as runc would on a v2 host. Conversions
follow runc's for cgroup v2 (shares -> weight, swap as memory+swap total).
"""

from __future__ import annotations

import os
import select
import time

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")


class CgroupError(OSError):
    pass


def enable_controllers(root: str = ROOT) -> None:
    """Let child cgroups use every controller the kernel has."""
    for name in CONTROLLERS:
        try:
            with open(f"{root}/cgroup.subtree_control", "w") as f:
                f.write(f"+{name}")
        except OSError:
            pass  # not built into this kernel: its limits will be refused later


def _max(value) -> str:
    return "max" if value is None or value < 0 else str(int(value))


def resource_files(resources: dict) -> list[tuple[str, str]]:
    """(file, value) pairs for an OCI linux.resources object, in a safe order."""
    files = []
    memory = resources.get("memory") or {}
    if "limit" in memory:
        files.append(("memory.max", _max(memory["limit"])))
    if "reservation" in memory:
        files.append(("memory.low", _max(memory["reservation"])))
    if "swap" in memory:
        swap, limit = memory["swap"], memory.get("limit")
        if swap is None or swap < 0:
            files.append(("memory.swap.max", "max"))
        elif limit is not None and limit > 0:
            # OCI's swap is memory+swap together (the v1 memsw limit).
            if swap < limit:
                raise CgroupError(22, "memory.swap must not be below memory.limit")
            files.append(("memory.swap.max", str(swap - limit)))
    cpu = resources.get("cpu") or {}
    if cpu.get("shares"):
        shares = max(2, min(262144, int(cpu["shares"])))
        files.append(("cpu.weight", str(1 + ((shares - 2) * 9999) // 262142)))
    if "quota" in cpu or "period" in cpu:
        quota = cpu.get("quota")
        period = cpu.get("period") or 100000
        files.append(("cpu.max", f"{'max' if not quota or quota < 0 else int(quota)} {int(period)}"))
    if cpu.get("cpus"):
        files.append(("cpuset.cpus", cpu["cpus"]))
    if cpu.get("mems"):
        files.append(("cpuset.mems", cpu["mems"]))
    pids = resources.get("pids") or {}
    if "limit" in pids:
        limit = pids["limit"]
        files.append(("pids.max", "max" if limit is None or limit <= 0 else str(int(limit))))
    weight = (resources.get("blockIO") or {}).get("weight")
    if weight:
        files.append(("io.weight", f"default {int(weight)}"))
    return files


class Cgroup:
    def __init__(self, name: str, root: str = ROOT) -> None:
        self.path = f"{root}/{name}"

    def create(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def apply(self, resources: dict) -> None:
        for name, value in resource_files(resources or {}):
            try:
                with open(f"{self.path}/{name}", "w") as f:
                    f.write(value)
            except OSError as exc:
                raise CgroupError(exc.errno, f"{name} = {value}: {exc.strerror}") from None

    def enter(self) -> None:
        """Move the calling process in (runs in the child before exec)."""
        fd = os.open(f"{self.path}/cgroup.procs", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    def _read(self, name: str) -> str:
        try:
            with open(f"{self.path}/{name}") as f:
                return f.read()
        except OSError:
            return ""

    def _keyed(self, name: str) -> dict[str, int]:
        values = {}
        for line in self._read(name).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
        return values

    def _number(self, name: str) -> int | None:
        text = self._read(name).strip()
        return int(text) if text.isdigit() else None

    def stats(self) -> dict:
        cpu = self._keyed("cpu.stat")
        events = self._keyed("memory.events")
        memory_stat = self._keyed("memory.stat")
        return {
            "cpu": {"usage_usec": cpu.get("usage_usec", 0), "user_usec": cpu.get("user_usec", 0),
                    "system_usec": cpu.get("system_usec", 0)},
            "memory": {"usage": self._number("memory.current") or 0, "limit": self._number("memory.max"),
                       "swap_usage": self._number("memory.swap.current") or 0,
                       "oom": events.get("oom", 0), "oom_kill": events.get("oom_kill", 0),
                       "anon": memory_stat.get("anon", 0), "file": memory_stat.get("file", 0)},
            "pids": {"current": self._number("pids.current") or 0, "limit": self._number("pids.max")},
        }

    def wait_count(self, name: str, key: str, above: int, alive, interval: float = 1.0) -> int | None:
        """Block until counter `key` of keyed file `name` (memory.events) is
        above `above`; return it, or None once `alive()` turns false or the
        file is gone. A change to memory.events is a kernfs notification,
        which poll() reports as POLLPRI: nothing is read on a timer except
        the liveness check, once per `interval`."""
        try:
            fd = os.open(f"{self.path}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                os.lseek(fd, 0, os.SEEK_SET)
                count = 0
                for line in os.read(fd, 4096).decode(errors="replace").splitlines():
                    field, _, value = line.partition(" ")
                    if field == key and value.strip().isdigit():
                        count = int(value)
                if count > above:
                    return count
                if not alive():
                    return None
                poller.poll(int(interval * 1000))
        except OSError:
            return None
        finally:
            os.close(fd)

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    def kill_and_remove(self, timeout: float) -> bool:
        """SIGKILL everything in the cgroup (cgroup.kill), then remove it once
        the kernel has it empty; False if it is still there after `timeout`."""
        try:
            with open(f"{self.path}/cgroup.kill", "w") as f:
                f.write("1")
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)  # dying processes leave the cgroup as they are reaped
