"""vhost-user message framing and the vsock back end's handling of each request."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from kata_py.vsock import vhost_user as V
from kata_py.vsock.vhost_user import Message, VhostUserError, VhostUserVsock

UVA = 0x7F0000000000


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def send(sock, request, payload=b"", fds=(), flags=V.FLAG_VERSION, size=None):
    hdr = struct.pack("<III", request, flags, len(payload) if size is None else size)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sock.sendmsg([hdr + payload], anc)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.settimeout(1.0)
    yield a, b
    a.close()
    b.close()


def test_recv_message_with_fds(pair):
    a, b = pair
    efd = os.eventfd(0)
    send(a, V.SET_VRING_CALL, struct.pack("<Q", 1), [efd])
    os.close(efd)
    msg = V.recv_message(b)
    assert (msg.request, msg.payload, len(msg.fds)) == (V.SET_VRING_CALL, struct.pack("<Q", 1), 1)
    msg.close_fds()


def test_recv_message_eof_truncated_oversize_badversion(pair):
    a, b = pair
    a.sendall(struct.pack("<III", V.GET_FEATURES, 1, 8) + b"1234")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(VhostUserError, match="middle"):
        V.recv_message(b)
    assert V.recv_message(b) is None

    a2, b2 = socket.socketpair()
    b2.settimeout(1.0)
    before = fd_count()
    efd = os.eventfd(0)
    send(a2, V.SET_MEM_TABLE, b"", [efd], size=V.MAX_PAYLOAD + 1)
    os.close(efd)
    with pytest.raises(VhostUserError, match="payload of"):
        V.recv_message(b2)
    assert fd_count() == before          # the passed fd was closed, not leaked
    send(a2, V.GET_FEATURES, flags=2)
    with pytest.raises(VhostUserError, match="version"):
        V.recv_message(b2)
    a2.close()
    b2.close()


def test_recv_message_too_many_fds_is_fatal_and_leaks_nothing(pair):
    a, b = pair
    before = fd_count()
    fds = [os.eventfd(0) for _ in range(V.MAX_FDS + 4)]
    send(a, V.SET_MEM_TABLE, b"\0" * 8, fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(VhostUserError, match="fds"):
        V.recv_message(b)
    assert fd_count() == before


def test_recv_message_stalled_body(pair):
    a, b = pair
    a.sendall(struct.pack("<III", V.SET_FEATURES, 1, 8) + b"12")
    with pytest.raises(VhostUserError, match="stalled"):
        V.recv_message(b)


def call(dev, request, payload=b"", fds=(), flags=V.FLAG_VERSION):
    reply = dev.handle(Message(request, flags, payload, list(fds)))
    if reply is None:
        return None
    req, rflags, size = struct.unpack_from("<III", reply)
    assert req == request and rflags == V.FLAG_VERSION | V.FLAG_REPLY
    assert size == len(reply) - 12
    return reply[12:]


def negotiate(dev):
    feats = struct.unpack("<Q", call(dev, V.GET_FEATURES))[0]
    assert feats & V.VIRTIO_F_VERSION_1 and feats & V.VHOST_USER_F_PROTOCOL_FEATURES
    call(dev, V.SET_FEATURES, struct.pack("<Q", feats))
    pf = struct.unpack("<Q", call(dev, V.GET_PROTOCOL_FEATURES))[0]
    assert pf & V.PROTOCOL_F_CONFIG
    call(dev, V.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
    call(dev, V.SET_OWNER)


def test_get_config_returns_guest_cid():
    dev = VhostUserVsock(0x1234567)
    negotiate(dev)
    reply = call(dev, V.GET_CONFIG, struct.pack("<III", 0, 8, 0) + b"\0" * 8)
    assert reply == struct.pack("<III", 0, 8, 0) + struct.pack("<Q", 0x1234567)
    reply = call(dev, V.GET_CONFIG, struct.pack("<III", 4, 8, 0) + b"\0" * 8)
    assert reply[12:] == b"\0" * 8
    # Out of range, size mismatch: a failure reply (REPLY_ACK is on), never a crash.
    for bad in (struct.pack("<III", 250, 8, 0) + b"\0" * 8,
                struct.pack("<III", 0, 300, 0) + b"\0" * 300,
                struct.pack("<III", 0, 8, 0),
                b"\0" * 5):
        assert call(dev, V.GET_CONFIG, bad, flags=V.FLAG_VERSION | V.FLAG_NEED_REPLY) == \
            struct.pack("<Q", 1)


def test_reply_ack_and_unknown_requests():
    dev = VhostUserVsock(3)
    negotiate(dev)
    need = V.FLAG_VERSION | V.FLAG_NEED_REPLY
    assert call(dev, V.SET_OWNER, flags=need) == struct.pack("<Q", 0)
    assert call(dev, 99, flags=need) == struct.pack("<Q", 1)
    assert call(dev, 99) is None
    assert call(dev, V.SET_CONFIG, struct.pack("<III", 0, 8, 0) + b"\0" * 8, flags=need) == \
        struct.pack("<Q", 1)
    assert struct.unpack("<Q", call(dev, V.GET_QUEUE_NUM))[0] == 2


def test_no_reply_ack_without_negotiation():
    dev = VhostUserVsock(3)
    assert call(dev, V.SET_OWNER, flags=V.FLAG_VERSION | V.FLAG_NEED_REPLY) is None


def memfd(size=1 << 20):
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def mem_table(*regions):
    return struct.pack("<II", len(regions), 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)


def test_vring_setup_start_stop_and_fd_hygiene():
    before = fd_count()
    dev = VhostUserVsock(3)
    negotiate(dev)
    fd = memfd()
    call(dev, V.SET_MEM_TABLE, mem_table((0, 1 << 20, UVA, 0)), [fd])
    assert dev.mem is not None
    for idx in (0, 1):
        call(dev, V.SET_VRING_NUM, struct.pack("<II", idx, 128))
        call(dev, V.SET_VRING_BASE, struct.pack("<II", idx, 5))
        base = UVA + 0x10000 * (idx + 1)
        call(dev, V.SET_VRING_ADDR, struct.pack("<IIQQQQ", idx, 0, base, base + 0x2000,
                                                base + 0x1000, 0))
        call(dev, V.SET_VRING_CALL, struct.pack("<Q", idx), [os.eventfd(0)])
        call(dev, V.SET_VRING_KICK, struct.pack("<Q", idx), [os.eventfd(0)])
        assert dev.vrings[idx].started
        assert dev.queue(idx) is None           # disabled until SET_VRING_ENABLE
        call(dev, V.SET_VRING_ENABLE, struct.pack("<II", idx, 1))
        assert dev.queue(idx) is not None
        assert dev.queue(idx).last_avail_idx == 5
    dev.queue(1).last_avail_idx = 9
    assert call(dev, V.GET_VRING_BASE, struct.pack("<II", 1, 0)) == struct.pack("<II", 1, 9)
    assert dev.queue(1) is None and dev.vrings[1].kick_fd is None
    # Bad indices, sizes and fd counts are refused and their fds closed.
    need = V.FLAG_VERSION | V.FLAG_NEED_REPLY
    fail = struct.pack("<Q", 1)
    assert call(dev, V.SET_VRING_NUM, struct.pack("<II", 2, 128), flags=need) == fail
    assert call(dev, V.SET_VRING_NUM, struct.pack("<II", 0, 100), flags=need) == fail
    assert call(dev, V.SET_VRING_KICK, struct.pack("<Q", 0), [os.eventfd(0), os.eventfd(0)],
                flags=need) == fail
    assert call(dev, V.SET_VRING_KICK, struct.pack("<Q", 0x100), [os.eventfd(0)],
                flags=need) == fail
    assert call(dev, V.SET_VRING_CALL, struct.pack("<Q", 7), [os.eventfd(0)], flags=need) == fail
    assert call(dev, V.SET_VRING_ADDR, b"\0" * 12, flags=need) == fail
    # A ring outside guest memory is refused when it starts.
    call(dev, V.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0))
    assert call(dev, V.SET_VRING_KICK, struct.pack("<Q", 1), [os.eventfd(0)],
                flags=need) == fail
    assert dev.queue(1) is None
    dev.close()
    assert fd_count() == before


def test_mem_table_validation_closes_fds():
    before = fd_count()
    dev = VhostUserVsock(3)
    negotiate(dev)
    need = V.FLAG_VERSION | V.FLAG_NEED_REPLY
    fail = struct.pack("<Q", 1)
    # fd count mismatch
    assert call(dev, V.SET_MEM_TABLE, mem_table((0, 4096, UVA, 0)), [memfd(), memfd()],
                flags=need) == fail
    # region larger than its file
    assert call(dev, V.SET_MEM_TABLE, mem_table((0, 1 << 30, UVA, 0)), [memfd(4096)],
                flags=need) == fail
    # too many regions, truncated table, not a mappable fd
    assert call(dev, V.SET_MEM_TABLE, struct.pack("<II", 9, 0), flags=need) == fail
    assert call(dev, V.SET_MEM_TABLE, b"\1\0", flags=need) == fail
    r, w = os.pipe()
    os.close(w)
    assert call(dev, V.SET_MEM_TABLE, mem_table((0, 4096, UVA, 0)), [r], flags=need) == fail
    assert dev.mem is None
    dev.close()
    assert fd_count() == before


def test_features_mask_unoffered_bits():
    dev = VhostUserVsock(3)
    call(dev, V.SET_FEATURES, struct.pack("<Q", (1 << 64) - 1))
    assert dev.acked_features == V.OFFERED_FEATURES
    with pytest.raises(ValueError):
        VhostUserVsock(2)
