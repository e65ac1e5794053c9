"""A small ELF64 reader: just what the image builder needs.

The builder must know which shared libraries the guest's Python and its
extension modules load (DT_NEEDED), which modules a kernel module depends on
(the ``depends=`` entry of ``.modinfo``), and whether a vmlinux can be booted
through PVH (a Xen ELF note of type 18). binutils is not guaranteed on the
host, and these three questions need only a few hundred bytes of parsing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
SHT_NOTE = 7
SHT_DYNAMIC = 6
PT_NOTE = 4
DT_NULL = 0
DT_NEEDED = 1
# XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit entry point QEMU uses to boot a
# vmlinux through PVH without a bzImage real-mode stub.
XEN_ELFNOTE_PHYS32_ENTRY = 18


class ELFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    offset: int
    size: int
    link: int


class ELFFile:
    """Read-only view of a little-endian ELF64 file held in memory."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 64 or data[:4] != ELF_MAGIC:
            raise ELFFormatError("not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise ELFFormatError("only little-endian ELF64 is supported")
        self.data = data
        (self.e_type, self.e_machine, _ver, self.e_entry, self.e_phoff,
         self.e_shoff, _flags, _ehsize, self.e_phentsize, self.e_phnum,
         self.e_shentsize, self.e_shnum, self.e_shstrndx) = struct.unpack_from(
            "<HHIQQQIHHHHHH", data, 16)
        self._sections: list[Section] | None = None

    @classmethod
    def open(cls, path: Path | str) -> "ELFFile":
        return cls(Path(path).read_bytes())

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ELFFormatError("truncated ELF file")

    @property
    def sections(self) -> list[Section]:
        if self._sections is None:
            raw = []
            for i in range(self.e_shnum if self.e_shoff else 0):
                off = self.e_shoff + i * self.e_shentsize
                self._check(off, 64)
                (name, typ, _flags, _addr, offset, size, link, _info, _align,
                 _entsize) = struct.unpack_from("<IIQQQQIIQQ", self.data, off)
                raw.append((name, typ, offset, size, link))
            names = b""
            if raw and self.e_shstrndx < len(raw):
                _, _, soff, ssize, _ = raw[self.e_shstrndx]
                self._check(soff, ssize)
                names = self.data[soff:soff + ssize]
            self._sections = [
                Section(_cstr(names, n), t, o, s, l) for n, t, o, s, l in raw]
        return self._sections

    def section(self, name: str) -> Section | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def section_data(self, sec: Section) -> bytes:
        self._check(sec.offset, sec.size)
        return self.data[sec.offset:sec.offset + sec.size]

    def needed(self) -> list[str]:
        """DT_NEEDED sonames, in the order the dynamic section lists them."""
        out: list[str] = []
        for sec in self.sections:
            if sec.type != SHT_DYNAMIC:
                continue
            dyn = self.section_data(sec)
            strtab = self.section_data(self.sections[sec.link])
            for off in range(0, len(dyn) - 15, 16):
                tag, val = struct.unpack_from("<qQ", dyn, off)
                if tag == DT_NULL:
                    break
                if tag == DT_NEEDED:
                    out.append(_cstr(strtab, val))
        return out

    def notes(self) -> list[tuple[str, int, bytes]]:
        """(owner, type, descriptor) of every note, from program headers
        (what a loader sees) or, failing that, note sections."""
        blobs = []
        for i in range(self.e_phnum if self.e_phoff else 0):
            off = self.e_phoff + i * self.e_phentsize
            self._check(off, 56)
            p_type, _f, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                "<IIQQQQ", self.data, off)
            if p_type == PT_NOTE:
                self._check(p_offset, p_filesz)
                blobs.append(self.data[p_offset:p_offset + p_filesz])
        if not blobs:
            blobs = [self.section_data(s) for s in self.sections if s.type == SHT_NOTE]
        out = []
        for blob in blobs:
            pos = 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
                pos += 12
                name = blob[pos:pos + namesz].rstrip(b"\0").decode("ascii", "replace")
                pos += _align4(namesz)
                desc = blob[pos:pos + descsz]
                pos += _align4(descsz)
                out.append((name, ntype, desc))
        return out

    def has_pvh_entry(self) -> bool:
        return any(name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY
                   for name, ntype, _ in self.notes())

    def modinfo(self) -> dict[str, list[str]]:
        """Key -> values of a kernel module's ``.modinfo`` section."""
        sec = self.section(".modinfo")
        info: dict[str, list[str]] = {}
        if sec is None:
            return info
        for item in self.section_data(sec).split(b"\0"):
            if b"=" in item:
                key, _, value = item.decode("utf-8", "replace").partition("=")
                info.setdefault(key, []).append(value)
        return info


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _cstr(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    if end < 0:
        end = len(table)
    return table[offset:end].decode("utf-8", "replace")


def needed(path: Path | str) -> list[str]:
    return ELFFile.open(path).needed()


def is_elf(path: Path | str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ELF_MAGIC
