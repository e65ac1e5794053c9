"""What the guest takes over from the container's network namespace.

`endpoints()` turns plain facts (links, addresses, routes, as dicts) into the
interfaces the guest gets: each ethernet-like link (a veth from CNI or
netavark, a macvlan, ...) with its MAC, MTU, addresses and routes. `read()`
gathers those facts with pyroute2 from the namespace it runs in.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

ARPHRD_ETHER = 1
# Kinds of link whose traffic can be mirrored to a tap: veths (CNI bridge,
# netavark, ptp), macvlan/ipvlan (CNI), vlan, and plain ethernet (no kind).
CARRIED_KINDS = (None, "veth", "macvlan", "ipvlan", "vlan")
TAP_PREFIX = "kp-tap"
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2   # the kernel's own prefix and link-local routes: the guest kernel makes its own
RTNH_F_ONLINK = 0x4
SCOPE_NAMES = {0: "universe", 253: "link", 254: "host"}
IFA_SCOPE_UNIVERSE = 0
IFA_SCOPE_HOST = 254


@dataclass
class Endpoint:
    """One interface of the namespace, as the guest NIC will be."""

    name: str
    index: int
    mac: str
    mtu: int
    addresses: list[dict] = field(default_factory=list)     # {"address", "prefix_len"}
    routes: list[dict] = field(default_factory=list)        # configure_network route entries
    guest_name: str = ""                                     # when the guest cannot take `name`

    def guest_nic(self) -> dict:
        return {"name": self.guest_name or self.name, "mac": self.mac, "mtu": self.mtu, "addresses": self.addresses,
                "routes": self.routes}


def endpoints(links: list[dict], addresses: list[dict], routes: list[dict]) -> list[Endpoint]:
    """links: {index, name, kind, type, mac, mtu}; addresses: {index, family, address,
    prefix_len, scope}; routes: {family, table, type, proto, scope, flags, dst, dst_len,
    gateway, source, metric, oif}."""
    found = []
    for link in sorted(links, key=lambda item: item["index"]):
        if (link["type"] != ARPHRD_ETHER or link["kind"] not in CARRIED_KINDS
                or link["name"].startswith(TAP_PREFIX) or not link["mac"]):
            continue
        found.append(Endpoint(link["name"], link["index"], link["mac"].lower(), link["mtu"],
                              _addresses_of(link["index"], addresses), _routes_of(link["index"], routes)))
    return found


def _addresses_of(index: int, addresses: list[dict]) -> list[dict]:
    kept = []
    for item in addresses:
        if item["index"] != index or not item["address"]:
            continue
        # IPv6 link-local addresses come from the MAC: the guest makes the same one itself.
        if item["family"] == socket.AF_INET6 and item["scope"] != IFA_SCOPE_UNIVERSE:
            continue
        if item["scope"] == IFA_SCOPE_HOST:
            continue
        kept.append({"address": item["address"], "prefix_len": item["prefix_len"]})
    return kept


def _routes_of(index: int, routes: list[dict]) -> list[dict]:
    kept = []
    for item in routes:
        if (item["oif"] != index or item["table"] != RT_TABLE_MAIN or item["type"] != RTN_UNICAST
                or item["proto"] == RTPROT_KERNEL or item["scope"] not in SCOPE_NAMES):
            continue
        if item["family"] == socket.AF_INET6 and (item.get("dst") or "").lower().startswith(("fe80:", "ff")):
            continue
        route = {"scope": SCOPE_NAMES[item["scope"]]}
        if item.get("dst"):
            route["dst"] = item["dst"]
            route["dst_len"] = item["dst_len"]
        for key in ("gateway", "source"):
            if item.get(key):
                route[key] = item[key]
        if item.get("metric"):
            route["metric"] = item["metric"]
        if item["flags"] & RTNH_F_ONLINK:
            route["onlink"] = True
        if not (route.get("dst") or route.get("gateway")):
            # A default route with neither: only meaningful as a device route.
            route["dst"] = "0.0.0.0" if item["family"] == socket.AF_INET else "::"
            route["dst_len"] = 0
        kept.append(route)
    return kept


def read(ipr) -> list[Endpoint]:
    """The endpoints of the namespace `ipr` (a pyroute2 IPRoute) talks to."""
    links = [{"index": msg["index"], "name": msg.get_attr("IFLA_IFNAME") or "",
              "kind": _kind(msg), "type": msg["ifi_type"], "mac": msg.get_attr("IFLA_ADDRESS") or "",
              "mtu": msg.get_attr("IFLA_MTU") or 1500} for msg in ipr.get_links()]
    addresses = [{"index": msg["index"], "family": msg["family"], "prefix_len": msg["prefixlen"],
                  "scope": msg["scope"],
                  "address": msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")} for msg in ipr.get_addr()]
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            routes.append({"family": msg["family"], "table": msg.get_attr("RTA_TABLE") or msg["table"],
                           "type": msg["type"], "proto": msg["proto"], "scope": msg["scope"],
                           "flags": msg["flags"], "dst": msg.get_attr("RTA_DST"), "dst_len": msg["dst_len"],
                           "gateway": msg.get_attr("RTA_GATEWAY"), "source": msg.get_attr("RTA_PREFSRC"),
                           "metric": msg.get_attr("RTA_PRIORITY"), "oif": msg.get_attr("RTA_OIF")})
    return endpoints(links, addresses, routes)


def _kind(msg) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None
