"""Kata's tcfilter model: a tap beside each veth, and tc mirroring both ways.

The tap is created by opening /dev/net/tun in the container's namespace; it
is not persistent, so it lives exactly as long as someone holds its fd
(QEMU, once started). Each of the two links gets an ingress qdisc and a u32
filter that matches every frame (`match u8 0 0`) with the action `mirred
egress redirect` to the other link: what arrives on the veth leaves through
the tap to the guest, and what the guest sends leaves through the veth.

Everything made here is recorded (record.py) before the next step, so a
monitor that dies half-way leaves a record that `delete` can undo exactly.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from .errors import NetworkError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000       # QEMU then negotiates checksum/segmentation offloads with the guest
ETH_P_ALL = 0x0003
INGRESS_HANDLE = 0xFFFF0000
INGRESS_PARENT = 0xFFFFFFF2  # ffff:fff2: the ingress hook of an ingress or a clsact qdisc
INGRESS_KINDS = ("ingress", "clsact")
FIRST_PRIO = 0xC000          # tc's own default preference for a first filter


def open_tap(name: str) -> int:
    """A new tap named `name` in the calling thread's namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot create tap {name}: {exc.strerror}") from None
    return fd


def disable_ipv6(name: str) -> None:
    """The namespace's own stack has nothing to say on the tap (router
    solicitations, its own link-local address): the guest is the host there."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # no IPv6 in this kernel or namespace: nothing to silence


def has_ingress_qdisc(ipr, index: int) -> bool:
    """Whether `index` has a qdisc with an ingress hook (ingress, or clsact)."""
    return any(qdisc["index"] == index and qdisc.get_attr("TCA_KIND") in INGRESS_KINDS
               for qdisc in ipr.get_qdiscs(index))


def add_ingress_qdisc(ipr, index: int) -> None:
    ipr.tc("add", "ingress", index, INGRESS_HANDLE)


def free_prio(ipr, index: int) -> int:
    """A filter preference no filter on the ingress of `index` uses, so ours
    is added as a filter of its own and can be removed alone."""
    used = {msg["info"] >> 16 for msg in ipr.get_filters(index, parent=INGRESS_PARENT)}
    prio = FIRST_PRIO
    while prio in used:
        prio += 1
    return prio


def redirect_filter(ipr, index: int, to_index: int, prio: int) -> None:
    # pyroute2 always sends a class id; 1:1 (as Kata's) means nothing to a
    # filter whose action steals every frame.
    ipr.tc("add-filter", "u32", index, parent=INGRESS_PARENT, prio=prio, protocol=ETH_P_ALL,
           target=0x10001, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": to_index})


def delete_filter(ipr, index: int, prio: int) -> None:
    # tcm_info carries the preference and protocol; pyroute2 fills it only when
    # given a filter kind, and a zero there would delete every filter on the hook.
    ipr.tc("del-filter", None, index, parent=INGRESS_PARENT, info=(prio << 16) | socket.htons(ETH_P_ALL))


def delete_ingress_qdisc(ipr, index: int) -> None:
    ipr.tc("del", "ingress", index, INGRESS_HANDLE)


def is_gone(exc) -> bool:
    """A pyroute2 NetlinkError that says the link, qdisc or filter is no longer
    there (ENODEV, ENOENT, EINVAL)."""
    return exc.code in (19, 2, 22)
