"""Just enough rtnetlink for the guest agent: list links, set a link's name,
MTU and state, add addresses and routes.

The agent runs in a trimmed Python without pyroute2 and must not fork `ip`
for this, so it speaks netlink itself over an AF_NETLINK socket: a request
is an nlmsghdr, a fixed family header and a list of attributes; the kernel
answers with an ack (an NLMSG_ERROR carrying errno 0) or with a dump that
ends in NLMSG_DONE.
"""

from __future__ import annotations

import os
import socket
import struct

# linux/netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300

# linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
SCOPES = {"universe": 0, "link": 253, "host": 254}

# linux/if_link.h, if_addr.h, rtnetlink.h attribute types
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_TABLE = 15

IFF_UP = 0x1

_NLMSGHDR = struct.Struct("=IHHII")      # length, type, flags, sequence, port id
_IFINFOMSG = struct.Struct("=BxHiII")    # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")     # family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")     # family, dst len, src len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")           # length, type
_U32 = struct.Struct("=I")

MAX_REPLY = 1 << 20


class NetlinkError(OSError):
    """The kernel refused a request (errno set), or answered nonsense."""


def _align(length: int) -> int:
    return (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes of one message (the last of a repeated type wins)."""
    found = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break
        found[kind & 0x3FFF] = data[offset + _RTATTR.size:offset + length]  # without NLA_F_* flag bits
        offset += _align(length)
    return found


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def split_messages(data: bytes):
    """(type, flags, seq, payload) for each message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(0, "a truncated netlink message")
        yield kind, flags, seq, data[offset + _NLMSGHDR.size:offset + length]
        offset += _align(length)


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def packed(address: str) -> bytes:
    return socket.inet_pton(family_of(address), address)


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Link:
    def __init__(self, index: int, name: str, mac: str, flags: int, mtu: int) -> None:
        self.index = index
        self.name = name
        self.mac = mac
        self.flags = flags
        self.mtu = mtu

    def __repr__(self) -> str:
        return f"Link({self.index}, {self.name!r}, {self.mac}, mtu={self.mtu})"


def parse_link(payload: bytes) -> Link:
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
    attrs = parse_attrs(payload[_IFINFOMSG.size:])
    name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
    mtu = _U32.unpack(attrs[IFLA_MTU][:4])[0] if len(attrs.get(IFLA_MTU, b"")) >= 4 else 0
    return Link(index, name, format_mac(attrs.get(IFLA_ADDRESS, b"")), flags, mtu)


def link_request(index: int, name: str | None = None, mtu: int | None = None, up: bool | None = None) -> bytes:
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
    if name is not None:
        body += attr_str(IFLA_IFNAME, name)
    if mtu is not None:
        body += attr_u32(IFLA_MTU, mtu)
    return body


def address_request(index: int, address: str, prefix_len: int) -> bytes:
    family = family_of(address)
    # No duplicate address detection for IPv6: the address is the container's
    # own (its engine assigned it), and DAD would hold it "tentative" a while.
    flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
    raw = packed(address)
    return _IFADDRMSG.pack(family, prefix_len, flags, 0, index) + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)


def route_request(index: int, route: dict) -> bytes:
    dst = route.get("dst")
    gateway = route.get("gateway")
    family = family_of(dst or gateway or route.get("source") or "0.0.0.0")
    scope = SCOPES[route.get("scope", "link" if gateway is None else "universe")]
    flags = RTNH_F_ONLINK if route.get("onlink") else 0
    body = _RTMSG.pack(family, route.get("dst_len", 0) if dst else 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                       scope, RTN_UNICAST, flags)
    if dst:
        body += attr(RTA_DST, packed(dst))
    if gateway:
        body += attr(RTA_GATEWAY, packed(gateway))
    if route.get("source"):
        body += attr(RTA_PREFSRC, packed(route["source"]))
    if route.get("metric"):
        body += attr_u32(RTA_PRIORITY, route["metric"])
    return body + attr_u32(RTA_OIF, index)


class Rtnl:
    """One NETLINK_ROUTE socket; requests are sent one at a time and acked."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.sendto(message(kind, flags | NLM_F_REQUEST, self.seq, body), (0, 0))
        return self.seq

    def _replies(self, seq: int):
        """Payloads of the replies to request `seq`, up to its ack or NLMSG_DONE."""
        while True:
            data = self.sock.recv(MAX_REPLY)
            for kind, flags, reply_seq, payload in split_messages(data):
                if reply_seq != seq:
                    continue  # a late answer to an earlier request
                if kind == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if error:
                        raise NetlinkError(error, os.strerror(error))
                    return
                if kind == NLMSG_DONE:
                    return
                yield kind, payload

    def request(self, kind: int, body: bytes, flags: int = 0) -> None:
        for _ in self._replies(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    def links(self) -> list[Link]:
        seq = self._send(RTM_GETLINK, NLM_F_DUMP, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        return [parse_link(payload) for kind, payload in self._replies(seq) if kind == RTM_NEWLINK]

    def set_link(self, index: int, name: str | None = None, mtu: int | None = None, up: bool | None = None) -> None:
        self.request(RTM_NEWLINK, link_request(index, name, mtu, up))

    def add_address(self, index: int, address: str, prefix_len: int) -> None:
        self.request(RTM_NEWADDR, address_request(index, address, prefix_len), NLM_F_CREATE | NLM_F_EXCL)

    def add_route(self, index: int, route: dict) -> None:
        self.request(RTM_NEWROUTE, route_request(index, route), NLM_F_CREATE | NLM_F_EXCL)
