"""vsock connection state machine and credit accounting, with no I/O at all."""

from __future__ import annotations

import pytest

from kata_py.vsock import packet as P
from kata_py.vsock.connection import Mux, MuxFull, State
from kata_py.vsock.packet import Header

GUEST = 3


def hdr(op, src_port=5000, dst_port=1024, *, flags=0, buf_alloc=64 * 1024, fwd_cnt=0,
        length=0, src_cid=GUEST, dst_cid=2, type_=P.TYPE_STREAM):
    return Header(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags,
                  buf_alloc, fwd_cnt)


def drain(mux, max_payload=4096):
    out = []
    while mux.has_packet():
        pkt = mux.next_packet(max_payload)
        if pkt is None:
            break
        out.append(pkt)
    return out


def ops(pkts):
    return [P.OP_NAMES[p.hdr.op] for p in pkts]


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def host_connected(mux, guest_port=1024, buf_alloc=64 * 1024):
    conn = mux.host_connect(guest_port)
    [req] = drain(mux)
    assert req.hdr.op == P.OP_REQUEST and req.hdr.dst_port == guest_port
    assert req.hdr.src_cid == 2 and req.hdr.dst_cid == GUEST and req.hdr.src_port >= 1024
    mux.guest_packet(hdr(P.OP_RESPONSE, src_port=guest_port, dst_port=conn.host_port,
                         buf_alloc=buf_alloc))
    assert conn.state is State.CONNECTED
    return conn


def test_header_layout():
    h = hdr(P.OP_RW, length=7, flags=0x01020304, buf_alloc=0x11223344, fwd_cnt=0x55667788)
    raw = h.pack()
    assert len(raw) == 44
    assert raw[:8] == (3).to_bytes(8, "little") and raw[8:16] == (2).to_bytes(8, "little")
    assert raw[28:30] == (1).to_bytes(2, "little") and raw[30:32] == (5).to_bytes(2, "little")
    assert Header.unpack(raw) == h
    with pytest.raises(P.PacketError):
        Header.unpack(raw[:43])


def test_host_connect_accepted_and_refused():
    mux = Mux(GUEST)
    conn = host_connected(mux)
    assert conn.host_initiated
    conn2 = mux.host_connect(1024)
    assert conn2.host_port != conn.host_port
    drain(mux)
    mux.guest_packet(hdr(P.OP_RST, src_port=1024, dst_port=conn2.host_port))
    assert conn2.closed and conn2.close_reason == "refused by guest"
    assert mux.take_closed() == [conn2]
    assert drain(mux) == []          # no answer to a RST


def test_host_connect_times_out():
    clock = Clock()
    mux = Mux(GUEST, clock=clock)
    conn = mux.host_connect(1024, timeout=5)
    drain(mux)
    clock.t = 6
    mux.expire()
    assert conn.closed and "timed out" in conn.close_reason
    assert ops(drain(mux)) == ["RST"]


def test_guest_connect_accepted_and_refused():
    seen = []

    def connector(port, conn):
        seen.append(port)
        return port == 5000

    mux = Mux(GUEST, connector=connector)
    conn = mux.guest_packet(hdr(P.OP_REQUEST, src_port=40000, dst_port=5000))
    assert conn.state is State.CONNECTED and not conn.host_initiated
    [resp] = drain(mux)
    assert resp.hdr.op == P.OP_RESPONSE
    assert (resp.hdr.src_port, resp.hdr.dst_port, resp.hdr.dst_cid) == (5000, 40000, GUEST)
    assert mux.guest_packet(hdr(P.OP_REQUEST, src_port=40001, dst_port=6000)) is None
    [rst] = drain(mux)
    assert rst.hdr.op == P.OP_RST and rst.hdr.dst_port == 40001
    assert seen == [5000, 6000]


def test_packets_for_unknown_connections_get_rst_and_rst_gets_nothing():
    mux = Mux(GUEST)
    mux.guest_packet(hdr(P.OP_RW, length=3), b"abc")
    assert ops(drain(mux)) == ["RST"]
    mux.guest_packet(hdr(P.OP_RST))
    assert drain(mux) == []


def test_spoofed_addresses_are_dropped_and_other_types_reset():
    mux = Mux(GUEST, connector=lambda p, c: True)
    assert mux.guest_packet(hdr(P.OP_REQUEST, src_cid=4)) is None
    assert mux.guest_packet(hdr(P.OP_REQUEST, dst_cid=7)) is None
    assert drain(mux) == []
    mux.guest_packet(hdr(P.OP_REQUEST, type_=2))        # SEQPACKET: not offered
    assert ops(drain(mux)) == ["RST"]
    mux.guest_packet(hdr(99))
    assert ops(drain(mux)) == ["RST"]
    assert not mux.conns


def test_rw_to_guest_respects_credit_and_wraps():
    mux = Mux(GUEST)
    conn = host_connected(mux, buf_alloc=10000)
    conn.host_data(b"x" * 25000)
    pkts = drain(mux)
    assert ops(pkts) == ["RW", "RW", "RW", "CREDIT_REQUEST"]
    assert [len(p.payload) for p in pkts[:3]] == [4096, 4096, 10000 - 8192]
    assert conn.peer_credit() == 0
    assert drain(mux) == []            # one CREDIT_REQUEST per stall
    # The guest consumed 6000 bytes.
    mux.guest_packet(hdr(P.OP_CREDIT_UPDATE, src_port=1024, dst_port=conn.host_port,
                         buf_alloc=10000, fwd_cnt=6000))
    pkts = drain(mux)
    assert sum(len(p.payload) for p in pkts if p.hdr.op == P.OP_RW) == 6000
    # Counters are u32 and wrap.
    conn.tx_cnt = 0xFFFFFF00
    mux.guest_packet(hdr(P.OP_CREDIT_UPDATE, src_port=1024, dst_port=conn.host_port,
                         buf_alloc=10000, fwd_cnt=0xFFFFFF00 - 100))
    assert conn.peer_credit() == 9900
    # A guest whose fwd_cnt runs ahead of what we sent gets no credit at all.
    mux.guest_packet(hdr(P.OP_CREDIT_UPDATE, src_port=1024, dst_port=conn.host_port,
                         buf_alloc=10000, fwd_cnt=0xFFFFFF00 + 5))
    assert conn.peer_credit() == 0


def test_rw_from_guest_credit_and_overrun_reset():
    mux = Mux(GUEST, buf_alloc=8192)
    conn = host_connected(mux)
    p = dict(src_port=1024, dst_port=conn.host_port)
    mux.guest_packet(hdr(P.OP_RW, length=8000, **p), b"a" * 8000)
    assert len(conn.to_host) == 8000 and conn.our_free_space() == 192
    # A small drain is not worth a packet...
    conn.host_wrote(500)
    assert drain(mux) == []
    # ...a bigger one while the guest's view is low is: it hears before it runs dry.
    conn.host_wrote(4500)
    [upd] = drain(mux)
    assert upd.hdr.op == P.OP_CREDIT_UPDATE and upd.hdr.fwd_cnt == 5000
    assert upd.hdr.buf_alloc == 8192
    mux.guest_packet(hdr(P.OP_RW, length=5192, **p), b"b" * 5192)   # exactly the credit
    assert len(conn.to_host) == 8192
    mux.guest_packet(hdr(P.OP_RW, length=1, **p), b"c")             # one byte too many
    assert conn.closed and "overran" in conn.close_reason
    assert ops(drain(mux)) == ["RST"]
    assert conn.to_host == bytearray()


def test_credit_request_is_answered():
    mux = Mux(GUEST)
    conn = host_connected(mux)
    mux.guest_packet(hdr(P.OP_CREDIT_REQUEST, src_port=1024, dst_port=conn.host_port))
    [upd] = drain(mux)
    assert upd.hdr.op == P.OP_CREDIT_UPDATE and upd.hdr.buf_alloc == conn.buf_alloc


def test_orderly_close_guest_first():
    mux = Mux(GUEST)
    conn = host_connected(mux)
    p = dict(src_port=1024, dst_port=conn.host_port)
    mux.guest_packet(hdr(P.OP_RW, length=3, **p), b"bye")
    mux.guest_packet(hdr(P.OP_SHUTDOWN, flags=P.SHUTDOWN_MASK, **p))
    assert not conn.closed                  # "bye" still owed to the host
    assert not conn.wants_host_shutdown_write()
    conn.host_wrote(3)
    assert conn.closed and conn.close_reason == "closed"
    assert ops(drain(mux)) == ["RST"]


def test_half_close_each_way():
    mux = Mux(GUEST)
    conn = host_connected(mux)
    p = dict(src_port=1024, dst_port=conn.host_port)
    # Guest stops sending; host may still send.
    mux.guest_packet(hdr(P.OP_SHUTDOWN, flags=P.SHUTDOWN_SEND, **p))
    assert conn.wants_host_shutdown_write()
    conn.host_write_shutdown_done()
    assert conn.host_read_room() > 0
    conn.host_data(b"late data")
    mux.guest_packet(hdr(P.OP_RW, length=1, **p), b"x")    # data after SHUTDOWN SEND
    assert conn.closed and ops(drain(mux)) == ["RST"]

    conn = host_connected(mux)
    p = dict(src_port=1024, dst_port=conn.host_port)
    conn.host_data(b"last words")
    conn.host_eof_seen()
    assert conn.host_read_room() == 0
    pkts = drain(mux)
    assert ops(pkts) == ["RW", "SHUTDOWN"] and pkts[1].hdr.flags == P.SHUTDOWN_SEND
    assert not conn.closed                   # guest may still talk
    mux.guest_packet(hdr(P.OP_RW, length=2, **p), b"ok")
    assert bytes(conn.to_host) == b"ok"
    conn.host_wrote(2)
    mux.guest_packet(hdr(P.OP_SHUTDOWN, flags=P.SHUTDOWN_MASK, **p))
    assert conn.closed and ops(drain(mux)) == ["RST"]


def test_guest_shutdown_rcv_discards_host_data():
    mux = Mux(GUEST)
    conn = host_connected(mux)
    conn.host_data(b"zzz")
    mux.guest_packet(hdr(P.OP_SHUTDOWN, flags=P.SHUTDOWN_RCV, src_port=1024,
                         dst_port=conn.host_port))
    assert conn.host_read_room() == 0 and not conn.to_guest
    assert drain(mux) == []


def test_abrupt_close_both_sides():
    mux = Mux(GUEST)
    conn = host_connected(mux)
    conn.host_data(b"pending")
    conn.abort("host socket: Broken pipe")
    assert ops(drain(mux)) == ["RST"]            # pending data is not sent after RST
    conn = host_connected(mux)
    mux.guest_packet(hdr(P.OP_RST, src_port=1024, dst_port=conn.host_port))
    assert conn.closed and conn.close_reason == "reset by guest"
    assert drain(mux) == []


def test_unexpected_ops_reset():
    mux = Mux(GUEST)
    conn = mux.host_connect(1024)
    drain(mux)
    mux.guest_packet(hdr(P.OP_RW, src_port=1024, dst_port=conn.host_port, length=1), b"x")
    assert conn.closed and ops(drain(mux)) == ["RST"]
    conn = host_connected(mux)
    mux.guest_packet(hdr(P.OP_REQUEST, src_port=1024, dst_port=conn.host_port))
    assert conn.closed and ops(drain(mux)) == ["RST"]


def test_connection_limit_and_many_connections():
    mux = Mux(GUEST, connector=lambda p, c: True, max_connections=100)
    for i in range(100):
        mux.guest_packet(hdr(P.OP_REQUEST, src_port=10000 + i, dst_port=5000))
    assert len(mux.conns) == 100
    mux.guest_packet(hdr(P.OP_REQUEST, src_port=20000, dst_port=5000))
    assert len(mux.conns) == 100
    with pytest.raises(MuxFull):
        mux.host_connect(1024)
    pkts = drain(mux)
    assert ops(pkts).count("RESPONSE") == 100 and ops(pkts).count("RST") == 1
    # Data from all of them is interleaved fairly.
    for conn in mux.conns.values():
        conn.peer_buf_alloc = 1 << 20
        conn.host_data(b"d" * 10000)
    first = [p.hdr.dst_port for p in drain(mux)[:100]]
    assert len(set(first)) == 100


def test_control_backlog_is_bounded():
    mux = Mux(GUEST, max_control_backlog=10)
    for i in range(50):
        mux.guest_packet(hdr(P.OP_RW, src_port=i, length=0))
    assert len(drain(mux)) == 10 and mux.dropped_control == 40


def test_to_guest_is_bounded_by_read_room():
    mux = Mux(GUEST, buf_alloc=4096)
    conn = host_connected(mux)
    assert conn.host_read_room() == 4096
    conn.host_data(b"q" * 4096)
    assert conn.host_read_room() == 0
