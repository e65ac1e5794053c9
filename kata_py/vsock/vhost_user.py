"""The back-end half of the vhost-user protocol (qemu docs/interop/vhost-user.rst),
as QEMU's vhost-user-vsock devices drive it.

QEMU is the front end: it sends a 12-byte header (request, flags, size), a payload and
sometimes file descriptors (SCM_RIGHTS) for guest memory and the kick/call eventfds.
Two vhost queues exist: 0 carries host->guest packets (rx), 1 guest->host (tx); the
event queue stays inside QEMU. The device config is virtio_vsock_config, which QEMU
reads with GET_CONFIG while realizing the device, so the CONFIG protocol feature is
mandatory here.

Every size is checked before use; fds that a message does not keep are closed at once.
A malformed or unknown message is logged and answered with a failure when QEMU asked
for an answer; a message that breaks the framing ends the session.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

from .memory import GuestMemory, GuestMemoryError, MAX_REGIONS
from .virtqueue import MAX_QUEUE_SIZE, RingError, VirtQueue

# Front-end requests.
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25

REQUEST_NAMES = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK",
    13: "SET_VRING_CALL", 14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES",
    16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE",
    24: "GET_CONFIG", 25: "SET_CONFIG",
}

FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
OFFERED_FEATURES = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES

PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
OFFERED_PROTOCOL_FEATURES = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF

NUM_QUEUES = 2
RX_QUEUE = 0
TX_QUEUE = 1

HDR = struct.Struct("<III")
HDR_SIZE = HDR.size
# The largest legitimate payload is GET/SET_CONFIG: 12 bytes + 256 bytes of config.
MAX_PAYLOAD = 4096
MAX_FDS = 8
CONFIG_HDR = struct.Struct("<III")
MAX_CONFIG_SIZE = 256
MEM_REGION = struct.Struct("<QQQQ")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
U64 = struct.Struct("<Q")
# How long a message that has started arriving may take to finish.
BODY_TIMEOUT = 5.0


class VhostUserError(Exception):
    """The session cannot go on (framing broken, peer gone)."""


class MessageError(Exception):
    """One message was malformed or refused; the session goes on."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.request, f"request {self.request}")

    def close_fds(self) -> None:
        for fd in self.fds:
            _close(fd)
        self.fds = []


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _fds_from_ancillary(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    return fds


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise VhostUserError("front end stalled in the middle of a message") from None
        except InterruptedError:
            continue
        if not chunk:
            raise VhostUserError("front end closed the socket in the middle of a message")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message | None:
    """Read one message; None on a clean EOF between messages."""
    fds: list[int] = []
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(HDR_SIZE, socket.CMSG_SPACE(MAX_FDS * 4))
    except (ConnectionResetError, BrokenPipeError):
        return None
    except socket.timeout:
        raise VhostUserError("front end stalled") from None
    fds = _fds_from_ancillary(ancdata)
    try:
        if not data:
            return None
        if msg_flags & socket.MSG_CTRUNC:
            raise VhostUserError(f"more than {MAX_FDS} fds or truncated ancillary data")
        if len(data) < HDR_SIZE:
            data += _recv_exact(sock, HDR_SIZE - len(data))
        request, flags, size = HDR.unpack(data)
        if flags & FLAG_VERSION_MASK != FLAG_VERSION:
            raise VhostUserError(f"unsupported vhost-user version in flags {flags:#x}")
        if size > MAX_PAYLOAD:
            raise VhostUserError(f"payload of {size} bytes for request {request} "
                                 f"(max {MAX_PAYLOAD})")
        payload = _recv_exact(sock, size) if size else b""
        return Message(request, flags, payload, fds)
    except BaseException:
        for fd in fds:
            _close(fd)
        raise


def encode(request: int, payload: bytes = b"", *, flags: int = FLAG_VERSION) -> bytes:
    return HDR.pack(request, flags, len(payload)) + payload


@dataclass
class Vring:
    index: int
    num: int = 0
    desc_addr: int | None = None
    avail_addr: int | None = None
    used_addr: int | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    enable_seen: bool = False
    started: bool = False
    queue: VirtQueue | None = None
    broken: bool = False

    def drop_queue(self) -> None:
        if self.queue is not None:
            self.base = self.queue.last_avail_idx
            self.queue.release()
            self.queue = None

    def close(self) -> None:
        self.drop_queue()
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, None)
        self.started = False


class VhostUserVsock:
    """State of one vhost-user-vsock session; feed it messages, send back replies."""

    def __init__(self, guest_cid: int, log: Callable[[str], None] | None = None) -> None:
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest cid {guest_cid} out of range")
        self.guest_cid = guest_cid
        self.log = log or (lambda msg: None)
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.mem: GuestMemory | None = None
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        # Bumped whenever the set of rings or fds the event loop must watch changes.
        self.generation = 0

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        for vr in self.vrings:
            vr.close()
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    def queue(self, index: int) -> VirtQueue | None:
        """The queue if it may be processed now."""
        vr = self.vrings[index]
        if vr.started and vr.enabled and not vr.broken:
            return vr.queue
        return None

    @property
    def protocol_features_on(self) -> bool:
        return bool(self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES)

    # -- dispatch ----------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Apply one message; returns the reply to send, if any. Owns msg.fds."""
        handler = self._handlers.get(msg.request)
        need_ack = (bool(msg.flags & FLAG_NEED_REPLY)
                    and bool(self.acked_protocol_features & PROTOCOL_F_REPLY_ACK))
        try:
            if handler is None:
                raise MessageError(f"unsupported request {msg.request}")
            reply = handler(self, msg)
        except (MessageError, GuestMemoryError, RingError) as e:
            self.log(f"vhost-user {msg.name}: {e}")
            msg.close_fds()
            if need_ack:
                return encode(msg.request, U64.pack(1), flags=FLAG_VERSION | FLAG_REPLY)
            return None
        msg.close_fds()
        if reply is not None:
            return encode(msg.request, reply, flags=FLAG_VERSION | FLAG_REPLY)
        if need_ack:
            return encode(msg.request, U64.pack(0), flags=FLAG_VERSION | FLAG_REPLY)
        return None

    @staticmethod
    def _expect(msg: Message, size: int, nfds: int = 0) -> None:
        if len(msg.payload) != size:
            raise MessageError(f"payload is {len(msg.payload)} bytes, expected {size}")
        if len(msg.fds) != nfds:
            raise MessageError(f"{len(msg.fds)} fds, expected {nfds}")

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise MessageError(f"vring index {index} (device has {NUM_QUEUES})")
        return self.vrings[index]

    def _take_fd(self, msg: Message) -> int:
        return msg.fds.pop(0)

    # -- feature negotiation ----------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return U64.pack(OFFERED_FEATURES)

    def _set_features(self, msg: Message) -> None:
        self._expect(msg, 8)
        (features,) = U64.unpack(msg.payload)
        if features & ~OFFERED_FEATURES:
            self.log(f"vhost-user SET_FEATURES: ignoring unoffered bits "
                     f"{features & ~OFFERED_FEATURES:#x}")
        self.acked_features = features & OFFERED_FEATURES
        # Without protocol features the rings are enabled as soon as they start.
        if not self.protocol_features_on:
            for vr in self.vrings:
                vr.enabled = True
        return None

    def _get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        self._expect(msg, 8)
        (features,) = U64.unpack(msg.payload)
        self.acked_protocol_features = features & OFFERED_PROTOCOL_FEATURES
        if not self.acked_protocol_features & PROTOCOL_F_CONFIG:
            self.log("vhost-user: front end did not accept the CONFIG protocol feature")
        return None

    def _set_owner(self, msg: Message) -> None:
        self.owner = True
        return None

    def _reset_owner(self, msg: Message) -> None:
        self.owner = False
        self.acked_features = 0
        for vr in self.vrings:
            vr.close()
            vr.__init__(vr.index)
        self.generation += 1
        return None

    def _get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(NUM_QUEUES)

    # -- memory ------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        if len(msg.payload) < 8:
            raise MessageError("memory table truncated")
        nregions, _pad = struct.unpack_from("<II", msg.payload)
        if not 1 <= nregions <= MAX_REGIONS:
            raise MessageError(f"{nregions} memory regions (1..{MAX_REGIONS})")
        self._expect(msg, 8 + MEM_REGION.size * nregions, nregions)
        descs = [MEM_REGION.unpack_from(msg.payload, 8 + MEM_REGION.size * i)
                 for i in range(nregions)]
        mem = GuestMemory.from_fds(descs, msg.fds)
        msg.close_fds()  # the mappings outlive the fds
        old, self.mem = self.mem, mem
        self.generation += 1
        self.log("vhost-user: guest memory " + ", ".join(
            f"{r.guest_addr:#x}+{r.size:#x}" for r in mem.regions))
        # Every ring moves to the new table and the old mappings go, even when a ring
        # does not fit the new memory (that ring is marked broken and the first such
        # error is reported); an early exit here used to leave the later rings on the
        # old memory and never unmap it.
        failure: MessageError | None = None
        for vr in self.vrings:
            if vr.queue is not None:
                vr.drop_queue()
                try:
                    self._try_start(vr)
                except MessageError as e:
                    failure = failure or e
        if old is not None:
            old.close()
        if failure is not None:
            raise failure
        return None

    # -- vrings ------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        self._expect(msg, VRING_STATE.size)
        index, num = VRING_STATE.unpack(msg.payload)
        vr = self._vring(index)
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise MessageError(f"queue size {num}")
        vr.num = num
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        self._expect(msg, VRING_ADDR.size)
        index, _flags, desc, used, avail, _log = VRING_ADDR.unpack(msg.payload)
        vr = self._vring(index)
        vr.desc_addr, vr.used_addr, vr.avail_addr = desc, used, avail
        if vr.started:
            vr.drop_queue()
            self._try_start(vr)
        return None

    def _set_vring_base(self, msg: Message) -> None:
        self._expect(msg, VRING_STATE.size)
        index, num = VRING_STATE.unpack(msg.payload)
        vr = self._vring(index)
        if num > 0xFFFF:
            raise MessageError(f"vring base {num}")
        vr.base = num
        return None

    def _get_vring_base(self, msg: Message) -> bytes:
        self._expect(msg, VRING_STATE.size)
        index, _ = VRING_STATE.unpack(msg.payload)
        vr = self._vring(index)
        if vr.queue is not None:
            vr.queue.flush_used()
        vr.drop_queue()
        vr.started = False
        _close(vr.kick_fd)
        vr.kick_fd = None
        vr.broken = False
        self.generation += 1
        return VRING_STATE.pack(index, vr.base)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        self._expect(msg, 8, len(msg.fds))
        (value,) = U64.unpack(msg.payload)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise MessageError(f"bad vring fd argument {value:#x}")
        vr = self._vring(value & VRING_IDX_MASK)
        if value & VRING_NOFD_MASK:
            if msg.fds:
                raise MessageError("fd sent together with the no-fd flag")
            return vr, None
        if len(msg.fds) != 1:
            raise MessageError(f"{len(msg.fds)} fds, expected 1")
        return vr, self._take_fd(msg)

    def _set_vring_kick(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        _close(vr.kick_fd)
        vr.kick_fd = fd
        if fd is None:
            # Polling mode: nothing would ever wake us for this ring.
            self.log(f"vhost-user: vring {vr.index} without kick fd is not supported")
            vr.drop_queue()
            vr.started = False
        else:
            os.set_blocking(fd, False)
            vr.drop_queue()
            vr.started = True
            vr.broken = False
            self._try_start(vr)
        self.generation += 1
        return None

    def _set_vring_call(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        _close(vr.call_fd)
        vr.call_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        return None

    def _set_vring_err(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        _close(vr.err_fd)
        vr.err_fd = fd
        return None

    def _set_vring_enable(self, msg: Message) -> None:
        self._expect(msg, VRING_STATE.size)
        index, enable = VRING_STATE.unpack(msg.payload)
        vr = self._vring(index)
        vr.enabled = bool(enable)
        vr.enable_seen = True
        self.generation += 1
        return None

    def _try_start(self, vr: Vring) -> None:
        if not vr.started or vr.queue is not None:
            return
        if self.mem is None or vr.num == 0 or vr.desc_addr is None:
            self.log(f"vhost-user: vring {vr.index} kicked before memory/size/addresses")
            return
        try:
            vr.queue = VirtQueue(self.mem, vr.num, vr.desc_addr, vr.avail_addr,
                                 vr.used_addr, last_avail_idx=vr.base)
        except RingError as e:
            vr.broken = True
            raise MessageError(f"vring {vr.index}: {e}") from None

    # -- config ------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return U64.pack(self.guest_cid)

    def _get_config(self, msg: Message) -> bytes:
        if len(msg.payload) < CONFIG_HDR.size:
            raise MessageError("config request truncated")
        offset, size, flags = CONFIG_HDR.unpack_from(msg.payload)
        if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
            raise MessageError(f"config range {offset}+{size}")
        if len(msg.payload) != CONFIG_HDR.size + size:
            raise MessageError(f"config payload {len(msg.payload)} for size {size}")
        if msg.fds:
            raise MessageError("fds with GET_CONFIG")
        space = self.config_bytes().ljust(MAX_CONFIG_SIZE, b"\0")
        self.log(f"vhost-user: GET_CONFIG offset={offset} size={size} "
                 f"-> guest_cid={self.guest_cid}")
        return CONFIG_HDR.pack(offset, size, flags) + space[offset:offset + size]

    def _set_config(self, msg: Message) -> None:
        raise MessageError("the vsock config space is read-only")

    _handlers: dict[int, Callable[["VhostUserVsock", Message], bytes | None]] = {
        GET_FEATURES: _get_features,
        SET_FEATURES: _set_features,
        SET_OWNER: _set_owner,
        RESET_OWNER: _reset_owner,
        SET_MEM_TABLE: _set_mem_table,
        SET_VRING_NUM: _set_vring_num,
        SET_VRING_ADDR: _set_vring_addr,
        SET_VRING_BASE: _set_vring_base,
        GET_VRING_BASE: _get_vring_base,
        SET_VRING_KICK: _set_vring_kick,
        SET_VRING_CALL: _set_vring_call,
        SET_VRING_ERR: _set_vring_err,
        GET_PROTOCOL_FEATURES: _get_protocol_features,
        SET_PROTOCOL_FEATURES: _set_protocol_features,
        GET_QUEUE_NUM: _get_queue_num,
        SET_VRING_ENABLE: _set_vring_enable,
        GET_CONFIG: _get_config,
        SET_CONFIG: _set_config,
    }
