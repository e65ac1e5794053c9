"""vsock stream connections between the host (CID 2) and one guest, without any I/O.

A Connection holds the protocol state of one stream: who connected, shutdown flags
each way, the credit both sides grant (virtio 1.2 §5.10.6.3), the bytes waiting for the
host endpoint and the bytes waiting to go to the guest. The Mux routes guest packets to
connections, opens new ones, and decides which packet goes into the next rx buffer.
The caller does the socket work and tells the connection what happened
(host_data, host_wrote, host_eof, abort), then looks at its state.

Credit: the guest may have at most `buf_alloc` bytes in flight to us; since every byte
we have received but not yet written to the host is in `to_host`, a packet that would
push `to_host` past `buf_alloc` means the guest ignored our credit, and the connection
is reset rather than buffered without bound. Toward the guest we never send more than
peer_buf_alloc - (tx_cnt - peer_fwd_cnt), computed modulo 2**32 as the counters wrap.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import Any, Callable

from . import packet as P
from .packet import Header, Packet

DEFAULT_BUF_ALLOC = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONTROL_BACKLOG = 4096
CONNECT_TIMEOUT = 10.0
# How long a closing connection may wait for its host end to take the last bytes.
CLOSE_LINGER = 30.0
U32 = 0xFFFFFFFF


class State(enum.Enum):
    CONNECTING = "connecting"      # host sent REQUEST, waiting for RESPONSE
    CONNECTED = "connected"
    CLOSED = "closed"


class Connection:
    def __init__(self, guest_cid: int, host_port: int, guest_port: int, *,
                 host_initiated: bool, buf_alloc: int = DEFAULT_BUF_ALLOC,
                 to_guest_limit: int | None = None,
                 notify: Callable[["Connection"], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.guest_cid = guest_cid
        self.host_port = host_port
        self.guest_port = guest_port
        self.host_initiated = host_initiated
        self.state = State.CONNECTING
        self.close_reason = ""
        self._notify = notify or (lambda c: None)
        self._clock = clock
        self.deadline: float | None = None
        # The I/O side hangs its socket and bookkeeping here.
        self.endpoint: Any = None
        self.announced = False

        # guest -> host
        self.buf_alloc = buf_alloc
        self.to_host = bytearray()
        self.rx_cnt = 0             # payload bytes received from the guest
        self.fwd_cnt = 0            # of those, bytes handed to the host endpoint
        self._adv_fwd_cnt = 0       # fwd_cnt the guest last heard from us
        # host -> guest
        self.to_guest = bytearray()
        self.to_guest_limit = to_guest_limit if to_guest_limit is not None else buf_alloc
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self._credit_requested = False

        self.guest_shut = 0         # SHUTDOWN flags the guest sent us
        self.host_eof = False       # host endpoint will send nothing more
        self.host_write_shut = False
        self._shutdown_sent = 0
        self._ctrl: deque[Packet] = deque()

    # -- helpers -----------------------------------------------------------

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def __repr__(self) -> str:
        return (f"<vsock {P.HOST_CID}:{self.host_port}<->{self.guest_cid}:{self.guest_port}"
                f" {self.state.value}>")

    def _pkt(self, op: int, flags: int = 0, payload: bytes = b"") -> Packet:
        self._adv_fwd_cnt = self.fwd_cnt
        return P.make(P.HOST_CID, self.guest_cid, self.host_port, self.guest_port, op,
                      flags=flags, buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt,
                      payload=payload)

    def _queue(self, op: int, flags: int = 0) -> None:
        self._ctrl.append(self._pkt(op, flags))
        self._notify(self)

    def peer_credit(self) -> int:
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def our_free_space(self) -> int:
        return self.buf_alloc - len(self.to_host)

    # -- opening -----------------------------------------------------------

    def start_connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Host-initiated: ask the guest for the connection."""
        self.deadline = self._clock() + timeout
        self._queue(P.OP_REQUEST)

    def accept(self) -> None:
        """Guest-initiated: the host endpoint is there, tell the guest."""
        self.state = State.CONNECTED
        self._queue(P.OP_RESPONSE)

    # -- closing -----------------------------------------------------------

    def reset(self, reason: str) -> None:
        """Abrupt close from our side: RST to the guest, drop buffered data."""
        if self.closed:
            return
        self._ctrl.clear()
        self._ctrl.append(self._pkt(P.OP_RST))
        self._close(reason)
        self._notify(self)

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self.close_reason = self.close_reason or reason
        self.to_host.clear()
        self.to_guest.clear()
        self.deadline = None

    def _maybe_finish(self) -> None:
        """Both directions done: finish with RST, as Linux expects from a peer."""
        if self.state is not State.CONNECTED:
            return
        guest_done = bool(self.guest_shut & P.SHUTDOWN_SEND) and not self.to_host
        host_done = (bool(self.guest_shut & P.SHUTDOWN_RCV) or
                     (self.host_eof and not self.to_guest
                      and bool(self._shutdown_sent & P.SHUTDOWN_SEND)))
        if guest_done and host_done:
            self._ctrl.append(self._pkt(P.OP_RST))
            self._close("closed")
            self._notify(self)

    def expire(self, now: float) -> bool:
        """Enforce connect and linger deadlines; True if the connection timed out."""
        if self.deadline is None or now < self.deadline or self.closed:
            return False
        self.reset("connect timed out" if self.state is State.CONNECTING
                   else "close timed out")
        return True

    # -- guest packets -----------------------------------------------------

    def on_guest_packet(self, hdr: Header, payload: bytes = b"") -> None:
        if self.closed:
            return
        # Every header carries the sender's current credit.
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        op = hdr.op
        if op == P.OP_RST:
            self._ctrl.clear()
            self._close("refused by guest" if self.state is State.CONNECTING
                        else "reset by guest")
            self._notify(self)
            return
        if self.state is State.CONNECTING:
            if op == P.OP_RESPONSE:
                self.state = State.CONNECTED
                self.deadline = None
                self._credit_changed()
            else:
                self.reset(f"unexpected {P.OP_NAMES.get(op, op)} while connecting")
            return
        if op == P.OP_RW:
            self._guest_data(payload)
        elif op == P.OP_CREDIT_UPDATE:
            self._credit_changed()
        elif op == P.OP_CREDIT_REQUEST:
            self._queue(P.OP_CREDIT_UPDATE)
            self._credit_changed()
        elif op == P.OP_SHUTDOWN:
            self._credit_changed()
            self.guest_shut |= hdr.flags & P.SHUTDOWN_MASK
            if self.guest_shut & P.SHUTDOWN_RCV:
                self.to_guest.clear()
            if self.guest_shut == P.SHUTDOWN_MASK and self.to_host:
                # The guest has closed; only our delivery to the host is left.
                self.deadline = self._clock() + CLOSE_LINGER
            self._maybe_finish()
            self._notify(self)
        else:
            self.reset(f"unexpected {P.OP_NAMES.get(op, op)} on an open connection")

    def _guest_data(self, payload: bytes) -> None:
        self._credit_changed()
        if self.guest_shut & P.SHUTDOWN_SEND:
            self.reset("data after the guest shut down sending")
            return
        if len(payload) > self.our_free_space():
            self.reset(f"guest overran its credit ({len(payload)} bytes, "
                       f"{self.our_free_space()} free)")
            return
        if self.host_write_shut:
            return
        self.to_host += payload
        self.rx_cnt = (self.rx_cnt + len(payload)) & U32
        self._notify(self)

    def _credit_changed(self) -> None:
        self._credit_requested = False
        if self.to_guest and self.peer_credit() > 0:
            self._notify(self)

    # -- host side events --------------------------------------------------

    def host_read_room(self) -> int:
        """How many bytes the host endpoint may hand us now."""
        if (self.state is not State.CONNECTED or self.host_eof
                or self.guest_shut & P.SHUTDOWN_RCV):
            return 0
        return max(0, self.to_guest_limit - len(self.to_guest))

    def host_data(self, data) -> None:
        if not data or self.state is not State.CONNECTED or self.guest_shut & P.SHUTDOWN_RCV:
            return
        self.to_guest += data
        self._notify(self)

    def host_wrote(self, n: int) -> None:
        """The host endpoint accepted the first `n` bytes of to_host."""
        if n <= 0:
            return
        del self.to_host[:n]
        self.fwd_cnt = (self.fwd_cnt + n) & U32
        # The guest sees buf_alloc - (rx_cnt - adv_fwd_cnt) free; refresh its view
        # before it runs dry so the stream does not stall on a round trip.
        # A tiny increment is not worth a packet unless the buffer is now empty.
        seen_free = self.buf_alloc - ((self.rx_cnt - self._adv_fwd_cnt) & U32)
        unannounced = (self.fwd_cnt - self._adv_fwd_cnt) & U32
        if (unannounced and seen_free < self.buf_alloc // 2
                and (unannounced >= self.buf_alloc // 8 or not self.to_host)
                and self.state is State.CONNECTED and not self.guest_shut & P.SHUTDOWN_SEND):
            self._queue(P.OP_CREDIT_UPDATE)
        self._maybe_finish()

    def wants_host_shutdown_write(self) -> bool:
        return (self.state is State.CONNECTED and bool(self.guest_shut & P.SHUTDOWN_SEND)
                and not self.to_host and not self.host_write_shut)

    def host_write_shutdown_done(self) -> None:
        self.host_write_shut = True

    def host_eof_seen(self) -> None:
        """The host endpoint will send nothing more (EOF on read)."""
        if self.closed or self.host_eof:
            return
        self.host_eof = True
        self._notify(self)

    def abort(self, reason: str) -> None:
        """The host endpoint failed or vanished."""
        self.reset(reason)

    # -- packets to the guest ---------------------------------------------

    def has_packet(self) -> bool:
        if self._ctrl:
            return True
        if self.state is not State.CONNECTED:
            return False
        if self.to_guest:
            return self.peer_credit() > 0 or not self._credit_requested
        return self.host_eof and not self._shutdown_sent & P.SHUTDOWN_SEND

    def next_packet(self, max_payload: int) -> Packet | None:
        if self._ctrl:
            return self._ctrl.popleft()
        if self.state is not State.CONNECTED:
            return None
        if self.to_guest:
            n = min(len(self.to_guest), self.peer_credit(), max_payload, P.MAX_PKT_PAYLOAD)
            if n <= 0:
                if self.peer_credit() == 0 and not self._credit_requested:
                    self._credit_requested = True
                    return self._pkt(P.OP_CREDIT_REQUEST)
                return None
            data = bytes(self.to_guest[:n])
            del self.to_guest[:n]
            self.tx_cnt = (self.tx_cnt + n) & U32
            return self._pkt(P.OP_RW, payload=data)
        if self.host_eof and not self._shutdown_sent & P.SHUTDOWN_SEND:
            self._shutdown_sent |= P.SHUTDOWN_SEND
            pkt = self._pkt(P.OP_SHUTDOWN, P.SHUTDOWN_SEND)
            self._maybe_finish()
            return pkt
        return None

    def take_control(self) -> list[Packet]:
        out = list(self._ctrl)
        self._ctrl.clear()
        return out


class MuxFull(Exception):
    pass


class Mux:
    """All connections of one guest, and the order their packets reach it."""

    def __init__(self, guest_cid: int, *,
                 connector: Callable[[int, Connection], bool] | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 buf_alloc: int = DEFAULT_BUF_ALLOC,
                 max_control_backlog: int = DEFAULT_MAX_CONTROL_BACKLOG,
                 log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.guest_cid = guest_cid
        # connector(port, conn) opens the host end for a guest connect to CID 2 `port`;
        # it sets conn.endpoint and returns True, or returns False to refuse.
        self.connector = connector or (lambda port, conn: False)
        self.max_connections = max_connections
        self.buf_alloc = buf_alloc
        self.max_control_backlog = max_control_backlog
        self.log = log or (lambda msg: None)
        self.clock = clock
        self.conns: dict[tuple[int, int], Connection] = {}
        self._ready: deque[Connection] = deque()
        self._in_ready: set[int] = set()
        self._ctrl: deque[Packet] = deque()
        self._next_port = 1024
        self.closed: list[Connection] = []
        self.dropped_control = 0

    # -- bookkeeping -------------------------------------------------------

    def _mark(self, conn: Connection) -> None:
        if conn.closed:
            self._retire(conn)
            return
        if id(conn) not in self._in_ready:
            self._in_ready.add(id(conn))
            self._ready.append(conn)

    def _retire(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            for pkt in conn.take_control():
                self._control(pkt)
            self.closed.append(conn)

    def _control(self, pkt: Packet) -> None:
        if len(self._ctrl) >= self.max_control_backlog:
            # Only a guest that floods while posting no rx buffers gets here.
            self.dropped_control += 1
            if self.dropped_control in (1, 100, 10000):
                self.log(f"rx control backlog full, dropped {self.dropped_control} packets")
            return
        self._ctrl.append(pkt)

    def _new(self, host_port: int, guest_port: int, host_initiated: bool) -> Connection:
        conn = Connection(self.guest_cid, host_port, guest_port,
                          host_initiated=host_initiated, buf_alloc=self.buf_alloc,
                          notify=self._mark, clock=self.clock)
        self.conns[conn.key] = conn
        return conn

    def take_closed(self) -> list[Connection]:
        out, self.closed = self.closed, []
        return out

    def _rst_reply(self, hdr: Header) -> None:
        if hdr.op == P.OP_RST:
            return
        self._control(P.make(P.HOST_CID, self.guest_cid, hdr.dst_port, hdr.src_port,
                             P.OP_RST))

    # -- host side ---------------------------------------------------------

    def _alloc_port(self) -> int:
        used = {c.host_port for c in self.conns.values()}
        for _ in range(len(used) + 1):
            port = self._next_port
            self._next_port = port + 1 if port < U32 else 1024
            if port not in used:
                return port
        raise MuxFull("no free host port")

    def host_connect(self, guest_port: int, timeout: float = CONNECT_TIMEOUT) -> Connection:
        if not 0 <= guest_port <= U32:
            raise ValueError(f"bad port {guest_port}")
        if len(self.conns) >= self.max_connections:
            raise MuxFull(f"{len(self.conns)} connections open")
        conn = self._new(self._alloc_port(), guest_port, True)
        conn.start_connect(timeout)
        return conn

    # -- guest side --------------------------------------------------------

    def guest_packet(self, hdr: Header, payload: bytes = b"") -> Connection | None:
        """Route one packet from the guest; returns the connection it touched."""
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != P.HOST_CID:
            self.log(f"dropped packet with bad address: {hdr.describe()}")
            return None
        if hdr.type != P.TYPE_STREAM or hdr.op not in P.OP_NAMES:
            self.log(f"unsupported packet, reset: {hdr.describe()}")
            self._rst_reply(hdr)
            conn = self.conns.get((hdr.dst_port, hdr.src_port))
            if conn is not None:
                conn.reset("unsupported packet")
            return conn
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == P.OP_REQUEST:
                return self._guest_connect(hdr)
            self._rst_reply(hdr)
            return None
        if hdr.op == P.OP_REQUEST:
            conn.reset("duplicate REQUEST")
            return conn
        conn.on_guest_packet(hdr, payload)
        if conn.closed:
            self._retire(conn)
        return conn

    def _guest_connect(self, hdr: Header) -> Connection | None:
        if len(self.conns) >= self.max_connections:
            self.log(f"refused guest connect to port {hdr.dst_port}: "
                     f"{len(self.conns)} connections open")
            self._rst_reply(hdr)
            return None
        conn = self._new(hdr.dst_port, hdr.src_port, False)
        conn.peer_buf_alloc = hdr.buf_alloc
        conn.peer_fwd_cnt = hdr.fwd_cnt
        try:
            ok = self.connector(hdr.dst_port, conn)
        except Exception as e:  # noqa: BLE001 - a failed connect is a refusal
            self.log(f"guest connect to port {hdr.dst_port} failed: {e}")
            ok = False
        if ok:
            conn.accept()
        else:
            del self.conns[conn.key]
            self._rst_reply(hdr)
            return None
        return conn

    # -- scheduling of rx packets -----------------------------------------

    def has_packet(self) -> bool:
        if self._ctrl:
            return True
        for _ in range(len(self._ready)):
            conn = self._ready[0]
            if conn.has_packet() and not conn.closed:
                return True
            self._ready.popleft()
            self._in_ready.discard(id(conn))
        return False

    def next_packet(self, max_payload: int) -> Packet | None:
        """The next packet for an rx buffer of max_payload payload bytes, or None."""
        if self._ctrl:
            return self._ctrl.popleft()
        for _ in range(len(self._ready)):
            conn = self._ready.popleft()
            self._in_ready.discard(id(conn))
            if conn.closed:
                continue
            pkt = conn.next_packet(max_payload)
            if conn.closed:
                self._retire(conn)
            elif conn.has_packet():
                self._in_ready.add(id(conn))
                self._ready.append(conn)
            if pkt is not None:
                return pkt
        return None

    def expire(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for conn in [c for c in self.conns.values() if c.deadline is not None]:
            if conn.expire(now):
                self.log(f"{conn!r}: {conn.close_reason}")
                self._retire(conn)

    def reset_all(self, reason: str) -> None:
        for conn in list(self.conns.values()):
            conn.reset(reason)
            self._retire(conn)
