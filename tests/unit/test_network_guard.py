"""The identity check that keeps kata-py from carrying the host's network
namespace into a VM (kata_py/network/guard.py).

These only open and compare namespaces; nothing is made in any namespace but
the private ones made here, so a regression cannot reach the host's network.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from kata_py.network.attach import carried_path
from kata_py.network.guard import (HOST_REFERENCES, HostNamespaceRefused, NamespaceCarried, is_pod_sandbox,
                                   network_entry, open_carriable, refuse_host)
from kata_py.network.netns import Netns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and bind mounts need root")


def in_private_namespace():
    """A process sleeping in a network namespace of its own."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{proc.pid}/ns/net").st_ino == own:
        assert time.monotonic() < deadline, "unshare did not make a namespace"
        time.sleep(0.02)
    return proc


@pytest.fixture
def private():
    proc = in_private_namespace()
    yield proc
    proc.kill()
    proc.wait()


# PID 1's own spelling is the next test's: some hosts (a sandboxed CI) do not
# let even root open /proc/1/ns/net.
@pytest.mark.parametrize("path", ["/proc/self/ns/net", "/proc/thread-self/ns/net"])
def test_the_hosts_namespace_is_refused_by_any_proc_name(path):
    with Netns(path) as netns, pytest.raises(HostNamespaceRefused, match="take the host off its network"):
        refuse_host(netns)


def test_pid_1s_namespace_and_the_runtimes_own_are_told_apart():
    # Two private namespaces stand for PID 1's and the runtime's own (this
    # host may not let even root open PID 1's): each is refused under its name,
    # and a third is not refused.
    pid1, runtime, other = in_private_namespace(), in_private_namespace(), in_private_namespace()
    try:
        references = [(f"/proc/{pid1.pid}/ns/net", "the host's (PID 1's)"),
                      (f"/proc/{runtime.pid}/ns/net", "kata-py's own (the host's)")]
        with Netns(f"/proc/{pid1.pid}/ns/net") as netns, pytest.raises(HostNamespaceRefused, match=r"PID 1's"):
            refuse_host(netns, references)
        with Netns(f"/proc/{runtime.pid}/ns/net") as netns, pytest.raises(HostNamespaceRefused,
                                                                           match="kata-py's own"):
            refuse_host(netns, references)
        with Netns(f"/proc/{other.pid}/ns/net") as netns:
            refuse_host(netns, references)
    finally:
        for proc in (pid1, runtime, other):
            proc.kill()
            proc.wait()


def test_any_process_in_the_hosts_namespace_names_it():
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with Netns(f"/proc/{sleeper.pid}/ns/net") as netns, pytest.raises(HostNamespaceRefused):
            refuse_host(netns)
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_root
def test_a_bind_mount_of_the_hosts_namespace_is_refused(tmp_path):
    target = tmp_path / "netns"
    target.touch()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(target)], check=True)
    try:
        with pytest.raises(HostNamespaceRefused, match=str(target)):
            open_carriable(str(target))
    finally:
        subprocess.run(["umount", str(target)], check=True)


@needs_root
def test_a_private_namespace_is_accepted_and_a_carried_one_refused(private):
    path = f"/proc/{private.pid}/ns/net"
    open_carriable(path).close()
    with Netns(path) as netns:
        def add_tap_named_like_ours():
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("add", ifname="kp-tap0", kind="veth", peer={"ifname": "kpt-peer"})
        netns.run(add_tap_named_like_ours)
    with pytest.raises(NamespaceCarried, match="carried by another kata-py VM"):
        open_carriable(path)


def test_the_references_are_pid_1s_and_the_runtimes_own():
    assert [path for path, _ in HOST_REFERENCES] == ["/proc/1/ns/net", "/proc/self/ns/net"]


@pytest.mark.parametrize("namespaces, expected", [
    ([{"type": "network", "path": "/run/netns/cni-1"}], (True, "/run/netns/cni-1")),
    ([{"type": "network"}], (True, None)),
    ([{"type": "network", "path": ""}], (True, None)),
    ([{"type": "mount"}], (False, None)),
])
def test_network_entry(namespaces, expected):
    assert network_entry({"linux": {"namespaces": namespaces}}) == expected


def test_what_the_monitor_carries():
    with_path = {"linux": {"namespaces": [{"type": "network", "path": "/run/netns/pod"}]}}
    fresh = {"linux": {"namespaces": [{"type": "network"}]}}
    assert carried_path(with_path, 42) == "/run/netns/pod"
    assert carried_path(fresh, 42) == "/proc/42/ns/net"       # the new namespace create put it in
    assert carried_path({"linux": {"namespaces": [{"type": "pid"}]}}, 42) is None
    pause = dict(with_path, annotations={"io.kubernetes.cri.container-type": "sandbox"})
    assert is_pod_sandbox(pause) and carried_path(pause, 42) is None
    workload = dict(with_path, annotations={"io.kubernetes.cri.container-type": "container"})
    assert not is_pod_sandbox(workload) and carried_path(workload, 42) == "/run/netns/pod"
    assert is_pod_sandbox({"annotations": {"io.kubernetes.cri-o.ContainerType": "sandbox"}})
