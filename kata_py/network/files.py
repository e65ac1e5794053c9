"""The container's /etc/hosts and /etc/resolv.conf, made on the host.

The agent writes them in the guest (under /run/kata/network/) and the
container gets them bound over its own unless its spec mounts files there
(podman and the CRI do: theirs win).
"""

from __future__ import annotations

import os
import socket

from .scan import Endpoint

MAX_FILE = 64 * 1024
NETNS_RUN_DIR = "/run/netns"


def hosts_file(hostname: str, endpoints: list[Endpoint]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if hostname:
        addresses = [a["address"] for e in endpoints for a in e.addresses]
        # The first IPv4 address, else the first IPv6 one; with no network a
        # loopback address, as Debian does for a machine's own name.
        own = next((a for a in addresses if ":" not in a), None) or next(iter(addresses), "127.0.1.1")
        lines.append(f"{own}\t{hostname}")
    return "\n".join(lines) + "\n"


def resolv_conf(netns_path: str | None, with_network: bool) -> str:
    """The namespace's resolver set-up: /etc/netns/NAME/resolv.conf for a
    namespace named under /run/netns (as `ip netns exec` uses), else the
    host's, without loopback name servers, which the guest cannot reach."""
    if not with_network:
        return "# no network: the container has only loopback\n"
    candidates = []
    if netns_path and os.path.dirname(os.path.realpath(netns_path)) == NETNS_RUN_DIR:
        candidates.append(f"/etc/netns/{os.path.basename(netns_path)}/resolv.conf")
    candidates.append("/etc/resolv.conf")
    for path in candidates:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_FILE)
        except OSError:
            continue
        return _without_loopback_servers(text)
    return ""


def _without_loopback_servers(text: str) -> str:
    kept = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and _is_loopback(words[1]):
            continue
        kept.append(line)
    return ("\n".join(kept) + "\n")[:MAX_FILE] if kept else ""


def _is_loopback(address: str) -> bool:
    try:
        if ":" in address:
            return socket.inet_pton(socket.AF_INET6, address.split("%")[0]) == socket.inet_pton(socket.AF_INET6, "::1")
        return socket.inet_pton(socket.AF_INET, address)[0] == 127
    except OSError:
        return False
