"""kata-py never carries the host's network namespace, or one another VM
carries, into a VM.

So that a regression can never hit this machine's own network, the "host"
here is a private namespace in which the test starts kata-py (`nsenter
--net=`, which keeps the host's /sys and cgroup mounts, unlike `ip netns
exec`): "kata-py's own namespace" is that one. Each refusal must leave the
namespace's links, qdiscs and filters exactly as they were (`ip -d link`, `tc
-s qdisc`, `tc -s filter`), and nothing under --root. PID 1's own spelling is
covered by the unit tests of the identity check (tests/unit/test_network_guard.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.bundles import make_bundle
from tests.network_helpers import Namespaces, snapshot
from tests.oci_helpers import assert_nothing_left, cli, reap

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]

NAMESPACES = [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]


def inside(ns: str, *argv, **kwargs) -> subprocess.CompletedProcess:
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *map(str, argv)], timeout=300, **kwargs)


def quiet(namespaces: Namespaces) -> str:
    """A namespace that sends nothing by itself (no IPv6 router solicitations),
    so its counters change only if kata-py touches it."""
    ns = namespaces.create()
    result = inside(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    assert result.returncode == 0, result.stderr
    return ns


def tc_view(ns: str) -> str:
    """`ip -d link`, `tc -s qdisc` and each link's `tc -s filter`, counters and all."""
    parts = []
    for argv in (["ip", "-d", "link"], ["tc", "-s", "qdisc"]):
        result = inside(ns, *argv)
        assert result.returncode == 0, result.stderr
        parts.append(result.stdout.decode())
    links = json.loads(inside(ns, "ip", "-j", "link").stdout)
    for link in links:
        for parent in ("ingress", "root"):
            result = inside(ns, "tc", "-s", "filter", "show", "dev", link["ifname"], parent)
            parts.append(f"{link['ifname']} {parent}: {result.stdout.decode()}{result.stderr.decode()}")
    return "\n".join(parts)


def bundle_with(directory: Path, netns_path: str | None) -> Path:
    network = {"type": "network", "path": netns_path} if netns_path else {"type": "network"}
    return make_bundle(directory, ["sleep", "1000"], linux={"namespaces": NAMESPACES + [network]})


def refused_once(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("kata-py: "), \
        (result.returncode, lines)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_the_runtimes_own_namespace_is_refused_under_every_name(namespaces, tmp_path):
    host, peer = quiet(namespaces), quiet(namespaces)
    namespaces.veth(host, "eth0", "10.231.40.2/24", peer, "eth0", "10.231.40.1/24")
    sleeper = subprocess.Popen(["nsenter", f"--net=/run/netns/{host}", "sleep", "300"])
    alias = tmp_path / "alias"
    alias.touch()
    subprocess.run(["mount", "--bind", f"/run/netns/{host}", str(alias)], check=True)
    root = tmp_path / "root"
    try:
        names = ["/proc/self/ns/net", f"/run/netns/{host}", str(alias),
                 f"/proc/{sleeper.pid}/ns/net", "/proc/thread-self/ns/net"]
        before = tc_view(host)
        for number, path in enumerate(names):
            bundle = bundle_with(tmp_path / f"b{number}", path)
            result = cli(root, "create", "--bundle", bundle, f"c{number}", netns=host, io=tmp_path / "out", timeout=300)
            refused_once(result, f"network namespace {path} is kata-py's own", "off its network")
            assert tc_view(host) == before, path
            assert_nothing_left(root)
        # `run` takes the same path as create.
        result = cli(root, "run", "--bundle", tmp_path / "b0", "r0", netns=host, io=tmp_path / "out", timeout=300)
        refused_once(result, "kata-py's own")
        assert tc_view(host) == before
        assert_nothing_left(root)
    finally:
        subprocess.run(["umount", str(alias)])
        sleeper.kill()
        sleeper.wait()


@pytest.mark.vm
def test_a_namespace_another_vm_carries_is_refused(namespaces, tmp_path):
    host, pod, peer = quiet(namespaces), quiet(namespaces), quiet(namespaces)
    namespaces.veth(pod, "eth0", "10.231.41.2/24", peer, "eth0", "10.231.41.1/24")
    root = tmp_path / "root"
    original = snapshot(pod)
    bundle = bundle_with(tmp_path / "first", f"/run/netns/{pod}")
    result = cli(root, "create", "--bundle", bundle, "first", netns=host, io=tmp_path / "out", timeout=300)
    assert result.returncode == 0, result.stderr
    result = cli(root, "state", "first", netns=host)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    # The container's pid (its monitor) lives in the namespace it carries, as
    # a runc container's init would: clients read the pod's network from it.
    assert os.stat(f"/proc/{state['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{pod}").st_ino
    # The guest may send on its NIC at any time: compare what exists, not counters.
    carrying = snapshot(pod)
    assert "kp-tap0" in [link[1] for link in carrying["links"]]

    second = bundle_with(tmp_path / "second", f"/run/netns/{pod}")
    result = cli(root, "create", "--bundle", second, "second", netns=host, io=tmp_path / "out", timeout=300)
    refused_once(result, f"network namespace /run/netns/{pod} is carried by another kata-py VM")
    assert snapshot(pod) == carrying
    assert sorted(p.name for p in root.iterdir()) == ["first"]

    result = cli(root, "delete", "--force", "first", netns=host, io=tmp_path / "out", timeout=300)
    assert result.returncode == 0, result.stderr
    reap(state["pid"])
    assert snapshot(pod) == original
    assert_nothing_left(root)
