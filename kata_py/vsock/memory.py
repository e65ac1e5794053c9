"""Guest memory as QEMU shares it with a vhost-user back end.

SET_MEM_TABLE hands over one fd per region together with the region's guest-physical
base, its address inside QEMU's own process and the offset of the region in the fd.
Descriptors carry guest-physical addresses; the vring addresses of SET_VRING_ADDR are
QEMU's process addresses. Both are translated here, and every access is checked
against the region bounds so a hostile guest cannot steer us outside the mappings.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

MAX_REGIONS = 8


class GuestMemoryError(Exception):
    """An address or length the guest (or QEMU) gave us does not lie in mapped memory."""


@dataclass(eq=False)
class Region:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    _map: mmap.mmap | None = field(default=None, repr=False)
    _view: memoryview | None = field(default=None, repr=False)

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise GuestMemoryError("guest memory region was unmapped")
        return self._view

    def close(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            view.release()
        mm, self._map = self._map, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # A slice still exported elsewhere keeps the mapping alive; the
                # mapping goes away when that last slice is garbage collected.
                pass


class GuestMemory:
    """The set of regions from one SET_MEM_TABLE, addressed by GPA or by QEMU VA."""

    def __init__(self, regions: list[Region]) -> None:
        if len(regions) > MAX_REGIONS:
            raise GuestMemoryError(f"{len(regions)} memory regions (max {MAX_REGIONS})")
        for r in regions:
            if r.size <= 0 or r.guest_addr < 0 or r.user_addr < 0:
                raise GuestMemoryError(f"bad region {r!r}")
            if r.guest_addr + r.size > 1 << 64 or r.user_addr + r.size > 1 << 64:
                raise GuestMemoryError(f"region wraps the address space: {r!r}")
        self.regions = list(regions)
        self._by_gpa = sorted(self.regions, key=lambda r: r.guest_addr)
        # Overlapping regions would give one guest address two meanings, and which
        # one a descriptor reached would depend on the table's order.
        for lower, upper in zip(self._by_gpa, self._by_gpa[1:]):
            if lower.guest_addr + lower.size > upper.guest_addr:
                raise GuestMemoryError(f"regions overlap in guest memory: {lower!r} and {upper!r}")

    @classmethod
    def from_buffer(cls, buf, guest_addr: int = 0, user_addr: int | None = None) -> "GuestMemory":
        """One region over a writable buffer: fake guest memory for tests and tools."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise GuestMemoryError("guest memory buffer must be writable")
        r = Region(guest_addr, len(view), guest_addr if user_addr is None else user_addr, 0)
        r._view = view
        return cls([r])

    @classmethod
    def from_fds(cls, descs: list[tuple[int, int, int, int]], fds: list[int]) -> "GuestMemory":
        """Map (guest_addr, size, user_addr, mmap_offset) regions from their fds.

        The fds are not closed here: the caller owns them and may close them once this
        returns, since the mappings stay valid without the descriptor.
        """
        if len(descs) != len(fds):
            raise GuestMemoryError(f"{len(descs)} regions but {len(fds)} fds")
        regions: list[Region] = []
        try:
            for (gpa, size, uva, off), fd in zip(descs, fds):
                if size <= 0 or off < 0:
                    raise GuestMemoryError(f"bad region size {size} / offset {off}")
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise GuestMemoryError(f"region fd unusable: {e}") from None
                # Touching a page past the end of the file would SIGBUS the whole
                # backend, so the file must cover the region before we map it.
                if st.st_size and st.st_size < off + size:
                    raise GuestMemoryError(
                        f"region fd holds {st.st_size} bytes, region needs {off + size}")
                # Mapping from offset 0 avoids mmap's page-alignment rule on offset.
                try:
                    mm = mmap.mmap(fd, off + size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError, OverflowError) as e:
                    raise GuestMemoryError(f"cannot map region: {e}") from None
                r = Region(gpa, size, uva, off, mm)
                r._view = memoryview(mm)[off:off + size]
                regions.append(r)
            return cls(regions)
        except BaseException:
            for r in regions:
                r.close()
            raise

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []
        self._by_gpa = []

    # -- translation -------------------------------------------------------

    def _find_gpa(self, addr: int) -> tuple[Region, int]:
        for r in self._by_gpa:
            if r.guest_addr <= addr < r.guest_addr + r.size:
                return r, addr - r.guest_addr
        raise GuestMemoryError(f"guest address {addr:#x} is not in guest memory")

    def uva_to_view(self, addr: int, length: int) -> memoryview:
        """A view of `length` bytes at QEMU virtual address `addr`, inside one region."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for r in self.regions:
            if r.user_addr <= addr < r.user_addr + r.size:
                off = addr - r.user_addr
                if off + length > r.size:
                    raise GuestMemoryError(
                        f"QEMU address range {addr:#x}+{length:#x} crosses a region end")
                return r.view[off:off + length]
        raise GuestMemoryError(f"QEMU address {addr:#x} is not in guest memory")

    def uva_to_gpa(self, addr: int) -> int:
        for r in self.regions:
            if r.user_addr <= addr < r.user_addr + r.size:
                return r.guest_addr + (addr - r.user_addr)
        raise GuestMemoryError(f"QEMU address {addr:#x} is not in guest memory")

    def gpa_views(self, addr: int, length: int) -> list[memoryview]:
        """Views covering [addr, addr+length); a range may span adjacent regions."""
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"bad guest range {addr:#x}+{length:#x}")
        if addr + length > 1 << 64:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} wraps")
        out: list[memoryview] = []
        while length > 0:
            r, off = self._find_gpa(addr)
            n = min(length, r.size - off)
            out.append(r.view[off:off + n])
            addr += n
            length -= n
        return out

    def gpa_view(self, addr: int, length: int) -> memoryview:
        """A single contiguous view; for ring structures that must not span regions."""
        r, off = self._find_gpa(addr)
        if length < 0 or off + length > r.size:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} crosses a region end")
        return r.view[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.gpa_views(addr, length))

    def write(self, addr: int, data) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.gpa_views(addr, len(src)):
            v[:] = src[pos:pos + len(v)]
            pos += len(v)
