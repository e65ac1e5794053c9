"""virtio-vsock packet header (virtio 1.2 §5.10.6), little-endian, 44 bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size
assert HDR_SIZE == 44

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW",
            6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST"}

TYPE_STREAM = 1

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_MASK = SHUTDOWN_RCV | SHUTDOWN_SEND

HOST_CID = 2
# Linux never puts more than this in one packet; a bigger claim is a broken driver.
MAX_PKT_PAYLOAD = 64 * 1024


class PacketError(ValueError):
    pass


@dataclass(slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                        self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, buf) -> "Header":
        if len(buf) < HDR_SIZE:
            raise PacketError(f"vsock header truncated: {len(buf)} of {HDR_SIZE} bytes")
        return cls(*HDR.unpack_from(buf, 0))

    def describe(self) -> str:
        return (f"{OP_NAMES.get(self.op, self.op)} {self.src_cid}:{self.src_port}->"
                f"{self.dst_cid}:{self.dst_port} len={self.len} flags={self.flags} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}")


@dataclass(slots=True)
class Packet:
    hdr: Header
    payload: bytes = b""


def make(src_cid: int, dst_cid: int, src_port: int, dst_port: int, op: int, *,
         flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0,
         payload: bytes = b"") -> Packet:
    return Packet(Header(src_cid, dst_cid, src_port, dst_port, len(payload), TYPE_STREAM,
                         op, flags, buf_alloc & 0xFFFFFFFF, fwd_cnt & 0xFFFFFFFF), payload)
