"""Which network namespaces a container may carry into its VM.

Carrying a namespace means redirecting every frame of its interfaces into a
tap (tcfilter.py). Done to the host's namespace, that takes the host off its
network until the VM ends: the node's eth0 would deliver everything to the
guest. So the host's namespace is refused however it is named (/proc/1/ns/net,
/proc/self/ns/net, a bind mount of either, /proc/PID/ns/net of any process in
it): namespaces are compared by identity (device and inode of the nsfs file),
never by path. A namespace another kata-py VM carries already is refused too:
mirred redirects a veth's frames to one tap only, and a second VM would take
them from the first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .. import hostsys
from .errors import NetworkError
from .netns import CLONE_NEWNET, Netns
from .scan import TAP_PREFIX

# The namespaces that are the host's, as seen from the runtime: PID 1's, and
# the runtime's own (the one containerd, podman or a shell started it in).
HOST_REFERENCES = (("/proc/1/ns/net", "the host's (PID 1's)"),
                   ("/proc/self/ns/net", "kata-py's own (the host's)"))

# The CRI annotations that mark a pod's sandbox (pause) container.
SANDBOX_ANNOTATIONS = (("io.kubernetes.cri.container-type", "sandbox"),       # containerd
                       ("io.kubernetes.cri-o.ContainerType", "sandbox"))       # CRI-O


class HostNamespaceRefused(NetworkError):
    def __init__(self, path: str, whose: str) -> None:
        self.path = path
        super().__init__(f"network namespace {path} is {whose}: kata-py carries a namespace into its VM by "
                         "redirecting all of its traffic, which would take the host off its network; "
                         "give the container a network namespace of its own")


class NamespaceCarried(NetworkError):
    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"network namespace {path} is carried by another kata-py VM already: "
                         "one namespace can be carried by one VM only")


def network_entry(config: dict) -> tuple[bool, str | None]:
    """(the spec has a network namespace entry, its path or None)."""
    for namespace in (config.get("linux") or {}).get("namespaces") or []:
        if namespace.get("type") == "network":
            return True, namespace.get("path") or None
    return False, None


class NewNamespace:
    """A network namespace of its own for a process about to start (the
    spec's `network` entry has no path); the counterpart of an open Netns."""

    path = None

    def enter(self) -> None:
        """Between fork and exec, in the child (a preexec_fn)."""
        hostsys.unshare(CLONE_NEWNET)

    def close(self) -> None:
        pass


def monitor_namespace(config: dict) -> Netns | NewNamespace | None:
    """Where a container's monitor lives, network-wise: the spec's namespace
    (open, and refused when it is the host's or another VM carries it), a new
    one when the entry has no path, or None (the runtime's own) when there is
    no entry, and the guest then has loopback only. The monitor's pid is the
    container's pid: clients read the pod's network from /proc/PID/ns/net."""
    present, path = network_entry(config)
    if path is not None:
        return open_carriable(path)
    return NewNamespace() if present else None


def is_pod_sandbox(config: dict) -> bool:
    """A pod's pause container: it only holds the pod's namespaces, so its VM
    needs no NIC, and the pod's network is left to its first workload container."""
    annotations = config.get("annotations") or {}
    return any(annotations.get(key) == value for key, value in SANDBOX_ANNOTATIONS)


def identity_of(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def refuse_host(netns: Netns, references: Iterable[tuple[str, str]] = HOST_REFERENCES) -> None:
    """HostNamespaceRefused if `netns` is one of the reference namespaces."""
    for reference, whose in references:
        if identity_of(reference) == netns.identity:
            raise HostNamespaceRefused(netns.path, whose)


def carried_already(netns: Netns) -> bool:
    """Whether a kata-py tap is in the namespace (another VM carries it)."""
    def look() -> bool:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return any((msg.get_attr("IFLA_IFNAME") or "").startswith(TAP_PREFIX) for msg in ipr.get_links())
    return netns.run(look)


def open_carriable(path: str, references: Iterable[tuple[str, str]] = HOST_REFERENCES) -> Netns:
    """The namespace at `path`, open, once it is known to be neither the
    host's nor carried already; a NetworkError naming the path otherwise."""
    netns = Netns(path)
    try:
        refuse_host(netns, references)
        if carried_already(netns):
            raise NamespaceCarried(path)
    except BaseException:
        netns.close()
        raise
    return netns
