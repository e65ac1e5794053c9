"""A container's files, read and written as the container sees them.

The container's view is its init's: its root after pivot_root and the
mounts of its mount namespace (a tmpfs on /tmp, /dev/shm, ...). The agent
cannot enter that mount namespace (setns(CLONE_NEWNS) is refused to a
process with threads), but /proc/<init>/root is a handle on exactly that
root, and a path walk from it crosses that namespace's mounts. Every path
is resolved with openat2(RESOLVE_IN_ROOT): `..` and absolute symlinks stop
at the container's root, so a symlink the container planted cannot aim a
read or write at the guest's own files. Only regular files are read or
written (a FIFO or device could block or misbehave), in chunks a frame can
carry; the host strings the chunks together.
"""

from __future__ import annotations

import os
import stat

from .processes import ProcessError
from .syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS

MAX_CHUNK = 512 * 1024
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
O_PATH = getattr(os, "O_PATH", 0o10000000)


def check_path(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise ProcessError("invalid", f"{path[:200]!r} is not an absolute path")
    return path


def open_root(pid: int) -> int:
    """An O_PATH handle on a process's root directory, in its mount namespace."""
    try:
        return os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProcessError("state", f"the container's init process is gone: {exc.strerror}") from None


def _failed(path: str, exc: OSError) -> ProcessError:
    code = "not_found" if isinstance(exc, FileNotFoundError) else "failed"
    return ProcessError(code, f"{path[:1024]}: {exc.strerror or exc}")


def _open(sys_, root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    return sys_.openat2(root_fd, path, flags | os.O_CLOEXEC, mode, RESOLVE)


def _regular(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ProcessError("invalid", f"{path[:1024]} is not a regular file")
    return st


def read_chunk(sys_, root_fd: int, path: str, offset: int, length: int) -> tuple[bytes, int, bool]:
    """(data, the file's size, whether the data reaches its end)."""
    check_path(path)
    try:
        fd = _open(sys_, root_fd, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise _failed(path, exc) from None
    try:
        st = _regular(fd, path)
        data = os.pread(fd, min(length, MAX_CHUNK), offset)
    except OSError as exc:
        raise _failed(path, exc) from None
    finally:
        os.close(fd)
    return data, st.st_size, offset + len(data) >= st.st_size


def _make_parents(sys_, root_fd: int, path: str, owner: tuple[int, int] | None) -> None:
    """mkdir -p of `path`'s directory, each step resolved inside the root."""
    parts = [p for p in os.path.dirname(path).split("/") if p]
    current = "/"
    for part in parts:
        below = current.rstrip("/") + "/" + part
        try:
            os.close(_open(sys_, root_fd, below, O_PATH | os.O_DIRECTORY))
        except FileNotFoundError:
            parent = _open(sys_, root_fd, current, O_PATH | os.O_DIRECTORY)
            try:
                # mkdirat never follows a final symlink: a planted one makes EEXIST.
                os.mkdir(part, 0o755, dir_fd=parent)
                if owner is not None:
                    os.chown(part, *owner, dir_fd=parent, follow_symlinks=False)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
        current = below


def write_chunk(sys_, root_fd: int, path: str, data: bytes, offset: int = 0, truncate: bool = False,
                mode: int = 0o644, parents: bool = False, owner: tuple[int, int] | None = None) -> None:
    """Write `data` at `offset` (creating the file with `mode`, owned by `owner`)."""
    check_path(path)
    if path.rstrip("/") == "" or path.endswith("/"):
        raise ProcessError("invalid", f"{path[:1024]!r} names a directory")
    try:
        if parents:
            _make_parents(sys_, root_fd, path, owner)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | (os.O_TRUNC if truncate else 0)
        fd = _open(sys_, root_fd, path, flags, mode)
    except OSError as exc:
        raise _failed(path, exc) from None
    try:
        st = _regular(fd, path)
        if owner is not None and st.st_uid == 0 and st.st_gid == 0 and owner != (0, 0):
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        raise _failed(path, exc) from None
    finally:
        os.close(fd)
