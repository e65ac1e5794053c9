"""ttrpc framing: the 10-byte header, the 4 MiB cap, whole-frame reads and writes."""

from __future__ import annotations

import asyncio
import enum
import os
import struct
from typing import NamedTuple

from kata_py.shim.ttrpc.errors import FrameError

HEADER_LENGTH = 10
MAX_MESSAGE_LENGTH = 4 << 20
NAMESPACE_KEY = "containerd-namespace-ttrpc"  # containerd's namespaces.TTRPCHeader
_HEADER = struct.Struct(">IIBB")
_DISCARD_CHUNK = 64 << 10


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3  # streaming RPCs only; never sent here


class FrameHeader(NamedTuple):
    length: int
    stream_id: int
    type: int
    flags: int


def encode_header(length: int, stream_id: int, msg_type: int, flags: int = 0) -> bytes:
    return _HEADER.pack(length, stream_id, msg_type, flags)


def decode_header(data: bytes) -> FrameHeader:
    """Parse the 10 header bytes. The type is returned as sent; frame readers
    decide what an unknown type means."""
    if len(data) != HEADER_LENGTH:
        raise FrameError(f"ttrpc header is {HEADER_LENGTH} bytes, got {len(data)}")
    return FrameHeader(*_HEADER.unpack(data))


def oversized(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MAX_MESSAGE_LENGTH}"


async def read_frame(reader: asyncio.StreamReader) -> tuple[FrameHeader, bytes | None]:
    """One frame: (header, payload), or (header, None) when the payload was
    over the cap and has been read past without keeping it (bounded memory).

    Raises asyncio.IncompleteReadError at EOF (clean or mid-frame) and
    FrameError for a type outside the protocol."""
    hdr = decode_header(await reader.readexactly(HEADER_LENGTH))
    if hdr.type not in MessageType._value2member_map_:
        raise FrameError(f"ttrpc frame of unknown type {hdr.type} on stream {hdr.stream_id}")
    if hdr.length > MAX_MESSAGE_LENGTH:
        left = hdr.length
        while left:
            left -= len(await reader.readexactly(min(left, _DISCARD_CHUNK)))
        return hdr, None
    return hdr, await reader.readexactly(hdr.length)


class FrameWriter:
    """Whole frames onto one stream, one at a time (concurrent handlers answer
    on the same connection)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._lock = asyncio.Lock()

    async def send(self, stream_id: int, msg_type: MessageType, payload: bytes) -> None:
        async with self._lock:
            self._writer.write(encode_header(len(payload), stream_id, msg_type) + payload)
            await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def address(path: str | os.PathLike[str]) -> str:
    """A socket path; containerd's "unix://" form is accepted too."""
    text = os.fspath(path)
    return text.removeprefix("unix://")
