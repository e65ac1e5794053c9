"""What the harness reads (and, after a broken probe, puts back) on the host:
kernel identity, block devices, the clock, sysctls, loaded modules, and
whether the host can still fork and allocate."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DISK_HEAD_BYTES = 65536  # what the disk probes compare: partition table, boot block, superblock
RESPONSIVE_ALLOC = 64 << 20


@dataclass(frozen=True)
class HostFacts:
    kernel_release: str
    kernel_version: str
    boot_id: str  # unique per boot of a kernel: equal inside a container only if it runs on this kernel
    cmdline_sha256: str
    hostname: str

    @classmethod
    def gather(cls) -> "HostFacts":
        uname = os.uname()
        return cls(kernel_release=uname.release, kernel_version=uname.version,
                   boot_id=_read("/proc/sys/kernel/random/boot_id") or "",
                   cmdline_sha256=hashlib.sha256(Path("/proc/cmdline").read_bytes()).hexdigest(),
                   hostname=socket.gethostname())


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Disk:
    name: str
    major: int
    minor: int
    sectors: int
    head_sha256: str | None  # of its first DISK_HEAD_BYTES, when the host could read them

    @property
    def dev(self) -> str:
        return f"{self.major}:{self.minor}"

    def describe(self) -> str:
        return f"{self.name} ({self.sectors * 512 / (1 << 30):.0f} GiB)" if self.sectors else self.name


def host_disks() -> list[Disk]:
    """The host's block devices that have a size (empty loop devices do not count)."""
    disks = []
    for entry in sorted(Path("/sys/block").iterdir()) if Path("/sys/block").is_dir() else []:
        sectors = int(_read(str(entry / "size")) or 0)
        dev = _read(str(entry / "dev")) or ""
        if not sectors or ":" not in dev:
            continue
        major, minor = (int(x) for x in dev.split(":"))
        disks.append(Disk(entry.name, major, minor, sectors, _head_sha256(entry.name, major, minor)))
    return disks


def _head_sha256(name: str, major: int, minor: int) -> str | None:
    node = Path("/dev") / name
    try:
        st = node.stat()
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(major, minor):
            return None
        with open(node, "rb") as f:
            return hashlib.sha256(f.read(DISK_HEAD_BYTES)).hexdigest()
    except OSError:
        return None


def block_location(path: Path) -> tuple[str, str] | None:
    """(major:minor of the block device holding `path`, `path` relative to
    that filesystem's root), or None when it is not on a block device."""
    real = os.path.realpath(path)
    st = os.stat(real)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    if not Path(f"/sys/dev/block/{dev}").exists():
        return None
    best = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[2] != dev:
            continue
        root, mountpoint = (_unescape(f) for f in fields[3:5])
        if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
            if best is None or len(mountpoint) > len(best[1]):
                best = (root, mountpoint)
    if best is None:
        return None
    root, mountpoint = best
    inside = os.path.normpath(os.path.join(root, os.path.relpath(real, mountpoint)))
    return dev, inside.lstrip("/")


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


# -- sysctls and modules


def read_sysctl(name: str) -> str | None:
    return _read("/proc/sys/" + name.replace(".", "/"))


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys/" + name.replace(".", "/")).write_text(value + "\n")


def loaded_modules() -> set[str] | None:
    """Module names in /proc/modules; None on a kernel without loadable modules."""
    text = _read("/proc/modules")
    return None if text is None else {line.split()[0] for line in text.splitlines() if line.strip()}


def unload_module(name: str) -> None:
    """Best effort: a module a broken probe loaded into the host goes again."""
    from ..oci.busybox import BUSYBOX

    rmmod = shutil.which("rmmod")
    argv = [rmmod] if rmmod else [BUSYBOX, "rmmod"]
    subprocess.run(argv + [name], capture_output=True, timeout=30)


# -- the clock


class Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("_reserved", ctypes.c_int * 11)]


ADJ_FREQUENCY = 0x0002
ADJ_TICK = 0x4000


def _adjtimex(timex: Timex) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.adjtimex(ctypes.byref(timex)) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def clock_tuning() -> tuple[int, int]:
    """(tick, freq) of the host's clock discipline."""
    timex = Timex(modes=0)
    _adjtimex(timex)
    return timex.tick, timex.freq


def set_clock_tuning(tick: int, freq: int) -> None:
    _adjtimex(Timex(modes=ADJ_TICK | ADJ_FREQUENCY, tick=tick, freq=freq))


def clock_offset() -> float:
    """CLOCK_REALTIME - CLOCK_MONOTONIC: constant unless someone sets the clock
    (NTP slews it by at most 0.5 ms a second)."""
    return time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)


def restore_clock_offset(offset: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_MONOTONIC) + offset)


# -- responsiveness


def host_responsiveness() -> dict:
    """Can this process still fork and allocate? With what latency (evidence, not a verdict threshold)."""
    result: dict = {"ok": True}
    started = time.monotonic()
    try:
        subprocess.run(["/bin/true"], check=True, timeout=60)
        result["fork_ms"] = round((time.monotonic() - started) * 1000, 1)
    except (OSError, subprocess.SubprocessError) as exc:
        result.update(ok=False, fork_error=str(exc))
    started = time.monotonic()
    try:
        buffer = bytearray(RESPONSIVE_ALLOC)
        for offset in range(0, RESPONSIVE_ALLOC, 4096):  # touch every page: really allocated
            buffer[offset] = 1
        del buffer
        result["alloc_ms"] = round((time.monotonic() - started) * 1000, 1)
    except MemoryError:
        result.update(ok=False, alloc_error="MemoryError")
    return result


def describe_responsiveness(measured: dict) -> str:
    if not measured.get("ok"):
        return "host could not " + ("fork: " + measured["fork_error"] if "fork_error" in measured
                                    else "allocate 64 MiB")
    return f"host forked in {measured['fork_ms']} ms and touched 64 MiB in {measured['alloc_ms']} ms"


# -- the kernel log


class KernelLog:
    """The host's kernel log from now on (/dev/kmsg, read from its end)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.lines: list[str] = []

    def new_lines(self) -> list[str]:
        """Every message logged since it was opened (the text after `;`)."""
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records were overwritten before this read: go on with the next
                continue
            if not record:
                break
            self.lines.append(record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])
        return list(self.lines)

    def close(self) -> None:
        os.close(self.fd)
