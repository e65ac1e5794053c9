"""Property tests of the vhost-user side of the vsock back end (kata_py/vsock/vhost_user.py).

Two layers: recv_message() reading arbitrary bytes and fds off the socket, and
VhostUserVsock.handle() applying arbitrary sequences of (mostly well-formed, often
wrong) front-end requests. Properties: only VhostUserError comes out of the socket
reader; handle() never raises and answers with a well-formed reply or nothing; no fd
and no guest-memory mapping outlives the session; rings only ever sit inside the
mapped regions; popping from whatever rings a sequence set up gives chains or the
queue's own typed errors. Budget: tests/fuzz_budget.py.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from kata_py.vsock import vhost_user as V
from kata_py.vsock.memory import GuestMemory
from kata_py.vsock.vhost_user import Message, VhostUserError, VhostUserVsock
from kata_py.vsock.virtqueue import ChainError, RingError
from tests.fuzz_budget import fuzz

UVA = 0x7F0000000000
MEMFD_NAME = "kata-fuzz-guest"
U64_MAX = (1 << 64) - 1


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def guest_mappings() -> int:
    """Live mappings of the fuzz memfds. No gc.collect(): a mapping must go when the
    session closes it, not whenever a leftover view happens to be collected."""
    with open("/proc/self/maps") as f:
        return sum(MEMFD_NAME in line for line in f)


# -- fds a front end might send ---------------------------------------------------

def make_fd(kind: str, content: bytes) -> int:
    if kind.startswith("memfd"):
        fd = os.memfd_create(MEMFD_NAME)
        os.ftruncate(fd, int(kind.split(":")[1]))
        if content and int(kind.split(":")[1]):
            os.pwrite(fd, content[:int(kind.split(":")[1])], 0)
        return fd
    if kind == "eventfd":
        return os.eventfd(0)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    return os.open("/dev/null", os.O_RDWR)


fd_kinds = st.sampled_from(["memfd:0", "memfd:4096", "memfd:65536", "memfd:1048576",
                            "eventfd", "pipe", "devnull"])

# -- requests ---------------------------------------------------------------------

u32 = st.one_of(st.integers(0, 8), st.sampled_from([128, 256, 32768, 65535, 65536, 0xFFFFFFFF]),
                st.integers(0, 0xFFFFFFFF))
u64 = st.one_of(st.integers(0, U64_MAX), st.sampled_from([0, 1, U64_MAX, 1 << 63]))
queue_sizes = st.sampled_from([0, 1, 2, 3, 8, 64, 100, 128, 256, 32768, 65536])
vring_index = st.one_of(st.sampled_from([0, 1]), st.integers(0, 0xFFFFFFFF))
# Ring addresses: mostly QEMU addresses inside the guest memory we hand over (which
# starts at UVA), sometimes misaligned, sometimes anywhere.
ring_addr = st.one_of(st.integers(0, 0x11000).map(lambda o: UVA + (o & ~0xF)),
                      st.integers(0, 0x11000).map(lambda o: UVA + o), u64)
region = st.tuples(st.sampled_from([0, 0x1000, 0x10000, U64_MAX - 0xFFF, 1 << 63]),
                   st.sampled_from([0, 1, 4096, 65536, 1 << 20, 1 << 40, U64_MAX]),
                   st.sampled_from([UVA, UVA + 0x100000, 0, U64_MAX - 0xFFF]),
                   st.sampled_from([0, 1, 4096, 1 << 20, U64_MAX]))

sane_regions = [(0, 1 << 20, UVA, 0), (0, 4096, UVA, 0), (0, 0x8000, UVA, 0x1000),
                (0x100000, 1 << 19, UVA + 0x100000, 0), (0, 1 << 20, UVA + 0x4000, 0)]


@st.composite
def request(draw):
    """(request, flags, payload, fd kinds): a plausible request, often slightly wrong."""
    req = draw(st.one_of(st.sampled_from(sorted(V.REQUEST_NAMES)), st.integers(0, 60),
                         st.just(0xFFFFFFFF)))
    flags = V.FLAG_VERSION | draw(st.sampled_from([0, V.FLAG_NEED_REPLY, V.FLAG_REPLY,
                                                   V.FLAG_NEED_REPLY | V.FLAG_REPLY]))
    nfds = 0
    if req in (V.SET_FEATURES, V.SET_PROTOCOL_FEATURES):
        payload = struct.pack("<Q", draw(st.one_of(st.just(V.OFFERED_FEATURES),
                                                   st.just(V.OFFERED_PROTOCOL_FEATURES), u64)))
    elif req == V.SET_MEM_TABLE:
        if draw(st.booleans()):
            # A table QEMU could send (memory moved, shrunk, split): real memfds behind it.
            regions = draw(st.lists(st.sampled_from(sane_regions), min_size=1, max_size=3))
            payload = struct.pack("<II", len(regions), 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)
            return req, flags, payload, ["memfd:1048576"] * len(regions)
        regions = draw(st.lists(st.one_of(st.sampled_from(sane_regions), region), min_size=0, max_size=10))
        count = draw(st.one_of(st.just(len(regions)), st.integers(0, 12), st.just(0xFFFFFFFF)))
        payload = struct.pack("<II", count, 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)
        nfds = draw(st.one_of(st.just(min(len(regions), 8)), st.integers(0, 9)))
    elif req in (V.SET_VRING_NUM, V.SET_VRING_BASE, V.SET_VRING_ENABLE, V.GET_VRING_BASE):
        value = draw(queue_sizes) if req == V.SET_VRING_NUM else draw(u32)
        payload = struct.pack("<II", draw(vring_index), value)
    elif req == V.SET_VRING_ADDR:
        desc, used, avail = (draw(ring_addr) for _ in range(3))
        payload = struct.pack("<IIQQQQ", draw(vring_index), draw(u32), desc, used, avail, draw(u64))
    elif req in (V.SET_VRING_KICK, V.SET_VRING_CALL, V.SET_VRING_ERR):
        value = draw(st.one_of(st.sampled_from([0, 1, 0x100, 0x101, 2, 0x1FF]), u64))
        payload = struct.pack("<Q", value)
        nfds = draw(st.sampled_from([1, 1, 1, 0, 2]))
    elif req in (V.GET_CONFIG, V.SET_CONFIG):
        offset, size = draw(st.integers(0, 300)), draw(st.integers(0, 300))
        body = draw(st.one_of(st.just(size), st.integers(0, 300)))
        payload = struct.pack("<III", offset, size, draw(u32)) + b"\0" * body
    else:
        payload = b""
    if draw(st.integers(0, 9)) == 0:
        payload = draw(st.binary(max_size=64))      # anything at all
    kinds = draw(st.lists(fd_kinds, min_size=nfds, max_size=nfds))
    return req, flags, payload, kinds


def handshake():
    """The requests QEMU sends to bring a device up, in its usual order."""
    out = [(V.GET_FEATURES, V.FLAG_VERSION, b"", []),
           (V.SET_FEATURES, V.FLAG_VERSION, struct.pack("<Q", V.OFFERED_FEATURES), []),
           (V.GET_PROTOCOL_FEATURES, V.FLAG_VERSION, b"", []),
           (V.SET_PROTOCOL_FEATURES, V.FLAG_VERSION, struct.pack("<Q", V.OFFERED_PROTOCOL_FEATURES), []),
           (V.SET_OWNER, V.FLAG_VERSION, b"", []),
           (V.SET_MEM_TABLE, V.FLAG_VERSION, struct.pack("<IIQQQQ", 1, 0, 0, 1 << 20, UVA, 0), ["memfd:1048576"])]
    for q in (0, 1):
        base = UVA + 0x4000 * (q + 1)
        out += [(V.SET_VRING_NUM, V.FLAG_VERSION, struct.pack("<II", q, 64), []),
                (V.SET_VRING_BASE, V.FLAG_VERSION, struct.pack("<II", q, 0), []),
                (V.SET_VRING_ADDR, V.FLAG_VERSION, struct.pack("<IIQQQQ", q, 0, base, base + 0x1000,
                                                               base + 0x800, 0), []),
                (V.SET_VRING_CALL, V.FLAG_VERSION, struct.pack("<Q", q), ["eventfd"]),
                (V.SET_VRING_KICK, V.FLAG_VERSION, struct.pack("<Q", q), ["eventfd"]),
                (V.SET_VRING_ENABLE, V.FLAG_VERSION, struct.pack("<II", q, 1), [])]
    return out


def check_reply(reply, request_code):
    if reply is None:
        return
    req, flags, size = struct.unpack_from("<III", reply)
    assert req == request_code and flags == V.FLAG_VERSION | V.FLAG_REPLY
    assert size == len(reply) - V.HDR_SIZE <= V.MAX_PAYLOAD


def rings_inside_memory(dev: VhostUserVsock) -> None:
    for vr in dev.vrings:
        q = vr.queue
        if q is None:
            continue
        spans = ((vr.desc_addr, 16 * q.size), (vr.avail_addr, 6 + 2 * q.size),
                 (vr.used_addr, 6 + 8 * q.size))
        for addr, length in spans:
            assert any(r.user_addr <= addr and addr + length <= r.user_addr + r.size
                       for r in dev.mem.regions), (hex(addr), length)


def drain_rings(dev: VhostUserVsock) -> int:
    """Pop what the (random) guest memory offers on every live ring; chains popped."""
    popped = 0
    for index in (0, 1):
        q = dev.queue(index)
        if q is None:
            continue
        for _ in range(q.size + 2):
            try:
                chain = q.pop()
            except ChainError as e:
                assert 0 <= e.head < q.size
                q.push_used(e.head, 0)
                continue
            except RingError:
                break
            if chain is None:
                break
            popped += 1
            n = min(chain.writable_len, 64)
            chain.write(b"\xAA" * n)
            chain.release()
            q.push_used(chain.head, n)
        q.flush_used()
        q.should_signal()
    return popped


@fuzz(200)
@given(st.booleans(), st.lists(request(), max_size=14), st.binary(min_size=0, max_size=4096))
def test_any_request_sequence_is_answered_and_leaks_nothing(start_with_handshake, requests, memory):
    before_fds, before_maps = fd_count(), guest_mappings()
    dev = VhostUserVsock(3)
    sequence = (handshake() if start_with_handshake else []) + requests
    for req, flags, payload, kinds in sequence:
        msg = Message(req, flags, payload, [make_fd(kind, memory) for kind in kinds])
        reply = dev.handle(msg)          # must not raise, whatever the message
        check_reply(reply, req)
        assert msg.fds == []             # every fd kept or closed
        rings_inside_memory(dev)
    drain_rings(dev)
    dev.close()
    assert fd_count() == before_fds
    assert guest_mappings() == before_maps


@fuzz(200)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 0xFFFFFFFF), st.integers(3, 0xFFFFFFFE))
def test_get_config_returns_exactly_the_range_asked_for(offset, size, flags, cid):
    dev = VhostUserVsock(cid)
    need = V.FLAG_VERSION | V.FLAG_NEED_REPLY
    dev.handle(Message(V.SET_PROTOCOL_FEATURES, V.FLAG_VERSION, struct.pack("<Q", V.OFFERED_PROTOCOL_FEATURES), []))
    dev.acked_features = V.OFFERED_FEATURES
    reply = dev.handle(Message(V.GET_CONFIG, need, struct.pack("<III", offset, size, flags) + b"\0" * size, []))
    check_reply(reply, V.GET_CONFIG)
    body = reply[V.HDR_SIZE:]
    if offset + size <= V.MAX_CONFIG_SIZE:
        config = struct.pack("<Q", cid).ljust(V.MAX_CONFIG_SIZE, b"\0")
        assert body == struct.pack("<III", offset, size, flags) + config[offset:offset + size]
    else:
        assert body == struct.pack("<Q", 1)      # refused, with REPLY_ACK
    dev.close()


# -- the socket reader ------------------------------------------------------------

@st.composite
def wire(draw):
    """Bytes a front end might write: messages with honest or lying sizes, noise."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["good", "lie", "noise", "version"]))
        req = draw(st.integers(0, 0xFFFFFFFF))
        payload = draw(st.binary(max_size=96))
        if kind == "good":
            parts.append(V.encode(req, payload, flags=V.FLAG_VERSION | draw(st.sampled_from([0, 4, 8]))))
        elif kind == "lie":
            size = draw(st.one_of(st.integers(0, 200), st.sampled_from([V.MAX_PAYLOAD, V.MAX_PAYLOAD + 1,
                                                                        0xFFFFFFFF])))
            parts.append(struct.pack("<III", req, V.FLAG_VERSION, size) + payload)
        elif kind == "version":
            parts.append(struct.pack("<III", req, draw(st.integers(0, 0xFFFFFFFF)), len(payload)) + payload)
        else:
            parts.append(payload)
    return b"".join(parts)


@fuzz(250)
@given(wire(), st.lists(fd_kinds, max_size=V.MAX_FDS + 3), st.integers(1, 40))
def test_socket_reader_yields_messages_or_vhost_user_errors(data, kinds, first):
    before = fd_count()
    a, b = socket.socketpair()
    b.settimeout(2.0)
    try:
        fds = [make_fd(kind, b"") for kind in kinds]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        a.sendmsg([data[:first]], anc)
        if data[first:]:
            a.sendall(data[first:])
        for fd in fds:
            os.close(fd)
        a.shutdown(socket.SHUT_WR)       # then EOF, never a wait for more bytes
        for _ in range(16):
            try:
                msg = V.recv_message(b)
            except VhostUserError:
                break
            if msg is None:
                break
            assert msg.flags & V.FLAG_VERSION_MASK == V.FLAG_VERSION
            assert len(msg.payload) <= V.MAX_PAYLOAD and len(msg.fds) <= V.MAX_FDS
            msg.close_fds()
    finally:
        a.close()
        b.close()
    assert fd_count() == before


@fuzz(200)
@given(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 4, 8, 12]), st.binary(max_size=V.MAX_PAYLOAD),
       st.integers(0, V.MAX_FDS))
def test_encode_then_recv_round_trips(req, extra_flags, payload, nfds):
    a, b = socket.socketpair()
    b.settimeout(2.0)
    try:
        fds = [os.eventfd(0) for _ in range(nfds)]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))] if fds else []
        wire_bytes = V.encode(req, payload, flags=V.FLAG_VERSION | extra_flags)
        a.sendmsg([wire_bytes[:V.HDR_SIZE]], anc)
        a.sendall(wire_bytes[V.HDR_SIZE:])
        for fd in fds:
            os.close(fd)
        msg = V.recv_message(b)
        assert (msg.request, msg.flags, msg.payload, len(msg.fds)) == \
            (req, V.FLAG_VERSION | extra_flags, payload, nfds)
        msg.close_fds()
    finally:
        a.close()
        b.close()


# -- regressions ----------------------------------------------------------------

def test_regression_mem_table_that_strands_a_ring_still_unmaps_the_old_memory():
    """SET_MEM_TABLE restarts the running rings on the new memory; when one no longer
    fitted, the MessageError left the loop early: the rings after it kept serving the
    old memory, which was never unmapped (one leaked mapping of all guest RAM per such
    message)."""
    before_fds, before_maps = fd_count(), guest_mappings()
    dev = VhostUserVsock(3)
    for req, flags, payload, kinds in handshake():
        dev.handle(Message(req, flags, payload, [make_fd(kind, b"") for kind in kinds]))
    assert dev.queue(0) is not None and guest_mappings() == before_maps + 1
    need = V.FLAG_VERSION | V.FLAG_NEED_REPLY
    # New memory of 4 KiB: the rings at UVA+0x4000.. no longer fit.
    reply = dev.handle(Message(V.SET_MEM_TABLE, need, struct.pack("<IIQQQQ", 1, 0, 0, 4096, UVA, 0),
                               [make_fd("memfd:4096", b"")]))
    assert reply[V.HDR_SIZE:] == struct.pack("<Q", 1)
    assert dev.queue(0) is None and dev.queue(1) is None
    assert dev.vrings[0].broken and dev.vrings[1].broken
    assert guest_mappings() == before_maps + 1      # only the new table is mapped
    dev.close()
    assert (fd_count(), guest_mappings()) == (before_fds, before_maps)


def test_guest_memory_regions_that_wrap_are_refused():
    with pytest.raises(Exception, match="wraps"):
        GuestMemory.from_buffer(bytearray(4096), guest_addr=U64_MAX - 100)
