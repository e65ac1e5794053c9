"""Carry a container's network namespace into its VM, and undo it.

`attach()` runs before the VM boots: it reads the namespace's interfaces,
makes a tap beside each and mirrors them (tcfilter.py), and returns the
guest NICs for QEMU plus the `configure_network` request for the agent.
`Attachment.detach()` (the monitor, at the end) and `detach_recorded()`
(`delete`, after a monitor that was killed) remove what the record lists.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from . import files, scan, tcfilter
from .errors import NetworkError
from .guard import HOST_REFERENCES, NamespaceCarried, is_pod_sandbox, network_entry, refuse_host
from .netns import Netns, open_if_same
from .record import Made, Record, load

log = logging.getLogger("kata_py.network")

# microvm has 8 virtio-mmio slots, and vsock and the 9p share take two of
# them: 4 NICs leave room for a device or two more. (The schema takes 8.)
MAX_NICS = 4
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")


@dataclass
class GuestNic:
    """A virtio-net device on a tap that QEMU gets as an inherited fd."""

    netdev: str
    fd: int
    mac: str

    def qemu_args(self, bus: str) -> list[str]:
        device = "virtio-net-device" if bus == "mmio" else "virtio-net-pci"
        return ["-netdev", f"tap,id={self.netdev},fd={self.fd}",
                "-device", f"{device},netdev={self.netdev},mac={self.mac}"]


@dataclass
class Attachment:
    nics: list[GuestNic]
    request: dict                       # configure_network's arguments
    record: Record | None = None
    endpoints: list = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [nic.fd for nic in self.nics if nic.fd >= 0]

    def release(self) -> None:
        """Close our copies of the tap fds: once QEMU holds its own, each tap
        then lives exactly as long as QEMU does."""
        for nic in self.nics:
            if nic.fd >= 0:
                os.close(nic.fd)
                nic.fd = -1

    def detach(self) -> None:
        self.release()
        if self.record is not None:
            undo(self.record)
            self.record = None


def namespace_path(config: dict) -> str | None:
    """The spec's network namespace path, if it names one."""
    return network_entry(config)[1]


def carried_path(config: dict, monitor_pid: int) -> str | None:
    """The namespace the monitor carries into its VM. `create` started the
    monitor inside the spec's namespace, or inside a new one when the spec's
    entry has no path (where a prestart hook, Docker's, may have put a veth);
    a pod's sandbox container carries nothing, and without a network entry
    (runc would share the host's, which a VM must not) there is nothing to carry."""
    present, path = network_entry(config)
    if not present or is_pod_sandbox(config):
        return None
    return path or f"/proc/{monitor_pid}/ns/net"


def attach(netns_path: str | None, record_path: Path, hostname: str = "") -> Attachment:
    if netns_path is None:
        return Attachment([], configure_request(hostname, [], None))
    with Netns(netns_path) as netns:
        # Checked by `create` already; checked again where the taps are made.
        refuse_host(netns, HOST_REFERENCES[:1])
        record = Record(Path(record_path), netns_path, netns.identity)
        record.save()
        try:
            nics, endpoints = netns.run(_carry, record)
        except BaseException:
            try:
                netns.run(_undo, record)
            except NetworkError as exc:
                log.error("%s", exc)
            else:
                record.remove()
            raise
    return Attachment(nics, configure_request(hostname, endpoints, netns_path), record, endpoints)


def configure_request(hostname: str, endpoints: list[scan.Endpoint], netns_path: str | None) -> dict:
    return {"interfaces": [endpoint.guest_nic() for endpoint in endpoints],
            "hosts": files.hosts_file(hostname, endpoints),
            "resolv_conf": files.resolv_conf(netns_path, bool(endpoints)),
            "hostname": hostname}


def _carry(record: Record) -> tuple[list[GuestNic], list[scan.Endpoint]]:
    """Inside the namespace: a tap and mirroring for each endpoint."""
    if [name for _, name in socket.if_nameindex()] == ["lo"]:
        # Nothing to carry (a new, empty namespace: a container without a
        # network): no pyroute2, which would stay in the owner's memory for
        # the sandbox's life (~10 MiB PSS each).
        return [], []
    from pyroute2 import IPRoute  # imported here: ~0.1 s, which only a networked container needs to pay
    nics: list[GuestNic] = []
    try:
        with IPRoute() as ipr:
            names = [msg.get_attr("IFLA_IFNAME") or "" for msg in ipr.get_links()]
            if any(name.startswith(scan.TAP_PREFIX) for name in names):
                raise NamespaceCarried(record.netns)
            endpoints = scan.read(ipr)
            if len(endpoints) > MAX_NICS:
                log.warning("network namespace %s has %d interfaces: the guest gets the first %d",
                            record.netns, len(endpoints), MAX_NICS)
                endpoints = endpoints[:MAX_NICS]
            for number, endpoint in enumerate(endpoints):
                if not IFNAME.match(endpoint.name):
                    endpoint.guest_name = f"eth{number}"  # a name the guest's schema takes
                nics.append(_mirror(ipr, record, number, endpoint))
    except BaseException:
        for nic in nics:
            os.close(nic.fd)
        raise
    return nics, endpoints


def _mirror(ipr, record: Record, number: int, endpoint: scan.Endpoint) -> GuestNic:
    from pyroute2.netlink.exceptions import NetlinkError

    name = f"{scan.TAP_PREFIX}{number}"
    fd = tcfilter.open_tap(name)
    try:
        tap_index = ipr.link_lookup(ifname=name)[0]
        record.add(Made("tap", name, tap_index))
        tcfilter.disable_ipv6(name)
        ipr.link("set", index=tap_index, mtu=endpoint.mtu, state="up")
        for link, index, to_index in ((endpoint.name, endpoint.index, tap_index),
                                      (name, tap_index, endpoint.index)):
            # Recorded before it is made: a record of something never made is
            # harmless to undo, something made but not recorded would leak.
            if not tcfilter.has_ingress_qdisc(ipr, index):
                record.add(Made("qdisc", link, index))
                tcfilter.add_ingress_qdisc(ipr, index)
            prio = tcfilter.free_prio(ipr, index)
            record.add(Made("filter", link, index, prio))
            tcfilter.redirect_filter(ipr, index, to_index, prio)
    except NetlinkError as exc:
        os.close(fd)
        raise NetworkError(f"mirroring {endpoint.name} to {name}: {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return GuestNic(f"net{number}", fd, endpoint.mac)


def undo(record: Record) -> None:
    """Remove what the record lists from its namespace, if that still exists."""
    netns = open_if_same(record.netns, record.identity)
    if netns is not None:
        with netns:
            netns.run(_undo, record)
    record.remove()


def _undo(record: Record) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
        failures = []
        for made in reversed(record.made):
            if names.get(made.index) != made.link:
                continue  # gone, and what was made on it went along
            try:
                if made.what == "filter":
                    tcfilter.delete_filter(ipr, made.index, made.prio)
                elif made.what == "qdisc":
                    tcfilter.delete_ingress_qdisc(ipr, made.index)
                elif made.what == "tap":
                    ipr.link("del", index=made.index)
            except NetlinkError as exc:
                if not tcfilter.is_gone(exc):
                    failures.append(f"{made.what} on {made.link}: {exc}")
    if failures:
        raise NetworkError(f"network namespace {record.netns}: could not remove " + "; ".join(failures))


def detach_recorded(record_path: Path) -> None:
    """Undo a record left by a monitor that did not get to (killed)."""
    record = load(Path(record_path))
    if record is not None:
        undo(record)
