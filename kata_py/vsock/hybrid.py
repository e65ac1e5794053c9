"""Firecracker's hybrid vsock contract on Unix sockets.

Host to guest: a client connects to the hybrid socket and writes `CONNECT <port>\\n`;
once the guest accepts, it reads `OK <hostport>\\n` and from then on the socket is the
stream. If nobody listens on that guest port, the socket is closed.
Guest to host: a guest connect to CID 2 port P is served by connecting to the Unix
socket `<uds_path>_P`; if nothing listens there, the guest gets RST.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import time

MAX_LINE = 64
CLIENT_LINE_TIMEOUT = 10.0
_CONNECT_RE = re.compile(rb"CONNECT ([0-9]{1,10})\r?\n")
_OK_RE = re.compile(rb"OK ([0-9]{1,10})\r?\n")
U32 = 0xFFFFFFFF


class HybridError(ValueError):
    pass


def parse_connect_line(line: bytes) -> int:
    """The port of a `CONNECT <port>\\n` line (newline included)."""
    m = _CONNECT_RE.fullmatch(line)
    if m is None:
        raise HybridError(f"bad hybrid vsock request {line[:MAX_LINE]!r}")
    port = int(m.group(1))
    if port > U32:
        raise HybridError(f"port {port} out of range")
    return port


def connect_line(port: int) -> bytes:
    if not 0 <= port <= U32:
        raise HybridError(f"port {port} out of range")
    return b"CONNECT %d\n" % port


def ok_line(host_port: int) -> bytes:
    return b"OK %d\n" % host_port


def parse_ok_line(line: bytes) -> int:
    m = _OK_RE.fullmatch(line)
    if m is None:
        raise HybridError(f"unexpected hybrid vsock answer {line[:MAX_LINE]!r}")
    return int(m.group(1))


class PendingClient:
    """A host client that has connected but not yet finished its CONNECT line."""

    def __init__(self, sock: socket.socket, now: float | None = None) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.deadline = (time.monotonic() if now is None else now) + CLIENT_LINE_TIMEOUT

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        """Add received bytes; (port, bytes after the line) once the line is complete.

        Raises HybridError for junk, an overlong line, or EOF before the newline.
        """
        if not data:
            raise HybridError("client closed before sending CONNECT")
        self.buf += data
        nl = self.buf.find(b"\n")
        if nl < 0:
            if len(self.buf) >= MAX_LINE:
                raise HybridError("CONNECT line too long")
            if not b"CONNECT ".startswith(bytes(self.buf[:8])):
                raise HybridError(f"bad hybrid vsock request {bytes(self.buf)!r}")
            return None
        if nl + 1 > MAX_LINE:
            raise HybridError("CONNECT line too long")
        port = parse_connect_line(bytes(self.buf[:nl + 1]))
        return port, bytes(self.buf[nl + 1:])

    def room(self) -> int:
        return max(1, MAX_LINE - len(self.buf))


def service_path(uds_path: str, port: int) -> str:
    return f"{uds_path}_{port}"


# A back end in a jail reaches the host services through a broker outside it
# (kata_py/sandbox/vsock_jail.py): it sends the port, 4 bytes, and gets the
# port back with the connected socket as an fd, or the port alone if nobody
# listens. The broker connects to service_path() only: the port is all the
# back end can choose.
BROKER_REQUEST = struct.Struct("<I")
BROKER_TIMEOUT = 1.0


def connect_through(broker: socket.socket, port: int) -> socket.socket | None:
    """connect_service() by way of the broker; None if nobody listens or the
    broker did not answer within BROKER_TIMEOUT."""
    deadline = time.monotonic() + BROKER_TIMEOUT
    try:
        broker.settimeout(BROKER_TIMEOUT)
        broker.send(BROKER_REQUEST.pack(port))
        while True:
            broker.settimeout(max(0.001, deadline - time.monotonic()))
            data, fds, _, _ = socket.recv_fds(broker, BROKER_REQUEST.size, 1)
            if not data:
                return None
            if len(data) == BROKER_REQUEST.size and BROKER_REQUEST.unpack(data)[0] == port:
                break
            for fd in fds:      # the late answer to an earlier request that timed out
                os.close(fd)
    except OSError:
        return None
    if not fds:
        return None
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock


def connect_service(uds_path: str, port: int) -> socket.socket | None:
    """Connect to the host service for guest port `port`; None if nobody listens."""
    path = service_path(uds_path, port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTSOCK,
                       errno.EACCES, errno.ENAMETOOLONG, errno.ENOTDIR):
            return None
        raise
    return sock
