"""Split virtqueue and guest memory handling against a fake guest memory buffer."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kata_py.vsock.memory import GuestMemory, GuestMemoryError
from kata_py.vsock.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                     VIRTQ_DESC_F_WRITE, VRING_AVAIL_F_NO_INTERRUPT,
                                     ChainError, RingError, VirtQueue)

GPA = 0x100000          # guest-physical base of the fake memory
UVA = 0x7F0000000000    # where "QEMU" has it mapped
MEM = 1 << 20
QSIZE = 8
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000
DATA = 0x10000


class Ring:
    """The driver's side of one split virtqueue, laid into a bytearray."""

    def __init__(self, size: int = QSIZE) -> None:
        self.buf = bytearray(MEM)
        self.mem = GuestMemory.from_buffer(self.buf, guest_addr=GPA, user_addr=UVA)
        self.size = size
        self.avail_idx = 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.buf, DESC + 16 * i, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.buf, AVAIL + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, AVAIL + 2, self.avail_idx)

    def queue(self, **kw) -> VirtQueue:
        return VirtQueue(self.mem, self.size, UVA + DESC, UVA + AVAIL, UVA + USED, **kw)

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack_from("<H", self.buf, USED + 2)[0]
        elems = [struct.unpack_from("<II", self.buf, USED + 4 + 8 * i) for i in range(idx)]
        return idx, elems


def test_readable_then_writable_chain_round_trip():
    r = Ring()
    r.buf[DATA:DATA + 5] = b"hello"
    r.desc(0, GPA + DATA, 3, VIRTQ_DESC_F_NEXT, 1)
    r.desc(1, GPA + DATA + 3, 2, VIRTQ_DESC_F_NEXT, 2)
    r.desc(2, GPA + DATA + 0x100, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3)
    r.desc(3, GPA + DATA + 0x200, 6, VIRTQ_DESC_F_WRITE)
    r.publish(0)
    q = r.queue()
    chain = q.pop()
    assert chain.head == 0
    assert chain.read() == b"hello" and chain.read(4) == b"hell"
    assert (chain.readable_len, chain.writable_len) == (5, 10)
    assert chain.write(b"abc", b"defghij") == 10
    assert bytes(r.buf[DATA + 0x100:DATA + 0x104]) == b"abcd"
    assert bytes(r.buf[DATA + 0x200:DATA + 0x206]) == b"efghij"
    with pytest.raises(ChainError):
        chain.write(b"x" * 11)
    assert q.pop() is None
    q.push_used(0, 10)
    assert r.used() == (0, [])          # batched until flush
    assert q.flush_used()
    assert r.used() == (1, [(0, 10)])
    assert q.should_signal() and not q.should_signal()


def test_no_interrupt_flag_is_honoured():
    r = Ring()
    r.desc(0, GPA + DATA, 8, VIRTQ_DESC_F_WRITE)
    r.publish(0)
    struct.pack_into("<H", r.buf, AVAIL, VRING_AVAIL_F_NO_INTERRUPT)
    q = r.queue()
    q.push_used(q.pop().head, 0)
    assert q.flush_used()
    assert not q.should_signal()


@pytest.mark.parametrize("setup, message", [
    (lambda r: r.desc(0, GPA + MEM - 4, 8), "not in guest memory"),
    (lambda r: r.desc(0, 0x10, 8), "not in guest memory"),
    (lambda r: r.desc(0, GPA + DATA, 0xFFFFFFFF), "exceeds"),
    (lambda r: (r.desc(0, GPA + DATA, 8, VIRTQ_DESC_F_NEXT, 1),
                r.desc(1, GPA + DATA, 8, VIRTQ_DESC_F_NEXT, 0)), "loops"),
    (lambda r: r.desc(0, GPA + DATA, 8, VIRTQ_DESC_F_NEXT, 200), "out of range"),
    (lambda r: r.desc(0, GPA + DATA, 8, VIRTQ_DESC_F_INDIRECT), "indirect"),
    (lambda r: (r.desc(0, GPA + DATA, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                r.desc(1, GPA + DATA, 8, 0)), "readable descriptor after"),
    (lambda r: r.desc(0, (1 << 64) - 4, 8), "wraps|not in guest"),
])
def test_malformed_chains_are_rejected(setup, message):
    r = Ring()
    setup(r)
    r.publish(0)
    q = r.queue()
    with pytest.raises(ChainError, match=message) as ei:
        q.pop()
    assert ei.value.head == 0
    # The queue goes on after a bad chain.
    r.desc(1, GPA + DATA, 4, VIRTQ_DESC_F_WRITE)
    r.publish(1)
    assert q.pop().head == 1


def test_chain_longer_than_queue_is_rejected_without_looping():
    r = Ring(size=4)
    # A chain that never repeats an index must still stop at the queue size; with
    # indices < size that is a loop, so use an index chain that walks all of them.
    for i in range(4):
        r.desc(i, GPA + DATA, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 4)
    r.publish(0)
    with pytest.raises(ChainError, match="loops|longer"):
        r.queue().pop()


def test_chain_byte_limit():
    r = Ring()
    r.desc(0, GPA + DATA, 4096, VIRTQ_DESC_F_NEXT, 1)
    r.desc(1, GPA + DATA, 4096)
    r.publish(0)
    with pytest.raises(ChainError, match="exceeds"):
        r.queue(max_chain_bytes=6000).pop()


def test_bad_avail_index_and_head_stop_the_ring():
    r = Ring()
    struct.pack_into("<H", r.buf, AVAIL + 2, QSIZE + 1)
    with pytest.raises(RingError):
        r.queue().pop()
    r2 = Ring()
    r2.publish(QSIZE + 3)     # head out of range
    with pytest.raises(RingError):
        r2.queue().pop()


def test_ring_outside_memory_and_misaligned():
    r = Ring()
    with pytest.raises(RingError):
        VirtQueue(r.mem, QSIZE, UVA + MEM - 16, UVA + AVAIL, UVA + USED)
    with pytest.raises(RingError):
        VirtQueue(r.mem, QSIZE, UVA + DESC + 8, UVA + AVAIL, UVA + USED)
    with pytest.raises(RingError):
        VirtQueue(r.mem, 3, UVA + DESC, UVA + AVAIL, UVA + USED)
    with pytest.raises(RingError):
        VirtQueue(r.mem, QSIZE, GPA + DESC, GPA + AVAIL, GPA + USED)  # GPA, not QEMU VA


def test_index_wraparound_and_unpop():
    r = Ring()
    r.avail_idx = 0xFFFE
    struct.pack_into("<H", r.buf, AVAIL + 2, 0xFFFE)
    struct.pack_into("<H", r.buf, USED + 2, 0xFFFE)
    q = r.queue(last_avail_idx=0xFFFE)
    for i in range(4):
        r.desc(i, GPA + DATA + 64 * i, 64, VIRTQ_DESC_F_WRITE)
        r.publish(i)
    c = q.pop()
    q.unpop()
    heads = [q.pop().head for _ in range(4)]
    assert heads == [0, 1, 2, 3] and c.head == 0
    for h in heads:
        q.push_used(h, 1)
    q.flush_used()
    assert struct.unpack_from("<H", r.buf, USED + 2)[0] == 2


def test_memory_regions_span_and_bounds():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 3 * 4096)
    try:
        # Two regions that are adjacent in guest-physical space; the second one is
        # mapped from an unaligned offset of the same file.
        mem = GuestMemory.from_fds([(0, 4096, 0x10000, 0), (4096, 4096, 0x20000, 4100)],
                                   [fd, fd])
    finally:
        os.close(fd)
    mem.write(4090, b"0123456789")
    assert mem.read(4090, 10) == b"0123456789"
    assert len(mem.gpa_views(4090, 10)) == 2
    assert bytes(mem.uva_to_view(0x20000, 4)) == b"6789"
    with pytest.raises(GuestMemoryError):
        mem.read(8190, 4)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_view(0x10000 + 4090, 10)
    with pytest.raises(GuestMemoryError):
        mem.gpa_view(4090, 10)
    mem.close()


def test_memory_fd_too_small_is_refused():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(GuestMemoryError, match="holds"):
            GuestMemory.from_fds([(0, 8192, 0, 0)], [fd])
        with pytest.raises(GuestMemoryError):
            GuestMemory.from_fds([(0, 4096, 0, 0)], [])
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1),
                          st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
                min_size=QSIZE, max_size=QSIZE),
       st.lists(st.integers(0, 0xFFFF), min_size=QSIZE, max_size=QSIZE),
       st.integers(0, 0xFFFF))
def test_garbage_rings_never_escape(descs, ring, avail_idx):
    r = Ring()
    for i, (addr, length, flags, nxt) in enumerate(descs):
        # Half the time point into memory so walks get past the first descriptor.
        if i % 2:
            addr = GPA + (addr % MEM)
        r.desc(i, addr, length % 70000, flags, nxt)
    for i, h in enumerate(ring):
        struct.pack_into("<H", r.buf, AVAIL + 4 + 2 * i, h)
    struct.pack_into("<H", r.buf, AVAIL + 2, avail_idx)
    q = r.queue()
    for _ in range(QSIZE + 2):
        try:
            chain = q.pop()
        except ChainError as e:
            assert 0 <= e.head < QSIZE
            continue
        except RingError:
            break
        if chain is None:
            break
        assert chain.readable_len + chain.writable_len <= q.max_chain_bytes
        for seg in chain.readable + chain.writable:
            assert seg.obj is not None


def test_write_into_read_only_chain_is_refused():
    r = Ring()
    r.buf[DATA:DATA + 8] = b"readonly"
    r.desc(0, GPA + DATA, 8)
    r.publish(0)
    chain = r.queue().pop()
    assert chain.writable_len == 0
    with pytest.raises(ChainError):
        chain.write(b"x")
    assert bytes(r.buf[DATA:DATA + 8]) == b"readonly"


# -- ring indices shared with a concurrent driver ---------------------------

def _concurrent_driver(shared, body) -> int:
    """Run body(words) over and over in a forked "driver" until _finish(); its pid.

    body returns how many bad things it saw; the child exits with the total (capped).
    The child uses its own native "H" view, i.e. single 16-bit accesses, as a real
    driver's READ_ONCE/WRITE_ONCE do.
    """
    stop = len(shared) - 8
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        count = 0
        try:
            words = memoryview(shared).cast("H")
            os.write(ready_w, b"x")
            while shared[stop] == 0:
                count += body(words)
        finally:
            os._exit(min(count, 255))
    os.read(ready_r, 1)
    os.close(ready_r)
    os.close(ready_w)
    return pid


def _finish(shared, pid) -> int:
    shared[len(shared) - 8] = 1
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_used_index_is_published_with_one_16bit_store():
    """Regression: the used index went out byte by byte (struct "<H"), so a driver
    reading it while it moved 0x00FF -> 0x0100 saw 0x0000 and reaped 65281 stale
    entries (the fake driver's KeyError in the 64 MiB hybrid test)."""
    import mmap

    shared = mmap.mmap(-1, MEM)
    mem = GuestMemory.from_buffer(shared, guest_addr=GPA, user_addr=UVA)
    struct.pack_into("<H", shared, USED + 2, 0x00FF)
    q = VirtQueue(mem, QSIZE, UVA + DESC, UVA + AVAIL, UVA + USED)
    used_idx = (USED + 2) // 2

    def reader(words):
        return 1 if words[used_idx] not in (0x00FF, 0x0100) else 0

    pid = _concurrent_driver(shared, reader)
    try:
        for _ in range(50000):
            q.used_idx = 0x00FE
            q.push_used(0, 0)
            q.flush_used()          # 0x00FF
            q.push_used(0, 0)
            q.flush_used()          # 0x0100: both bytes change
    finally:
        torn = _finish(shared, pid)
    q.release()
    mem.close()
    assert torn == 0, f"the driver saw {torn}+ torn used indices"

