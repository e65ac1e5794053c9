"""Network namespaces and veths for the networking tests, made with pyroute2
and always removed, and a snapshot of what a namespace holds."""

from __future__ import annotations

import itertools
import os
import socket
import time

NAMESPACE_COUNTER = itertools.count()
INGRESS_PARENT = 0xFFFFFFF2
IFA_F_TENTATIVE = 0x40


def _ipr(netns: str | None):
    from pyroute2 import IPRoute

    # flags=0: never create a namespace by accident when opening one.
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


class Namespaces:
    """Named namespaces (/run/netns/NAME) and host-side veths; all removed at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.host_links: list[str] = []

    def create(self) -> str:
        from pyroute2 import netns

        name = f"kpt-{os.getpid()}-{next(NAMESPACE_COUNTER)}"
        netns.create(name)
        self.names.append(name)
        return name

    def path(self, name: str) -> str:
        return f"/run/netns/{name}"

    def veth(self, left: str | None, left_name: str, left_cidr: str, right: str | None, right_name: str,
             right_cidr: str, mtu: int = 1500) -> None:
        """A veth pair between two namespaces (None: the host's), addressed and up."""
        # Made in the host's namespace under names of our own, then moved and renamed.
        number = next(NAMESPACE_COUNTER)
        left_temp, right_temp = f"kpt{os.getpid()}-{number}a", f"kpt{os.getpid()}-{number}b"
        with _ipr(None) as ipr:
            ipr.link("add", ifname=left_temp, kind="veth", peer={"ifname": right_temp})
        for temp, ns, final, cidr in ((left_temp, left, left_name, left_cidr),
                                      (right_temp, right, right_name, right_cidr)):
            with _ipr(None) as ipr:
                index = ipr.link_lookup(ifname=temp)[0]
                if ns is not None:
                    ipr.link("set", index=index, net_ns_fd=ns)
                else:
                    self.host_links.append(final)
            with _ipr(ns) as ipr:
                index = ipr.link_lookup(ifname=temp)[0]
                ipr.link("set", index=index, ifname=final, mtu=mtu)
                address, prefix = cidr.split("/")
                ipr.addr("add", index=index, address=address, prefixlen=int(prefix))
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

        for ns in (left, right):
            if ns is not None:
                settle(ns)

    def route(self, ns: str, dst: str, gateway: str) -> None:
        with _ipr(ns) as ipr:
            ipr.route("add", dst=dst, gateway=gateway)

    def cleanup(self) -> None:
        from pyroute2 import netns

        with _ipr(None) as ipr:
            for name in self.host_links:
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)
        for name in self.names:
            netns.remove(name)
        self.names.clear()
        self.host_links.clear()


def settle(ns: str | None, timeout: float = 30) -> None:
    """Wait for IPv6 duplicate address detection to finish: until then the
    kernel still adds routes for the link-local addresses by itself."""
    deadline = time.monotonic() + timeout
    while True:
        with _ipr(ns) as ipr:
            tentative = [m for m in ipr.get_addr(family=socket.AF_INET6)
                         if (m.get_attr("IFA_FLAGS") or m["flags"]) & IFA_F_TENTATIVE]
        if not tentative or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def snapshot(ns: str | None) -> dict:
    """Links, addresses, routes, qdiscs and ingress filters, without counters or
    anything the kernel changes over time by itself."""
    with _ipr(ns) as ipr:
        links = sorted((m["index"], m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_ADDRESS"), m.get_attr("IFLA_MTU"),
                        m["flags"] & 1) for m in ipr.get_links())
        addresses = sorted((m["index"], m["family"], m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                           for m in ipr.get_addr())
        routes = sorted((m["family"], str(m.get_attr("RTA_DST")), m["dst_len"], str(m.get_attr("RTA_GATEWAY")),
                         m.get_attr("RTA_OIF") or 0) for m in ipr.get_routes(family=socket.AF_UNSPEC))
        qdiscs = sorted((m["index"], m.get_attr("TCA_KIND"), m["handle"], m["parent"]) for m in ipr.get_qdiscs())
        filters = []
        for index, *_ in links:
            filters += [(index, m["parent"], m["info"], m.get_attr("TCA_KIND"), m["handle"])
                        for m in ipr.get_filters(index, parent=INGRESS_PARENT)]
    return {"links": links, "addresses": addresses, "routes": routes, "qdiscs": qdiscs,
            "filters": sorted(filters)}


def link_names(ns: str | None) -> list[str]:
    with _ipr(ns) as ipr:
        return sorted(m.get_attr("IFLA_IFNAME") for m in ipr.get_links())


def connect_until(address: tuple[str, int], deadline: float) -> socket.socket:
    """A TCP connection to a server that may not be listening yet."""
    last = None
    while time.monotonic() < deadline:
        try:
            return socket.create_connection(address, timeout=10)
        except OSError as exc:
            last = exc
            time.sleep(0.3)
    raise AssertionError(f"could not connect to {address}: {last}")
