"""One JSON object per line on the Unix sockets of the VM pool (the factory
and its standbys), bounded: what the pool client and the factory both speak."""

from __future__ import annotations

import json
import socket

MAX_LINE = 64 * 1024


class WireError(Exception):
    pass


def encode(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict:
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise WireError("a message line is too long or cut short")
    try:
        message = json.loads(line)
    except ValueError as err:
        raise WireError("a message is not JSON") from err
    if not isinstance(message, dict):
        raise WireError("a message is not a JSON object")
    return message


def recv_line(sock: socket.socket) -> bytes:
    """Read up to and including a newline (blocking, honouring the socket's timeout)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            break
    return data


def call(path: str, message: dict, timeout: float) -> tuple[socket.socket, dict]:
    """Connect, send one message, read one reply; the socket stays open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode(message))
        return sock, decode(recv_line(sock))
    except BaseException:
        sock.close()
        raise


async def read_message(reader) -> dict:
    line = await reader.readline()
    return decode(line)
