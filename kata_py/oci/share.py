"""The host side of a container's one 9p share.

QEMU exports one directory per container. The monitor fills it, in a mount
namespace of its own, with bind mounts: the bundle's rootfs as `rootfs` and
each bind-mount source of the spec as `m<N>` (a directory or a single file),
read-only binds remounted read-only here, so QEMU itself cannot write them.
The export is thereby confined to exactly those paths, and the binds vanish
with the namespace when the monitor and QEMU exit, however they exit: a
killed monitor leaks no mount. What remains in the host's view is a directory
of empty mount points, which `remove_share_dir` deletes without ever
descending into anything mounted.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .. import hostsys, paths
from ..errors import KataError

ROOTFS_ENTRY = "rootfs"


class ShareError(KataError):
    pass


def _digest(root: str, container_id: str) -> str:
    return hashlib.sha256(f"{os.path.abspath(root)}\0{container_id}".encode()).hexdigest()[:20]


def share_dir_for(root: str, container_id: str) -> Path:
    """Where a container's share lives: fixed by (state root, id), so that
    `delete` finds it even when the monitor died before reporting."""
    return paths.run_dir() / f"share-{_digest(root, container_id)}"


def sandbox_dir_for(root: str, container_id: str) -> Path:
    """The run directory of a container's VM (sockets, logs; its host cgroups
    take its name), fixed the same way and for the same reason: a monitor
    killed while it boots has not reported it yet."""
    return paths.run_dir() / f"vm-{_digest(root, container_id)}"


def enter_private_mount_namespace() -> None:
    """Give this (single-threaded) process a mount namespace of its own:
    host mount events still reach it, nothing it mounts reaches the host."""
    hostsys.unshare(hostsys.CLONE_NEWNS)
    hostsys.mount("", "/", "", hostsys.MS_REC | hostsys.MS_SLAVE)


class ContainerShare:
    def __init__(self, path: Path, existing: bool = False) -> None:
        """A new share directory at `path`; `existing`: one a pooled VM's
        standby made, whose entries are added to."""
        if not existing:
            paths.ensure_private_dir(path.parent)
            remove_share_dir(path)  # a leftover of an earlier container with this id
            path.mkdir(mode=0o700)
        self.path = path
        self.count = 0

    def add(self, source: str, readonly: bool = False, recursive: bool = True, name: str | None = None) -> str:
        """Bind `source` (a directory or a regular file) into the share; return its entry name."""
        if name is None:
            name = f"m{self.count}"
            self.count += 1
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise ShareError(f"mount source {source}: {exc.strerror}") from None
        target = self.path / name
        if stat.S_ISDIR(mode):
            target.mkdir(mode=0o700, exist_ok=name == ROOTFS_ENTRY)
        elif stat.S_ISREG(mode):
            target.touch(mode=0o600)
        else:
            raise ShareError(f"mount source {source}: only directories and regular files can be shared into a VM")
        flags = hostsys.MS_BIND | (hostsys.MS_REC if recursive else 0)
        try:
            hostsys.mount(source, str(target), "", flags)
            if readonly:
                hostsys.mount("", str(target), "", hostsys.MS_REMOUNT | hostsys.MS_BIND | hostsys.MS_RDONLY
                              | _kept_flags(str(target)))
        except OSError as exc:
            raise ShareError(f"sharing {source}: {exc.strerror}") from None
        return name


def _kept_flags(path: str) -> int:
    return os.statvfs(path).f_flag & (hostsys.MS_NOSUID | hostsys.MS_NODEV | hostsys.MS_NOEXEC)


def remove_share_dir(path: Path) -> None:
    """Remove a share directory from any mount namespace: detach what is
    mounted on its entries, then unlink them one by one (never a recursive
    delete, which could walk into a still-mounted rootfs)."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            hostsys.umount(entry.path, hostsys.MNT_DETACH | hostsys.UMOUNT_NOFOLLOW)
        except OSError:
            pass  # not mounted here: the usual case outside the monitor's namespace
        try:
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass  # not empty: something still mounted; leave it rather than delete through it
    try:
        os.rmdir(path)
    except OSError:
        pass
