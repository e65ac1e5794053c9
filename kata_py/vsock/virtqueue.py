"""Split virtqueues (virtio 1.2 §2.7) as the device side sees them.

The guest driver owns the descriptor table and the available ring; anything read from
them is untrusted. Chains are walked with a hard cap on length, loop detection and
bounds-checked translation; a bad chain is reported as ChainError (the caller hands the
head back with zero length and goes on), a ring whose indices make no sense is reported
as RingError (the caller stops serving that queue until QEMU restarts it).

Ordering: x86 keeps stores in program order and loads in program order, so reading the
avail index before the entries it publishes, and writing used entries before the used
index, needs no explicit fences on the hosts this runs on.

Atomicity: the driver runs concurrently in another process (a vCPU), so the 16-bit ring
indices and flags must be read and written with one 16-bit load or store. struct's
little-endian ("<H") packers go byte by byte; a driver reading the used index while it
moves from 0x00FF to 0x0100 could then see 0x0000 and take 65281 stale entries as new
(Linux marks the queue broken: "id N is not a head"), and we could see a torn avail
index and stop the ring. Those fields therefore go through native "H" memoryviews,
whose item get/set is a single aligned 16-bit access.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field

from .memory import GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
# No vsock packet needs more; Linux sends at most 64 KiB of payload per packet.
DEFAULT_MAX_CHAIN_BYTES = 1 << 20

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_LITTLE_ENDIAN = sys.byteorder == "little"


def _le16(value: int) -> int:
    """A ring's little-endian u16 as a native "H" item holds it, and back."""
    return value if _LITTLE_ENDIAN else ((value >> 8) | (value << 8)) & 0xFFFF


class VirtqueueError(Exception):
    pass


class ChainError(VirtqueueError):
    """One descriptor chain is malformed; `head` can be returned to the guest."""

    def __init__(self, message: str, head: int) -> None:
        super().__init__(message)
        self.head = head


class RingError(VirtqueueError):
    """The ring itself is unusable (bad layout or index); stop serving it."""


@dataclass(eq=False)
class Chain:
    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0

    def read(self, limit: int | None = None) -> bytes:
        """The device-readable bytes of the chain (at most `limit`), gathered."""
        if limit is None or limit >= self.readable_len:
            if len(self.readable) == 1:
                return bytes(self.readable[0])
            return b"".join(self.readable)
        out = []
        left = limit
        for seg in self.readable:
            if left <= 0:
                break
            out.append(seg[:left])
            left -= len(seg)
        return b"".join(out)

    def write(self, *parts) -> int:
        """Scatter `parts` into the device-writable descriptors, in order.

        Returns the number of bytes written; raises ChainError if they do not fit, so a
        caller sizes the data from writable_len first.
        """
        total = sum(len(p) for p in parts)
        if total > self.writable_len:
            raise ChainError(f"{total} bytes do not fit in {self.writable_len}", self.head)
        segs = iter(self.writable)
        seg = None
        seg_pos = 0
        for p in parts:
            src = memoryview(p).cast("B") if not isinstance(p, memoryview) else p
            pos = 0
            while pos < len(src):
                if seg is None or seg_pos == len(seg):
                    seg = next(segs)
                    seg_pos = 0
                n = min(len(src) - pos, len(seg) - seg_pos)
                seg[seg_pos:seg_pos + n] = src[pos:pos + n]
                pos += n
                seg_pos += n
        return total

    def release(self) -> None:
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable = []
        self.writable = []


class VirtQueue:
    """One split virtqueue in shared guest memory.

    `desc_addr`, `avail_addr` and `used_addr` are QEMU user addresses (what
    SET_VRING_ADDR carries) unless `gpa=True`.
    """

    def __init__(self, mem: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, last_avail_idx: int = 0, gpa: bool = False,
                 max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES) -> None:
        if not (1 <= size <= MAX_QUEUE_SIZE) or size & (size - 1):
            raise RingError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise RingError("misaligned ring addresses")
        self.size = size
        self.mem = mem
        self.max_chain_bytes = max_chain_bytes
        try:
            get = (mem.gpa_view if gpa else mem.uva_to_view)
            self._desc = get(desc_addr, 16 * size)
            self._avail = get(avail_addr, 6 + 2 * size)
            self._used = get(used_addr, 6 + 8 * size)
        except GuestMemoryError as e:
            raise RingError(f"ring outside guest memory: {e}") from None
        # Word views for the fields the driver changes under us: item 0 is flags, item 1
        # the index, items 2.. the avail ring entries (see Atomicity above).
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self._shadow_avail = self.last_avail_idx
        # Continue from what the ring already shows, so a restarted queue does not
        # rewind the driver's view of completed buffers.
        self.used_idx = _le16(self._used16[1])
        self._pending_used = 0
        self._unsignalled = False

    # -- available side ----------------------------------------------------

    def _avail_idx(self) -> int:
        idx = _le16(self._avail16[1])
        if (idx - self.last_avail_idx) & 0xFFFF > self.size:
            raise RingError(
                f"avail index {idx} is more than {self.size} ahead of {self.last_avail_idx}")
        return idx

    def has_available(self) -> bool:
        if self._shadow_avail != self.last_avail_idx:
            return True
        self._shadow_avail = self._avail_idx()
        return self._shadow_avail != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ChainError / RingError."""
        if not self.has_available():
            return None
        slot = self.last_avail_idx % self.size
        head = _le16(self._avail16[2 + slot])
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.size:
            # Not a valid id, so it cannot even be handed back.
            raise RingError(f"avail ring names descriptor {head} of {self.size}")
        return self._walk(head)

    def unpop(self) -> None:
        """Give back the chain pop() just returned, untouched."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        seen = bytearray(self.size)
        idx = head
        count = 0
        total = 0
        mem = self.mem
        desc = self._desc
        while True:
            if idx >= self.size:
                raise ChainError(f"descriptor index {idx} out of range", head)
            if seen[idx]:
                raise ChainError(f"descriptor chain loops at {idx}", head)
            seen[idx] = 1
            count += 1
            if count > self.size:
                raise ChainError("descriptor chain longer than the queue", head)
            addr, length, flags, nxt = _DESC.unpack_from(desc, 16 * idx)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise ChainError("indirect descriptor, not negotiated", head)
            total += length
            if total > self.max_chain_bytes:
                raise ChainError(f"chain exceeds {self.max_chain_bytes} bytes", head)
            if length:
                try:
                    views = mem.gpa_views(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(str(e), head) from None
                if flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.extend(views)
                    chain.writable_len += length
                else:
                    if chain.writable:
                        raise ChainError("readable descriptor after a writable one", head)
                    chain.readable.extend(views)
                    chain.readable_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            idx = nxt

    # -- used side ---------------------------------------------------------

    def push_used(self, head: int, length: int) -> None:
        """Queue a completed chain; the index is published by flush_used()."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range")
        slot = (self.used_idx + self._pending_used) % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, length & 0xFFFFFFFF)
        self._pending_used += 1
        if self._pending_used >= self.size:
            self.flush_used()

    def flush_used(self) -> bool:
        """Publish queued used entries; True if there were any."""
        if not self._pending_used:
            return False
        self.used_idx = (self.used_idx + self._pending_used) & 0xFFFF
        self._pending_used = 0
        self._used16[1] = _le16(self.used_idx)
        self._unsignalled = True
        return True

    def should_signal(self) -> bool:
        """After flush_used(): does the driver want an interrupt for this batch?"""
        if not self._unsignalled:
            return False
        self._unsignalled = False
        flags = _le16(self._avail16[0])
        return not flags & VRING_AVAIL_F_NO_INTERRUPT

    def set_no_notify(self, on: bool) -> None:
        """Ask the driver not to kick while we are draining the ring anyway."""
        self._used16[0] = _le16(VRING_USED_F_NO_NOTIFY if on else 0)

    def release(self) -> None:
        for v in (self._avail16, self._used16, self._desc, self._avail, self._used):
            v.release()


def signal_eventfd(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (1).to_bytes(8, "little"))
    except BlockingIOError:
        pass  # counter saturated: the guest has an interrupt pending anyway


def drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass
