"""The guest's network, as the host describes it in `configure_network`.

Each guest NIC is a virtio-net device the host gave the MAC of a veth in the
container's network namespace; the agent finds it by that MAC, gives it the
veth's name, MTU, addresses and routes, and brings it up. Loopback is up from
boot. The agent also writes the container's /etc/hosts, /etc/resolv.conf and
hostname under /run/kata/network/, from where the container set-up binds
them over the container's own files.
"""

from __future__ import annotations

import os
import threading

from .processes import ProcessError
from .rtnetlink import NetlinkError, Rtnl

FILES_DIR = "/run/kata/network"


class Network:
    MODULES_TIMEOUT = 60.0

    def __init__(self, modules_ready: threading.Event | None = None, rtnl_factory=Rtnl,
                 files_dir: str = FILES_DIR) -> None:
        self.modules_ready = modules_ready
        self.rtnl_factory = rtnl_factory
        self.files_dir = files_dir
        self.lock = threading.Lock()

    def configure(self, interfaces: list[dict], hosts: str, resolv_conf: str, hostname: str) -> list[dict]:
        """Set up the NICs and write the files; the NICs as configured."""
        # virtio_net is among the modules loaded after the agent starts listening.
        if self.modules_ready is not None and not self.modules_ready.wait(self.MODULES_TIMEOUT):
            raise ProcessError("failed", "the guest's network modules did not load")
        with self.lock:
            done = self._configure_nics(interfaces) if interfaces else []
            self._write_files({"hosts": hosts, "resolv.conf": resolv_conf, "hostname": hostname + "\n"
                               if hostname else ""})
        return done

    def _configure_nics(self, interfaces: list[dict]) -> list[dict]:
        try:
            with self.rtnl_factory() as rtnl:
                by_mac = {link.mac: link for link in rtnl.links()}
                matched = []
                for nic in interfaces:
                    link = by_mac.get(nic["mac"])
                    if link is None:
                        raise ProcessError("not_found", f"no guest NIC with MAC {nic['mac']}")
                    matched.append((nic, link))
                self._rename(rtnl, matched, {link.name for link in by_mac.values()})
                for nic, link in matched:
                    rtnl.set_link(link.index, mtu=nic["mtu"], up=True)
                    for address in nic.get("addresses", []):
                        self._step(rtnl.add_address, link.index, address["address"], address["prefix_len"],
                                   what=f"{nic['name']}: address {address['address']}/{address['prefix_len']}")
                # Routes through a gateway need the routes that reach it (on
                # any NIC) in place first.
                routes = [(nic, link, route) for nic, link in matched for route in nic.get("routes", [])]
                routes.sort(key=lambda item: item[2].get("gateway") is not None)
                for nic, link, route in routes:
                    self._step(rtnl.add_route, link.index, route, what=f"{nic['name']}: route {_describe(route)}")
        except NetlinkError as exc:
            raise ProcessError("failed", f"network: {exc.strerror}") from None
        except OSError as exc:
            raise ProcessError("failed", f"network: netlink: {exc}") from None
        return [{"name": nic["name"], "mac": nic["mac"], "index": link.index} for nic, link in matched]

    @staticmethod
    def _rename(rtnl, matched: list, taken: set[str]) -> None:
        """Give each NIC its veth's name. Through a temporary name when the
        wanted one is taken, so two NICs can swap names. A fresh NIC is down,
        as a rename requires."""
        moving = [(nic, link) for nic, link in matched if link.name != nic["name"]]
        if any(nic["name"] in taken for nic, _ in moving):
            for number, (_, link) in enumerate(moving):
                rtnl.set_link(link.index, name=f"kpnic{number}")
        for nic, link in moving:
            rtnl.set_link(link.index, name=nic["name"])
            link.name = nic["name"]

    @staticmethod
    def _step(call, *args, what: str) -> None:
        try:
            call(*args)
        except NetlinkError as exc:
            if exc.errno == 17:  # EEXIST: the kernel made it already (a prefix route)
                return
            raise ProcessError("failed", f"network: {what}: {exc.strerror}") from None

    def _write_files(self, contents: dict[str, str]) -> None:
        os.makedirs(self.files_dir, mode=0o755, exist_ok=True)
        for name, text in contents.items():
            path = f"{self.files_dir}/{name}"
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                data = text.encode()
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            os.replace(tmp, path)


def _describe(route: dict) -> str:
    dst = f"{route['dst']}/{route.get('dst_len', 0)}" if route.get("dst") else "default"
    return dst + (f" via {route['gateway']}" if route.get("gateway") else "")
