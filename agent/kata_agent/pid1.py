"""PID 1 duties: the guest's filesystems, kernel modules, and power-off."""

from __future__ import annotations

import os
import sys
import time

from .syscalls import MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RELATIME, RB_AUTOBOOT, Syscalls

MODULE_LIST = "/etc/kata-agent/modules"
# Free page reporting (virtio_balloon) hands back only free blocks of at least
# 2^order pages, and only while a zone has 32 of them free above its low
# watermark: at the default order (9: 2 MiB blocks) that is 64 MiB, more than a
# 128 MiB guest ever has free, so nothing would be reported. Order 5 (128 KiB
# blocks) needs 4 MiB. Linux 6.1's driver sets the order when it registers, so
# it is lowered once the module has loaded. (Measured, 128 MiB guests: an idle
# sandbox 111 -> 103 MiB of its RAM touched on the host; one that had freed a
# 40 MiB buffer 111 -> 89 MiB.)
REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
REPORTING_ORDER_VALUE = "5"
ROOT_BIND = "/.root"

# (source, target, fstype, flags, data)
BASE_MOUNTS = [
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, ""),
    # favordynmods: moving a process into a cgroup (every container process
    # does, before exec) then waits for no RCU grace period: 18 -> 6 ms of a
    # container's set-up under TCG, at a small cost to every fork and exit.
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, "favordynmods"),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_RELATIME, "mode=0755"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_RELATIME, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_RELATIME, "mode=1777"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC | MS_RELATIME, "mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_RELATIME, "mode=1777"),
]


def kernel_param(name: str, path: str = "/proc/cmdline") -> str | None:
    """The value of `name=value` on the guest kernel's command line, if given."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    for word in words:
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def log(message: str) -> None:
    """Agent messages go to the console (the host keeps it as the VM's console log)."""
    try:
        # Guest uptime in the prefix lines up with the kernel's own timestamps.
        sys.stderr.write(f"kata-agent[{time.monotonic():.3f}]: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


class Pid1:
    def __init__(self, sys_: Syscalls | None = None) -> None:
        self.sys = sys_ or Syscalls()

    def make_root_a_mount(self) -> None:
        """Put a bind of the initramfs over itself and make that the root.

        The kernel's initial rootfs can never be pivot_root'ed away from (it has
        no parent mount); a bind of it on top can. Costs nothing: no copy.
        """
        os.makedirs(ROOT_BIND, exist_ok=True)
        self.sys.mount("/", ROOT_BIND, "", MS_BIND)
        os.chdir(ROOT_BIND)
        self.sys.mount(".", "/", "", MS_MOVE)
        self.sys.chroot(".")
        os.chdir("/")

    def mount_all(self, mounts) -> None:
        for source, target, fstype, flags, data in mounts:
            os.makedirs(target, exist_ok=True)
            try:
                self.sys.mount(source, target, fstype, flags, data)
            except OSError as exc:
                log(f"{exc}")

    def module_paths(self) -> list[str]:
        try:
            with open(MODULE_LIST) as f:
                return [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except FileNotFoundError:
            return []

    def load_modules(self, paths: list[str]) -> None:
        for path in paths:
            try:
                self.sys.load_module(path)
            except OSError as exc:
                log(f"{exc}")
            if path.endswith("/virtio_balloon.ko"):
                self.lower_reporting_order()

    def lower_reporting_order(self, param: str = REPORTING_ORDER) -> None:
        try:
            with open(param, "w") as f:
                f.write(REPORTING_ORDER_VALUE)
        except OSError as exc:
            log(f"page reporting order: {exc}")
            return
        # The driver's first pass ran at the old order and found nothing; a
        # new one starts when a block of the new order is freed. Touching and
        # freeing a few MiB frees such blocks now (the boot already freed the
        # initramfs image and init memory, which would otherwise stay put).
        scratch = bytearray(2 << 20)
        scratch[::4096] = b"\1" * (len(scratch) // 4096)
        del scratch

    def loopback_up(self) -> None:
        """`ip link set lo up`: the kernel then gives it 127.0.0.1 and ::1."""
        import fcntl
        import socket
        import struct

        SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))

    def power_off(self) -> None:
        """End the VM. QEMU runs with -no-reboot, so a reboot is the fastest clean exit."""
        self.sys.sync()
        self.sys.reboot(RB_AUTOBOOT)
