"""The host side of a VM's share (virtio-fs or 9p), filled with bind mounts.

One directory per VM is exported: by its virtiofsd (kata_py/vmm/virtiofsd.py),
or by QEMU itself over 9p. The process that owns the VM (an OCI
sandbox's owner, a pool standby) fills it, in a
mount namespace of its own (a slave of the host's: host mounts still reach
it, nothing it mounts reaches the host), with bind mounts: a rootfs, bind
sources (directories or single files), read-only binds remounted read-only
here, so QEMU itself cannot write them. The export is thereby confined to
exactly those paths, and the binds vanish with the namespace when the owner
and QEMU exit, however they exit: a killed owner leaks no mount. What
remains in the host's view is a directory of empty mount points, which
`remove_share_dir` deletes without ever descending into anything mounted.

The directory is itself a shared mount point (a bind onto itself) in that
namespace: virtiofsd serves it from a mount namespace of its own, copied
from this one when it starts, and binds added or removed here afterwards
(a container created in a running sandbox, or in a pooled VM) reach that copy
only by propagation.

An OCI container's export holds one container (kata_py/sandbox/single.py);
an API sandbox's holds one entry per container (`c<N>`, mount tag `TAG`), and
each container's init pivots into its own entry, so a container never sees
another's files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .. import hostsys, paths
from ..errors import KataError

TAG = "sandbox"     # the mount tag of an API sandbox's share


class ShareError(KataError):
    pass


def enter_private_mount_namespace() -> None:
    """Give this (single-threaded) process a mount namespace of its own:
    host mount events still reach it, nothing it mounts reaches the host."""
    hostsys.unshare(hostsys.CLONE_NEWNS)
    hostsys.mount("", "/", "", hostsys.MS_REC | hostsys.MS_SLAVE)


class ContainerShare:
    def __init__(self, path: Path, existing: bool = False) -> None:
        """A new share directory at `path`; `existing`: one a pooled VM's
        standby made, whose entries are added to."""
        path = Path(path)
        if not existing:
            paths.ensure_private_dir(path.parent)
            remove_share_dir(path)  # a leftover of an earlier owner of this path
            path.mkdir(mode=0o700)
            try:
                hostsys.mount(str(path), str(path), "", hostsys.MS_BIND)
                hostsys.mount("", str(path), "", hostsys.MS_SHARED)
            except OSError as exc:
                remove_share_dir(path)
                raise ShareError(f"share directory {path}: {exc.strerror}") from exc
        self.path = path
        self.count = 0

    def add(self, source: str, readonly: bool = False, recursive: bool = True, name: str | None = None,
            exist_ok: bool = False) -> str:
        """Bind `source` (a directory or a regular file) into the share; return
        its entry name (`name`, else the next `m<N>`). `exist_ok`: the entry's
        directory may already be there (made with the share)."""
        if name is None:
            name = f"m{self.count}"
            self.count += 1
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise ShareError(f"mount source {source}: {exc.strerror}") from exc
        target = self.path / name
        if stat.S_ISDIR(mode):
            made = not (exist_ok and target.is_dir())
            target.mkdir(mode=0o700, exist_ok=exist_ok)
        elif stat.S_ISREG(mode):
            made = not target.exists()
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
            if made:
                _remove_entry(target)
            raise ShareError(f"sharing {source}: {exc.strerror}") from exc
        return name

    def remove(self, name: str) -> None:
        """Undo one entry (absent: nothing to do)."""
        _remove_entry(self.path / name)

    def close(self) -> None:
        """Undo every entry and remove the directory."""
        remove_share_dir(self.path)


def _kept_flags(path: str) -> int:
    return os.statvfs(path).f_flag & (hostsys.MS_NOSUID | hostsys.MS_NODEV | hostsys.MS_NOEXEC)


def _remove_entry(path: Path) -> None:
    """Detach what is mounted on `path`, then unlink it (an empty directory
    or a file); never a recursive delete."""
    try:
        hostsys.umount(str(path), hostsys.MNT_DETACH | hostsys.UMOUNT_NOFOLLOW)
    except OSError:
        pass  # not mounted here: the usual case outside the owner's namespace
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass  # gone, or not empty: something still mounted; leave it rather than delete through it


def remove_share_dir(path: Path) -> None:
    """Remove a share directory from any mount namespace: detach what is
    mounted on its entries, then unlink them one by one (never a recursive
    delete, which could walk into a still-mounted rootfs)."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        _remove_entry(Path(entry.path))
    try:
        hostsys.umount(str(path), hostsys.MNT_DETACH | hostsys.UMOUNT_NOFOLLOW)
    except OSError:
        pass  # not a mount point in this namespace
    try:
        os.rmdir(path)
    except OSError:
        pass
