"""Length-prefixed JSON frames.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON whose top level is an object. The length is capped so a peer that lies
about it cannot make us allocate without bound; the cap is checked before a
single payload byte is buffered.
"""

from __future__ import annotations

import json
import struct

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20  # 1 MiB: far above any legitimate control message


class FrameError(ValueError):
    """The byte stream broke framing: oversize, bad UTF-8, bad JSON, not an object."""


def encode_frame(message: dict, max_frame: int = MAX_FRAME) -> bytes:
    try:
        # allow_nan=False: NaN and Infinity are not JSON; the peer would refuse them.
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError("message holds a string that is not valid Unicode (a lone surrogate)") from None
    except ValueError as exc:
        raise FrameError(f"message cannot be sent as JSON: {exc}") from None
    except RecursionError:
        raise FrameError("message nested too deeply") from None
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


_INF = float("inf")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def decode_body(body: bytes) -> dict:
    """One frame's JSON object. Whatever the bytes, only FrameError escapes, and what
    comes back can be encoded again (encode_frame accepts it)."""
    try:
        text = body.decode("utf-8")
        # Python's json also takes NaN/Infinity and 1e999 (as inf); JSON has neither.
        message = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        if "\\u" in text:
            # A \uD800-style escape decodes to a lone surrogate, which no UTF-8
            # encoder takes: refuse it here rather than fail later when it is
            # logged, printed or sent on.
            json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"frame is not UTF-8: {exc.reason}") from None
    except UnicodeEncodeError:
        raise FrameError("frame holds a string that is not valid Unicode (a lone surrogate)") from None
    except RecursionError:
        raise FrameError("frame is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, and also plain ValueError: an integer of more than
        # sys.get_int_max_str_digits() digits, a NaN or an out-of-range number.
        raise FrameError(f"frame is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise FrameError(f"frame holds a JSON {type(message).__name__}, not an object")
    return message


def check_length(length: int, max_frame: int = MAX_FRAME) -> None:
    if length > max_frame:
        raise FrameError(f"peer announced a {length}-byte frame; the limit is {max_frame}")


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, get whole messages back.

    A framing error ends the stream: feed() raises it, and raises it again on every
    later call. Messages that arrived before the bad frame in the same feed() are
    returned first, and the error comes with the next call.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[dict]:
        if self._error is not None:
            raise self._error
        self._buf += data
        messages = []
        try:
            while len(self._buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buf)
                check_length(length, self.max_frame)
                end = HEADER.size + length
                if len(self._buf) < end:
                    break
                body = bytes(self._buf[HEADER.size:end])
                del self._buf[:end]
                messages.append(decode_body(body))
        except FrameError as exc:
            self._error = exc
            self._buf.clear()   # nothing after a framing error can be trusted
            if not messages:
                raise
        return messages

    @property
    def pending(self) -> int:
        return len(self._buf)


def _recv_exact(sock, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise EOFError("connection closed in the middle of a frame" if chunks else "connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock, max_frame: int = MAX_FRAME) -> dict:
    """Blocking read of one frame from a socket (the guest agent's side)."""
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    check_length(length, max_frame)
    return decode_body(_recv_exact(sock, length))


def send_frame(sock, message: dict, max_frame: int = MAX_FRAME) -> None:
    sock.sendall(encode_frame(message, max_frame))


async def read_frame(reader, max_frame: int = MAX_FRAME) -> dict:
    """asyncio read of one frame (the host's side). Raises EOFError on a clean close."""
    import asyncio

    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        raise EOFError("connection closed" if not exc.partial else "connection closed mid-header") from None
    (length,) = HEADER.unpack(header)
    check_length(length, max_frame)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise EOFError("connection closed in the middle of a frame") from None
    return decode_body(body)
