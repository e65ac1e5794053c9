"""The vhost-user-vsock back end: one thread, one selector.

It serves one QEMU front end on the vhost-user socket, the guest's two vhost queues
(kick eventfds in, call eventfds out), the hybrid vsock listener and every host-side
stream socket. It exits when QEMU closes the vhost-user connection, or on
SIGTERM/SIGINT.

Guest input is bounded everywhere: chains per tx round, bytes per packet (credit),
connections (Mux.max_connections), pending control packets, pending hybrid clients.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from . import hybrid
from . import packet as P
from .connection import Connection, Mux, MuxFull, State
from .packet import HDR_SIZE, Header
from .vhost_user import (GET_VRING_BASE, RESET_OWNER, RX_QUEUE, SET_VRING_KICK, TX_QUEUE,
                         VhostUserError, VhostUserVsock, recv_message)
from .virtqueue import ChainError, RingError, drain_eventfd, signal_eventfd

TX_BATCH = 256
HOST_READ_CHUNK = 64 * 1024
MAX_PENDING_CLIENTS = 128
LOG_LINES_PER_SEC = 50
LOG_LINE_MAX = 400


class RateLimitedLog:
    """One line per event to a stream, at most LOG_LINES_PER_SEC, each line bounded."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "vsock-backend",
                 per_sec: int = LOG_LINES_PER_SEC) -> None:
        self.stream = stream or sys.stderr
        self.prefix = prefix
        self.per_sec = per_sec
        self._window = 0
        self._count = 0
        self._suppressed = 0

    def __call__(self, msg: str) -> None:
        now = int(time.monotonic())
        if now != self._window:
            if self._suppressed:
                self._write(f"({self._suppressed} log lines suppressed)")
            self._window, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count > self.per_sec:
            self._suppressed += 1
            return
        self._write(msg)

    def _write(self, msg: str) -> None:
        msg = msg.replace("\n", " ")
        if len(msg) > LOG_LINE_MAX:
            msg = msg[:LOG_LINE_MAX] + "..."
        try:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {self.prefix}: {msg}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


@dataclass(eq=False)
class Endpoint:
    """The host side of one vsock connection."""
    sock: socket.socket
    prefix: bytearray = field(default_factory=bytearray)   # OK line not yet written
    early: bytes = b""                                      # bytes sent before OK
    mask: int = 0


class Backend:
    def __init__(self, vhost_listener: socket.socket, uds_listener: socket.socket,
                 uds_path: str, guest_cid: int, *, log: Callable[[str], None] | None = None,
                 max_connections: int = 1024, buf_alloc: int = 256 * 1024) -> None:
        self.log = log or RateLimitedLog()
        self.vhost_listener = vhost_listener
        self.uds_listener = uds_listener
        self.uds_path = uds_path
        self.guest_cid = guest_cid
        self.sel = selectors.DefaultSelector()
        self.vconn: socket.socket | None = None
        self.dev: VhostUserVsock | None = None
        self.session_seen = False
        self.mux = Mux(guest_cid, connector=self._connect_service, log=self.log,
                       max_connections=max_connections, buf_alloc=buf_alloc)
        self.clients: dict[socket.socket, hybrid.PendingClient] = {}
        self.kicks: dict[int, int] = {}          # registered kick fd -> queue index
        self.touched: set[Connection] = set()
        self.stopping = False
        self.tx_more = False
        # Set by the entry point: with no QEMU attached, nothing else would end us.
        self.parent_pid: int | None = None
        # Set by the entry point in a jail: host services are reached through it.
        self.broker: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (vhost_listener, uds_listener, self._wake_r, self._wake_w):
            s.setblocking(False)
        self.sel.register(vhost_listener, selectors.EVENT_READ, ("vhost-listen", None))
        self.sel.register(uds_listener, selectors.EVENT_READ, ("uds-listen", None))
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    # -- main loop ---------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def stop(signum, frame):
            self.stopping = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def run(self) -> int:
        self.log(f"started: guest cid {self.guest_cid}, hybrid socket {self.uds_path}")
        try:
            while not self.stopping:
                self.step(0.0 if self.tx_more else 1.0)
        finally:
            self.shutdown()
        return 0

    def step(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            kind, obj = key.data
            try:
                self._dispatch(kind, obj, key, mask)
            except VhostUserError as e:
                self.log(f"vhost-user session ended: {e}")
                self._end_session()
            except Exception as e:  # noqa: BLE001 - contain a bug to what it touched
                self.log(f"internal error on {kind}: {e!r}")
                if kind == "conn" and isinstance(obj, Connection):
                    obj.abort("internal error")
                    self.touched.add(obj)
                elif kind in ("vhost", "kick"):
                    self._end_session()
            if self.stopping:
                return
        if self.tx_more:
            self.tx_more = False
            self._process_tx()
        if (self.parent_pid is not None and self.vconn is None
                and os.getppid() != self.parent_pid):
            self.log("parent exited before QEMU connected; stopping")
            self.stopping = True
        now = time.monotonic()
        self.mux.expire(now)
        for sock, client in list(self.clients.items()):
            if now >= client.deadline:
                self.log("hybrid client sent no CONNECT line in time")
                self._drop_client(sock)
        self._settle()

    def _settle(self) -> None:
        """Move packets into rx buffers and bring every touched socket up to date."""
        for _ in range(4):
            self._pump_rx()
            touched, self.touched = self.touched, set()
            for conn in touched:
                self._sync(conn)
            self._reap()
            if not self.touched:
                break

    def _dispatch(self, kind: str, obj, key, mask: int) -> None:
        if kind == "vhost":
            self._vhost_readable()
        elif kind == "kick":
            self._kick(obj)
        elif kind == "conn":
            self._conn_event(obj, mask)
        elif kind == "client":
            self._client_readable(obj)
        elif kind == "uds-listen":
            self._accept_client()
        elif kind == "vhost-listen":
            self._accept_vhost()
        elif kind == "wake":
            try:
                self._wake_r.recv(64)
            except BlockingIOError:
                pass

    # -- vhost-user session -----------------------------------------------

    def _accept_vhost(self) -> None:
        try:
            sock, _ = self.vhost_listener.accept()
        except BlockingIOError:
            return
        if self.vconn is not None:
            self.log("refused a second vhost-user front end")
            sock.close()
            return
        sock.setblocking(True)
        # Blocking with a timeout: a message that has begun arriving must finish soon.
        sock.settimeout(5.0)
        self.vconn = sock
        self.dev = VhostUserVsock(self.guest_cid, log=self.log)
        self.session_seen = True
        self.sel.register(sock, selectors.EVENT_READ, ("vhost", None))
        self.log("vhost-user front end connected")

    def _vhost_readable(self) -> None:
        assert self.vconn is not None and self.dev is not None
        msg = recv_message(self.vconn)
        if msg is None:
            self.log("vhost-user front end closed the connection")
            self._end_session()
            return
        rings_change = msg.request in (SET_VRING_KICK, GET_VRING_BASE, RESET_OWNER)
        if rings_change:
            self._unwatch_kicks()
        try:
            reply = self.dev.handle(msg)
        except Exception as e:  # noqa: BLE001 - a bug must not take the guest down silently
            msg.close_fds()
            raise VhostUserError(f"internal error handling {msg.name}: {e!r}") from e
        if rings_change:
            self._watch_kicks()
        if reply is not None:
            try:
                self.vconn.sendall(reply)
            except OSError as e:
                raise VhostUserError(f"cannot reply: {e}") from None
        if self.dev.queue(TX_QUEUE) is not None:
            self._process_tx()

    def _unwatch_kicks(self) -> None:
        for fd in self.kicks:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self.kicks.clear()

    def _watch_kicks(self) -> None:
        assert self.dev is not None
        for vr in self.dev.vrings:
            if vr.kick_fd is not None and vr.started:
                self.sel.register(vr.kick_fd, selectors.EVENT_READ, ("kick", vr.index))
                self.kicks[vr.kick_fd] = vr.index

    def _end_session(self) -> None:
        if self.vconn is None:
            return
        self._unwatch_kicks()
        try:
            self.sel.unregister(self.vconn)
        except (KeyError, ValueError):
            pass
        self.vconn.close()
        self.vconn = None
        if self.dev is not None:
            self.dev.close()
            self.dev = None
        self.mux.reset_all("vhost-user session ended")
        self._reap()
        # One VM, one session: QEMU going away means the VM is gone.
        self.stopping = True

    def _kick(self, index: int) -> None:
        if self.dev is None:
            return
        vr = self.dev.vrings[index]
        if vr.kick_fd is not None:
            drain_eventfd(vr.kick_fd)
        if (not vr.enabled and not vr.enable_seen and vr.started
                and self.dev.protocol_features_on):
            # Front ends older than the vring-enable fix never send SET_VRING_ENABLE.
            self.log(f"vring {index} kicked without SET_VRING_ENABLE; enabling it")
            vr.enabled = True
        if index == TX_QUEUE:
            self._process_tx()
        # An rx kick means fresh rx buffers; _settle fills them.

    def _ring_error(self, index: int, e: Exception) -> None:
        assert self.dev is not None
        self.dev.vrings[index].broken = True
        self.log(f"vring {index} stopped: {e}")

    def _signal(self, index: int) -> None:
        assert self.dev is not None
        vr = self.dev.vrings[index]
        q = vr.queue
        if q is not None and q.flush_used() and q.should_signal():
            signal_eventfd(vr.call_fd)

    # -- guest -> host -----------------------------------------------------

    def _process_tx(self) -> None:
        if self.dev is None:
            return
        q = self.dev.queue(TX_QUEUE)
        if q is None:
            return
        done = 0
        try:
            while done < TX_BATCH:
                try:
                    chain = q.pop()
                except ChainError as e:
                    self.log(f"tx: bad descriptor chain: {e}")
                    q.push_used(e.head, 0)
                    done += 1
                    continue
                if chain is None:
                    break
                done += 1
                data = chain.read(HDR_SIZE + P.MAX_PKT_PAYLOAD)
                total = chain.readable_len
                chain.release()
                q.push_used(chain.head, 0)
                self._tx_packet(data, total)
            else:
                self.tx_more = True
        except RingError as e:
            self._ring_error(TX_QUEUE, e)
        finally:
            self._signal(TX_QUEUE)

    def _tx_packet(self, data: bytes, total: int) -> None:
        if len(data) < HDR_SIZE:
            self.log(f"tx: packet of {len(data)} bytes is shorter than a header")
            return
        hdr = Header.unpack(data)
        if hdr.op == P.OP_RW:
            if hdr.len > len(data) - HDR_SIZE:
                self.log(f"tx: header claims {hdr.len} bytes, chain holds "
                         f"{total - HDR_SIZE}: {hdr.describe()}")
                conn = self.mux.conns.get((hdr.dst_port, hdr.src_port))
                if conn is not None and hdr.src_cid == self.guest_cid:
                    conn.reset("malformed packet")
                    self.touched.add(conn)
                return
            payload = memoryview(data)[HDR_SIZE:HDR_SIZE + hdr.len]
        else:
            payload = b""
        conn = self.mux.guest_packet(hdr, payload)
        if conn is not None:
            self.touched.add(conn)

    # -- host -> guest -----------------------------------------------------

    def _pump_rx(self) -> None:
        if self.dev is None:
            return
        q = self.dev.queue(RX_QUEUE)
        if q is None:
            return
        mux = self.mux
        try:
            while mux.has_packet():
                try:
                    chain = q.pop()
                except ChainError as e:
                    self.log(f"rx: bad descriptor chain: {e}")
                    q.push_used(e.head, 0)
                    continue
                if chain is None:
                    break
                if chain.writable_len < HDR_SIZE:
                    self.log(f"rx: buffer of {chain.writable_len} bytes cannot hold a header")
                    chain.release()
                    q.push_used(chain.head, 0)
                    continue
                pkt = mux.next_packet(chain.writable_len - HDR_SIZE)
                if pkt is None:
                    chain.release()
                    q.unpop()
                    break
                conn = mux.conns.get((pkt.hdr.src_port, pkt.hdr.dst_port))
                try:
                    n = chain.write(pkt.hdr.pack(), pkt.payload)
                except ChainError as e:
                    # next_packet sizes the payload to the buffer, so this is our bug;
                    # the buffer still goes back, and the stream that lost a packet is
                    # reset rather than left with a hole in it.
                    self.log(f"rx: packet does not fit its buffer: {e}")
                    n = 0
                    if conn is not None:
                        conn.reset("internal error: rx packet lost")
                finally:
                    chain.release()
                q.push_used(chain.head, n)
                if conn is not None:
                    self.touched.add(conn)
        except RingError as e:
            self._ring_error(RX_QUEUE, e)
        finally:
            self._signal(RX_QUEUE)

    # -- host sockets ------------------------------------------------------

    def _connect_service(self, port: int, conn: Connection) -> bool:
        if self.broker is not None:
            sock = hybrid.connect_through(self.broker, port)
        else:
            sock = hybrid.connect_service(self.uds_path, port)
        if sock is None:
            self.log(f"guest connect to host port {port}: nobody listens at "
                     f"{hybrid.service_path(self.uds_path, port)}")
            return False
        conn.endpoint = Endpoint(sock)
        self.touched.add(conn)
        self.log(f"guest connected to host port {port} (guest port {conn.guest_port})")
        return True

    def _conn_event(self, conn: Connection, mask: int) -> None:
        ep: Endpoint | None = conn.endpoint
        if ep is None or conn.closed:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush_host(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            room = conn.host_read_room()
            if room > 0:
                try:
                    data = ep.sock.recv(min(room, HOST_READ_CHUNK))
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError as e:
                    conn.abort(f"host socket: {e.strerror}")
                    data = None
                if data == b"":
                    conn.host_eof_seen()
                elif data:
                    conn.host_data(data)
        self.touched.add(conn)

    def _flush_host(self, conn: Connection) -> None:
        ep: Endpoint = conn.endpoint
        try:
            while ep.prefix:
                n = ep.sock.send(ep.prefix)
                del ep.prefix[:n]
            while conn.to_host:
                n = ep.sock.send(conn.to_host)
                conn.host_wrote(n)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            conn.abort(f"host socket: {e.strerror or e}")

    def _sync(self, conn: Connection) -> None:
        ep: Endpoint | None = conn.endpoint
        if ep is None or conn.closed:
            return
        if conn.state is State.CONNECTED and conn.host_initiated and not conn.announced:
            conn.announced = True
            ep.prefix += hybrid.ok_line(conn.host_port)
            self.log(f"host connected to guest port {conn.guest_port} "
                     f"(host port {conn.host_port})")
            if ep.early:
                conn.host_data(ep.early)
                ep.early = b""
        if ep.prefix or conn.to_host:
            self._flush_host(conn)
        if conn.closed:
            return
        if conn.wants_host_shutdown_write():
            try:
                ep.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.host_write_shutdown_done()
        mask = 0
        if conn.host_read_room() > 0:
            mask |= selectors.EVENT_READ
        if ep.prefix or conn.to_host:
            mask |= selectors.EVENT_WRITE
        if mask != ep.mask:
            if ep.mask == 0:
                self.sel.register(ep.sock, mask, ("conn", conn))
            elif mask == 0:
                self.sel.unregister(ep.sock)
            else:
                self.sel.modify(ep.sock, mask, ("conn", conn))
            ep.mask = mask

    def _reap(self) -> None:
        for conn in self.mux.take_closed():
            self.touched.discard(conn)
            ep: Endpoint | None = conn.endpoint
            self.log(f"{conn!r} closed: {conn.close_reason}")
            if ep is None:
                continue
            if ep.mask:
                try:
                    self.sel.unregister(ep.sock)
                except (KeyError, ValueError):
                    pass
                ep.mask = 0
            ep.sock.close()
            conn.endpoint = None

    # -- hybrid clients ----------------------------------------------------

    def _accept_client(self) -> None:
        for _ in range(16):
            try:
                sock, _ = self.uds_listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.log(f"hybrid accept: {e.strerror}")
                return
            if len(self.clients) >= MAX_PENDING_CLIENTS:
                self.log("too many hybrid clients mid-handshake; dropped one")
                sock.close()
                continue
            sock.setblocking(False)
            self.clients[sock] = hybrid.PendingClient(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("client", sock))

    def _drop_client(self, sock: socket.socket) -> None:
        self.clients.pop(sock, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _client_readable(self, sock: socket.socket) -> None:
        client = self.clients.get(sock)
        if client is None:
            return
        try:
            data = sock.recv(client.room())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            done = client.feed(data)
        except hybrid.HybridError as e:
            self.log(f"hybrid client rejected: {e}")
            self._drop_client(sock)
            return
        if done is None:
            return
        port, early = done
        self.clients.pop(sock)
        self.sel.unregister(sock)
        try:
            conn = self.mux.host_connect(port)
        except (MuxFull, ValueError) as e:
            self.log(f"hybrid connect to guest port {port} refused: {e}")
            sock.close()
            return
        conn.endpoint = Endpoint(sock, early=early)
        self.touched.add(conn)

    # -- teardown ----------------------------------------------------------

    def shutdown(self) -> None:
        self._end_session()
        self.mux.reset_all("backend stopping")
        self._reap()
        for sock in list(self.clients):
            self._drop_client(sock)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self.log("stopped")
