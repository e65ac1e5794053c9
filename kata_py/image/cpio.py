"""newc ("070701") cpio archives, the format the kernel unpacks as an initramfs.

Written here rather than by cpio(1) so the archive is byte-for-byte
reproducible: every entry is owned by root, has mtime 0, and entries are
sorted by path, so a parent directory always precedes what it contains.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass
class Entry:
    """One archive member. ``path`` is relative ("usr/bin/x"), without a leading slash."""

    path: str
    mode: int                      # full st_mode: type bits + permissions
    data: bytes = b""              # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes
    nlink: int = field(default=0)

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> "Entry":
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> "Entry":
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> "Entry":
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> "Entry":
        return cls(path, stat.S_IFCHR | perm, b"", (major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, name: bytes) -> bytes:
    nlink = e.nlink or (2 if stat.S_ISDIR(e.mode) else 1)
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0,
              e.rdev[0], e.rdev[1], len(name) + 1, 0)
    return MAGIC + b"".join(b"%08X" % v for v in fields)


def write(entries: Iterable[Entry], out: BinaryIO) -> int:
    """Write ``entries`` (sorted here) as a newc archive; returns bytes written."""
    seen: set[str] = set()
    ordered = []
    for e in entries:
        p = e.path.strip("/")
        if not p or p in seen:
            raise ValueError(f"empty or duplicate cpio path: {e.path!r}")
        seen.add(p)
        e.path = p
        ordered.append(e)
    ordered.sort(key=lambda e: e.path.encode())
    total = 0
    for ino, e in enumerate(ordered, start=1):
        total += _emit(out, _header(ino, e, e.path.encode()), e.path.encode(), e.data)
    total += _emit(out, _header(0, Entry(TRAILER, 0, nlink=1), TRAILER.encode()),
                   TRAILER.encode(), b"")
    # The kernel does not need block padding, but cpio(1) and friends expect it.
    tail = -total % 512
    out.write(b"\0" * tail)
    return total + tail


def _emit(out: BinaryIO, header: bytes, name: bytes, data: bytes) -> int:
    head = header + name + b"\0"
    head += _pad4(len(head))
    out.write(head)
    out.write(data)
    out.write(_pad4(len(data)))
    return len(head) + len(data) + len(_pad4(len(data)))


def read(data: bytes) -> list[Entry]:
    """Parse a newc archive (used by tests and to derive initrd variants)."""
    pos = 0
    entries = []
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, nlink, filesize, rmaj, rmin, namesize = f[1], f[4], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, body, (rmaj, rmin), nlink))


def entries_from_tree(root: Path) -> list[Entry]:
    """Archive entries for every file, directory and symlink under ``root``.

    Only the permission bits of each file are kept; owners and times are not.
    """
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        st = p.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out.append(Entry.symlink(rel, str(p.readlink())))
        elif stat.S_ISDIR(st.st_mode):
            out.append(Entry.directory(rel, perm))
        elif stat.S_ISREG(st.st_mode):
            out.append(Entry.file(rel, p.read_bytes(), perm))
        else:
            raise ValueError(f"cannot archive {p}: not a file, directory or symlink")
    return out
