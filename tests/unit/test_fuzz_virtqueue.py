"""Property tests of the split-virtqueue walker and guest memory (kata_py/vsock/virtqueue.py,
memory.py) against a hostile driver.

Guest RAM here is a few regions cut out of one bytearray, with guard bytes before, between
and after them that belong to no region. The driver's descriptor table and rings are
random: loops, indices past the queue, out-of-range and wrapping addresses, huge lengths,
indirect descriptors (not negotiated), chains that span adjacent regions, ring indices
anywhere in 0..0xFFFF. A small reference walker written from the virtio spec says what
each pop must give; the properties:

- pop() gives exactly the model's chain, or ChainError for the model's bad head, or
  RingError when the avail index or a head is impossible; nothing else escapes;
- reads return exactly the bytes of the chain's readable descriptors; a write changes
  exactly the bytes of its writable descriptors, and never a guard byte;
- a chain never holds more than max_chain_bytes, nor more segments than it could;
- used entries land at used_idx modulo the queue size and the index wraps at 2**16;
  unpop() then pop() gives the same chain again.

Budget: tests/fuzz_budget.py.
"""

from __future__ import annotations

import random
import struct

from hypothesis import event, given, strategies as st

from kata_py.vsock.memory import GuestMemory, GuestMemoryError, Region
from kata_py.vsock.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                     ChainError, RingError, VirtQueue)
from tests.fuzz_budget import fuzz

GUARD = 32
TOP = 1 << 64
DESC = struct.Struct("<QIHH")


class Layout:
    """Regions of guest RAM inside one bytearray, with guard bytes around each."""

    def __init__(self, specs, seed: int) -> None:
        # specs: [(gpa, size, uva)]
        self.specs = specs
        total = GUARD + sum(size + GUARD for _, size, _ in specs)
        self.backing = bytearray(random.Random(seed).randbytes(total))
        self.offsets = []
        regions = []
        off = GUARD
        for gpa, size, uva in specs:
            r = Region(gpa, size, uva, 0)
            r._view = memoryview(self.backing)[off:off + size]
            regions.append(r)
            self.offsets.append(off)
            off += size + GUARD
        self.mem = GuestMemory(regions)

    def close(self) -> None:
        self.mem.close()

    # the model's view of guest RAM

    def backing_offset(self, gpa: int) -> int | None:
        for (base, size, _), off in zip(self.specs, self.offsets):
            if base <= gpa < base + size:
                return off + gpa - base
        return None

    def ranges(self, addr: int, length: int) -> list[tuple[int, int]] | None:
        """Backing (offset, length) pieces of a guest range; None if any byte is unmapped."""
        if addr + length > TOP:
            return None
        out = []
        while length > 0:
            off = self.backing_offset(addr)
            if off is None:
                return None
            base, size, _ = next(s for s in self.specs if s[0] <= addr < s[0] + s[1])
            n = min(length, base + size - addr)
            out.append((off, n))
            addr += n
            length -= n
        return out

    def uva_offset(self, uva: int) -> int:
        for (_, size, base), off in zip(self.specs, self.offsets):
            if base <= uva < base + size:
                return off + uva - base
        raise AssertionError(f"{uva:#x} not mapped")


class BadChain(Exception):
    pass


def model_walk(layout: Layout, desc_off: int, size: int, head: int, max_bytes: int):
    """The chain at `head` as the spec reads it: (readable, writable) backing pieces."""
    readable, writable = [], []
    seen = set()
    idx, total = head, 0
    while True:
        if idx >= size or idx in seen:
            raise BadChain
        seen.add(idx)
        addr, length, flags, nxt = DESC.unpack_from(layout.backing, desc_off + 16 * idx)
        if flags & VIRTQ_DESC_F_INDIRECT:
            raise BadChain           # not negotiated
        total += length
        if total > max_bytes:
            raise BadChain
        if length:
            pieces = layout.ranges(addr, length)
            if pieces is None:
                raise BadChain
            if flags & VIRTQ_DESC_F_WRITE:
                writable += pieces
            elif writable:
                raise BadChain       # readable after writable
            else:
                readable += pieces
        if not flags & VIRTQ_DESC_F_NEXT:
            return readable, writable
        idx = nxt


# -- generators ---------------------------------------------------------------------

@st.composite
def layouts(draw, ring_bytes: int):
    """1-3 data regions (sometimes adjacent, sometimes at the top of the address space)
    plus one region that holds the rings."""
    n = draw(st.integers(1, 3))
    start = draw(st.sampled_from([0, 0x1000, (1 << 32) - 0x100, TOP - 0x10000]))
    specs = []
    gpa = start
    for i in range(n):
        size = draw(st.sampled_from([16, 64, 256, 4096]))
        specs.append((gpa, size, 0x7F0000000000 + 0x100000 * i))
        gpa += size + draw(st.sampled_from([0, 0, 16, 0x1000]))
    ring_gpa = draw(st.sampled_from([0x40000000, 0x80000000]))   # clear of every data layout
    ring_size = ring_bytes + draw(st.sampled_from([0, 16, 256]))
    specs.append((ring_gpa, ring_size, 0x7F8000000000))
    return specs


def _sane_buffer(rng: random.Random, specs) -> tuple[int, int, int, int]:
    base, sz, _ = rng.choice(specs[:-1])
    off = rng.randrange(sz)
    return base + off, rng.randrange(sz - off + 1), 0, 0


def random_descriptor(rng: random.Random, specs, size: int) -> tuple[int, int, int, int]:
    """One descriptor as a hostile or buggy driver might write it.

    Plain `random` seeded by hypothesis rather than a strategy per field: the same
    distribution at a tenth of the cost, which is what lets a long run reach 100k cases.
    """
    data = specs[:-1]
    if rng.random() < 0.5:
        # What a correct driver writes: a buffer inside one region (or running on into
        # the next one when they are adjacent), readable ones before writable ones.
        base, sz, _ = rng.choice(data)
        off = rng.randrange(sz)
        length = rng.randrange(sz - off + 1) if rng.random() < 0.9 else rng.randrange(2 * sz)
        flags = rng.choice([0, VIRTQ_DESC_F_WRITE]) | (VIRTQ_DESC_F_NEXT if rng.random() < 0.6 else 0)
        return base + off, length, flags, rng.randrange(size)
    pick = rng.random()
    if pick < 0.45:                                    # inside a data region
        base, sz, _ = rng.choice(data)
        addr = base + rng.randrange(sz)
    elif pick < 0.6:                                   # at or just before a region end
        base, sz, _ = rng.choice(data)
        addr = base + sz - rng.randrange(65)
    elif pick < 0.7:                                   # into the rings themselves
        addr = specs[-1][0] + rng.randrange(specs[-1][1])
    elif pick < 0.85:
        addr = rng.randrange(TOP)
    else:
        addr = rng.choice([0, TOP - 1, TOP - 16, specs[0][0] - 1])
    pick = rng.random()
    if pick < 0.7:
        length = rng.randrange(301)
    elif pick < 0.85:
        length = rng.choice([4096, 65536, 0xFFFFFFFF, 0x80000000])
    else:
        length = rng.randrange(1 << 32)
    if rng.random() < 0.85:
        flags = rng.choice([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                            VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                            VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT])
    else:
        flags = rng.randrange(1 << 16)
    nxt = rng.randrange(size + 1) if rng.random() < 0.8 else rng.randrange(1 << 16)
    return addr % TOP, length, flags, nxt


@st.composite
def rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    desc_len, avail_len, used_len = 16 * size, 6 + 2 * size, 6 + 8 * size
    # desc at 0, avail after it (2-aligned), used after that (4-aligned)
    avail_at = desc_len
    used_at = (avail_at + avail_len + 3) & ~3
    specs = draw(layouts(used_at + used_len))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    descs = [random_descriptor(rng, specs, size) for _ in range(size)]
    heads = [rng.randrange(size) if rng.random() < 0.9 else rng.randrange(1 << 16) for _ in range(size)]
    if rng.random() < 0.4:
        # Well-formed multi-descriptor chains over a shuffled table, with the odd
        # descriptor spoiled, so long chains and region-spanning buffers get served.
        order = list(range(size))
        rng.shuffle(order)
        heads = []
        while order:
            chain = order[:rng.randint(1, 4)]
            order = order[len(chain):]
            heads.append(chain[0])
            first_writable = rng.randrange(len(chain) + 1)
            for pos, i in enumerate(chain):
                addr, length, _, _ = random_descriptor(rng, specs, size) if rng.random() < 0.1 else \
                    _sane_buffer(rng, specs)
                flags = (VIRTQ_DESC_F_WRITE if pos >= first_writable else 0) | \
                    (VIRTQ_DESC_F_NEXT if pos + 1 < len(chain) else 0)
                descs[i] = (addr, length, flags, chain[pos + 1] if pos + 1 < len(chain) else 0)
        heads = (heads * size)[:size]
    last_avail = draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF, 0xFFFE, 0x00FF])))
    # Mostly a sane number of published chains; sometimes an impossible index.
    ahead = rng.randrange(size + 1) if rng.random() < 0.9 else rng.randrange(1 << 16)
    used_idx = draw(st.integers(0, 0xFFFF))
    max_bytes = draw(st.sampled_from([64, 1024, 1 << 20]))
    return dict(size=size, specs=specs, descs=descs, heads=heads, last_avail=last_avail,
                avail_idx=(last_avail + ahead) & 0xFFFF, used_idx=used_idx, max_bytes=max_bytes,
                seed=seed, avail_at=avail_at, used_at=used_at)


def lay_out(case) -> tuple[Layout, int, int, int]:
    layout = Layout(case["specs"], case["seed"])
    ring_uva = case["specs"][-1][2]
    base = layout.uva_offset(ring_uva)
    desc_off, avail_off, used_off = base, base + case["avail_at"], base + case["used_at"]
    for i, d in enumerate(case["descs"]):
        DESC.pack_into(layout.backing, desc_off + 16 * i, *d)
    struct.pack_into("<HH", layout.backing, avail_off, 0, case["avail_idx"])
    for i, h in enumerate(case["heads"]):
        struct.pack_into("<H", layout.backing, avail_off + 4 + 2 * i, h)
    struct.pack_into("<HH", layout.backing, used_off, 0, case["used_idx"])
    return layout, desc_off, avail_off, used_off


def gather(layout: Layout, pieces) -> bytes:
    return b"".join(bytes(layout.backing[o:o + n]) for o, n in pieces)


# -- properties ----------------------------------------------------------------------

@fuzz(400)
@given(rings(), st.data())
def test_walker_matches_the_spec_and_stays_inside_guest_ram(case, data):
    layout, desc_off, avail_off, used_off = lay_out(case)
    size, max_bytes = case["size"], case["max_bytes"]
    ring_uva = case["specs"][-1][2]
    q = VirtQueue(layout.mem, size, ring_uva, ring_uva + case["avail_at"], ring_uva + case["used_at"],
                  last_avail_idx=case["last_avail"], max_chain_bytes=max_bytes)
    assert q.used_idx == case["used_idx"]
    rng = random.Random(case["seed"] + 1)
    last_avail = case["last_avail"]
    used = []
    ring_lo, ring_hi = desc_off, used_off + 6 + 8 * size
    rings_written = False
    shadow = last_avail     # the avail index as the device last read it
    for _ in range(size + 3):
        # A device may keep using an avail index it has read until it has consumed
        # it (the driver only ever moves it forward), so it is read again only then;
        # chains written into the ring itself make the difference visible.
        expect_ring_error = False
        if shadow == last_avail:
            shadow = struct.unpack_from("<H", layout.backing, avail_off + 2)[0]
            expect_ring_error = (shadow - last_avail) & 0xFFFF > size
        head = None
        if not expect_ring_error and shadow != last_avail:
            head = struct.unpack_from("<H", layout.backing, avail_off + 4 + 2 * (last_avail % size))[0]
            expect_ring_error = head >= size
        if expect_ring_error:
            try:
                q.pop()
            except RingError:
                event("RingError")
                break
            raise AssertionError("a ring the model finds impossible was served")
        if head is None:
            assert q.pop() is None
            break
        try:
            model = model_walk(layout, desc_off, size, head, max_bytes)
        except BadChain:
            model = None
        try:
            chain = q.pop()
        except ChainError as e:
            event("ChainError")
            assert model is None and e.head == head
            last_avail = (last_avail + 1) & 0xFFFF
            q.push_used(e.head, 0)
            used.append((e.head, 0))
            continue
        assert model is not None, "a chain the model refuses was served"
        readable, writable = model
        event("chain served")
        if len(readable) + len(writable) > 1:
            event("chain of several pieces")
        if data.draw(st.booleans()):
            chain.release()
            q.unpop()
            chain = q.pop()
        last_avail = (last_avail + 1) & 0xFFFF
        assert chain.head == head
        assert chain.readable_len == sum(n for _, n in readable)
        assert chain.writable_len == sum(n for _, n in writable)
        assert chain.readable_len + chain.writable_len <= max_bytes
        assert len(chain.readable) + len(chain.writable) <= size * len(case["specs"])
        assert chain.read() == gather(layout, readable)
        limit = data.draw(st.integers(0, chain.readable_len + 2))
        assert chain.read(limit) == gather(layout, readable)[:limit]
        # A write changes exactly the writable bytes, in order, and nothing else.
        n = data.draw(st.integers(0, chain.writable_len))
        payload = rng.randbytes(n)
        cut = data.draw(st.integers(0, n))
        expected = bytearray(layout.backing)
        left = memoryview(payload)
        for off, length in writable:
            take = left[:length]
            expected[off:off + len(take)] = take
            left = left[len(take):]
            rings_written |= off < ring_hi and off + length > ring_lo
        assert chain.write(payload[:cut], payload[cut:]) == n
        assert layout.backing == expected
        chain.release()
        q.push_used(chain.head, n)
        used.append((chain.head, n))
    q.flush_used()
    new_idx = struct.unpack_from("<H", layout.backing, used_off + 2)[0]
    if not rings_written:
        assert new_idx == (case["used_idx"] + len(used)) & 0xFFFF
        for i, (h, n) in enumerate(used):
            slot = (case["used_idx"] + i) % size
            assert struct.unpack_from("<II", layout.backing, used_off + 4 + 8 * slot) == (h, n)
    q.release()
    layout.close()


@fuzz(300)
@given(st.sampled_from([1, 2, 3, 4, 8, 100, 256, 32768, 65536]),
       st.tuples(st.integers(0, TOP - 1), st.integers(0, TOP - 1), st.integers(0, TOP - 1)),
       st.booleans())
def test_rings_anywhere_are_refused_or_lie_inside_one_region(size, addrs, near):
    layout = Layout([(0, 4096, 0x1000), (4096, 4096, 0x3000)], 7)
    if near:
        addrs = tuple(0x1000 + a % 0x3000 for a in addrs)
    try:
        q = VirtQueue(layout.mem, size, *addrs)
    except RingError:
        layout.close()
        return
    for addr, length in ((addrs[0], 16 * size), (addrs[1], 6 + 2 * size), (addrs[2], 6 + 8 * size)):
        assert any(base <= addr and addr + length <= base + sz for _, sz, base in layout.specs)
    q.release()
    layout.close()


@fuzz(300)
@given(st.data())
def test_guest_memory_reads_and_writes_only_mapped_bytes(data):
    specs = data.draw(layouts(64))
    layout = Layout(specs, data.draw(st.integers(0, 2**32)))
    addr = data.draw(st.one_of(st.integers(0, TOP - 1),
                               st.builds(lambda s, o: s[0] + o % (s[1] + 8), st.sampled_from(specs),
                                         st.integers(0, 1 << 20))))
    length = data.draw(st.one_of(st.integers(0, 600), st.integers(0, TOP)))
    pieces = layout.ranges(addr, length) if length < (1 << 40) else None
    before = bytes(layout.backing)
    try:
        got = layout.mem.read(addr, length)
    except GuestMemoryError:
        assert pieces is None or (length >= (1 << 40))
    else:
        assert pieces is not None and got == gather(layout, pieces)
    if pieces is not None and length <= 600:
        blob = bytes(range(256)) * 3
        layout.mem.write(addr, blob[:length])
        expected = bytearray(before)
        pos = 0
        for off, n in pieces:
            expected[off:off + n] = blob[pos:pos + n]
            pos += n
        assert layout.backing == expected
    elif length <= 600:
        try:
            layout.mem.write(addr, b"\xEE" * length)
        except GuestMemoryError:
            pass
        else:
            raise AssertionError("a write outside guest RAM was accepted")
        # A refused write may have written nothing at all: not even a first piece.
        assert bytes(layout.backing) == before
    layout.close()


@fuzz(200)
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 16)), min_size=2, max_size=4))
def test_overlapping_regions_are_refused(spans):
    """Regression: regions that overlap in guest-physical space were accepted, and an
    address in both meant whichever region sorted first (found by the walker model)."""
    regions = []
    backing = bytearray(4096)
    for gpa, size in spans:
        r = Region(gpa, size, 0x7F0000000000 + gpa, 0)
        r._view = memoryview(backing)
        regions.append(r)
    ordered = sorted(spans)
    overlap = any(a + n > b for (a, n), (b, _) in zip(ordered, ordered[1:]))
    try:
        GuestMemory(regions).close()
    except GuestMemoryError as e:
        assert overlap and "overlap" in str(e)
    else:
        assert not overlap
