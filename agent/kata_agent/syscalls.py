"""The few Linux system calls the agent needs that `os` does not offer.

Kept behind one small class so PID-1 logic can be unit tested on the host
with a recording fake in its place.
"""

from __future__ import annotations

import ctypes
import os

# The mount flags that OCI options stand for come from the protocol's table
# (shared with the host); MS_MOVE is the agent's own: no OCI option means it.
from kata_py.protocol.oci_names import (MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE,  # noqa: F401
                                        MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, MS_SHARED, MS_SLAVE,
                                        MS_UNBINDABLE)

SYS_FINIT_MODULE = 313  # x86_64
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC
EEXIST = 17

MS_MOVE = 0x2000
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
SYS_OPENAT2 = 437     # x86_64 (and every architecture since 5.6)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Syscalls:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, ret: int, what: str) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        self._check(self._libc.mount(source.encode(), target.encode(), fstype.encode(),
                                     ctypes.c_ulong(flags), data.encode() or None),
                    f"mount {fstype} on {target}")

    def umount(self, target: str, flags: int = 0) -> None:
        self._check(self._libc.umount2(target.encode(), flags), f"umount {target}")

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(flags), "unshare")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self._libc.setns(fd, nstype), "setns")

    def chroot(self, path: str) -> None:
        self._check(self._libc.chroot(path.encode()), f"chroot {path}")

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.sethostname(raw, len(raw)), "sethostname")

    def setdomainname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.setdomainname(raw, len(raw)), "setdomainname")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._check(self._libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")

    def openat2(self, dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
        """openat2(2): open `path` relative to `dir_fd` with RESOLVE_* rules."""
        how = _OpenHow(flags, mode, resolve)
        ret = self._libc.syscall(SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how),
                                 ctypes.c_size_t(ctypes.sizeof(how)))
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return ret

    def load_module(self, path: str) -> bool:
        """finit_module(2); returns False when the module was already loaded."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ret = self._libc.syscall(SYS_FINIT_MODULE, fd, b"", 0)
            if ret < 0 and ctypes.get_errno() == EEXIST:
                return False
            self._check(ret, f"load module {path}")
            return True
        finally:
            os.close(fd)

    def reboot(self, how: int) -> None:
        self._check(self._libc.reboot(how), "reboot")

    def sync(self) -> None:
        self._libc.sync()
