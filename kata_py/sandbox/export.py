"""The sandbox's one 9p export, filled by its owner process.

QEMU exports one directory per sandbox (mount tag `sandbox`). The owner
binds each container's rootfs into it as an entry of its own (`c<N>`),
inside a mount namespace of its own (a slave of the host's: host mounts
still reach it, nothing it mounts reaches the host), so the binds vanish
with the owner and its QEMU however they end. Every container's guest-side
9p mount sees the whole export, but its init pivots into its own entry, so
a container never sees another's files.

This is the per-sandbox counterpart of kata_py/oci/share.py's per-container
ContainerShare (which also carries bind-mount sources and single files).
The sandbox layer may not import kata_py.oci; once that module moves down
here, the two become one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .. import hostsys
from ..errors import KataError

TAG = "sandbox"


class ExportError(KataError):
    pass


def enter_private_mount_namespace() -> None:
    """Give this (still single-threaded) process a mount namespace of its own."""
    hostsys.unshare(hostsys.CLONE_NEWNS)
    hostsys.mount("", "/", "", hostsys.MS_REC | hostsys.MS_SLAVE)


class Export:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(mode=0o700)
        self.entries: set[str] = set()

    def add_rootfs(self, entry: str, source: str, readonly: bool = False) -> None:
        """Bind the directory `source` (recursively) as `entry`."""
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise ExportError(f"rootfs {source}: {exc.strerror}") from exc
        if not stat.S_ISDIR(mode):
            raise ExportError(f"rootfs {source}: not a directory")
        target = self.path / entry
        target.mkdir(mode=0o700)
        self.entries.add(entry)
        try:
            hostsys.mount(source, str(target), "", hostsys.MS_BIND | hostsys.MS_REC)
            if readonly:
                kept = os.statvfs(target).f_flag & (hostsys.MS_NOSUID | hostsys.MS_NODEV | hostsys.MS_NOEXEC)
                hostsys.mount("", str(target), "", hostsys.MS_REMOUNT | hostsys.MS_BIND | hostsys.MS_RDONLY | kept)
        except OSError as exc:
            self.remove(entry)
            raise ExportError(f"sharing {source}: {exc.strerror}") from exc

    def remove(self, entry: str) -> None:
        self.entries.discard(entry)
        _remove_entry(self.path / entry)

    def close(self) -> None:
        remove_export_dir(self.path)
        self.entries.clear()


def _remove_entry(path: Path) -> None:
    try:
        hostsys.umount(str(path), hostsys.MNT_DETACH | hostsys.UMOUNT_NOFOLLOW)
    except OSError:
        pass  # not mounted (here): the usual case outside the owner's namespace
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # not empty: something is still mounted; never delete through it


def remove_export_dir(path: Path) -> None:
    """From any mount namespace: detach each entry, then rmdir it (never a
    recursive delete, which could walk into a rootfs still mounted)."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        _remove_entry(Path(entry.path))
    try:
        os.rmdir(path)
    except OSError:
        pass
