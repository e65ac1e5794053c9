"""Container networking for real: network namespaces and veths made here (and
removed), the tap and tc mirroring made by kata-py in them, real guests that
talk TCP and ICMP through them, and namespaces left exactly as they were.

The first tests need root but no VM: kata-py's attach/detach against a real
kernel, and the agent's rtnetlink code run inside a namespace on the host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from kata_py.network import RECORD_NAME, NamespaceCarried, attach, detach_recorded
from kata_py.network.netns import Netns
from tests.bundles import make_bundle
from tests.network_helpers import _ipr, connect_until, link_names, snapshot
from tests.oci_helpers import assert_nothing_left, cli, monitors_under, reap

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))
from kata_agent.network import Network  # noqa: E402

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]

# Echoed through two TCG guests (each byte crosses both guests' stacks twice and
# a busybox relay): 16 MiB took ~20 s per direction on a quiet 2-core host, the
# longest exec in the suite. 4 MiB proves the same byte-exact path.
ECHO_BYTES = 4 << 20
NAMESPACES = [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]


def networked_bundle(directory: Path, args: list[str], netns_path: str | None, network_entry: bool = True) -> Path:
    entries = list(NAMESPACES)
    if network_entry:
        entries.append({"type": "network", "path": netns_path} if netns_path else {"type": "network"})
    return make_bundle(directory, args, linux={"namespaces": entries})


def mirred_targets(ns: str, link: str) -> list[int]:
    """The interfaces that mirred filters on `link`'s ingress redirect to."""
    targets = []
    with _ipr(ns) as ipr:
        for msg in ipr.get_filters(ipr.link_lookup(ifname=link)[0], parent=0xFFFFFFF2):
            options = msg.get_attr("TCA_OPTIONS")
            actions = options.get_attr("TCA_U32_ACT") if options is not None else None
            for _, action in actions["attrs"] if actions is not None else []:
                if action.get_attr("TCA_ACT_KIND") == "mirred":
                    targets.append(action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")["ifindex"])
    return targets


def index_of(ns: str, link: str) -> int:
    with _ipr(ns) as ipr:
        return ipr.link_lookup(ifname=link)[0]


# --- no VM: attach/detach and the agent's netlink code against a real kernel ---

def test_attach_mirrors_both_ways_and_detach_restores_the_namespace(namespaces, tmp_path):
    ns, peer = namespaces.create(), namespaces.create()
    namespaces.veth(ns, "eth0", "10.231.9.2/24", peer, "eth0", "10.231.9.1/24", mtu=1400)
    namespaces.route(ns, "10.231.10.0/24", "10.231.9.1")
    before = snapshot(ns)

    attachment = attach(namespaces.path(ns), tmp_path / RECORD_NAME, "web")
    try:
        assert len(attachment.nics) == 1
        tap = index_of(ns, "kp-tap0")
        assert mirred_targets(ns, "eth0") == [tap]
        assert mirred_targets(ns, "kp-tap0") == [index_of(ns, "eth0")]
        with _ipr(ns) as ipr:
            veth = ipr.get_links(index_of(ns, "eth0"))[0]
            tap_link = ipr.get_links(tap)[0]
        assert tap_link.get_attr("IFLA_MTU") == 1400
        nic = attachment.request["interfaces"][0]
        assert (nic["name"], nic["mac"], nic["mtu"]) == ("eth0", veth.get_attr("IFLA_ADDRESS"), 1400)
        assert nic["addresses"] == [{"address": "10.231.9.2", "prefix_len": 24}]
        assert nic["routes"] == [{"scope": "universe", "dst": "10.231.10.0", "dst_len": 24, "gateway": "10.231.9.1"}]
        assert "10.231.9.2\tweb" in attachment.request["hosts"]
        assert attachment.nics[0].qemu_args("mmio")[-1] == f"virtio-net-device,netdev=net0,mac={nic['mac']}"
        assert attachment.nics[0].qemu_args("pci")[-1].startswith("virtio-net-pci,")
    finally:
        attachment.detach()
    assert snapshot(ns) == before
    assert not (tmp_path / RECORD_NAME).exists()


def test_detach_removes_only_what_kata_py_made(namespaces, tmp_path):
    """A veth that already has an ingress qdisc and a filter of someone else's
    keeps both; after a "killed" monitor (fds closed, record left), the record
    alone is enough to undo."""
    ns, peer = namespaces.create(), namespaces.create()
    namespaces.veth(ns, "eth0", "10.231.11.2/24", peer, "eth0", "10.231.11.1/24")
    with _ipr(ns) as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        ipr.tc("add", "ingress", index, 0xFFFF0000)
        # Someone else's filter (it classifies one address, and nothing else)
        # at tc's default preference: ours must take another.
        ipr.tc("add-filter", "u32", index, parent=0xFFFFFFF2, prio=0xC000, protocol=0x0800, target=0x10001,
               keys=["0xcb007101/0xffffffff+16"])
    before = snapshot(ns)
    assert len(before["filters"]) > 0

    attachment = attach(namespaces.path(ns), tmp_path / RECORD_NAME)
    record = json.loads((tmp_path / RECORD_NAME).read_text())
    assert [m["what"] for m in record["made"]] == ["tap", "filter", "qdisc", "filter"]  # no qdisc on the veth
    attachment.release()              # as when the monitor and its QEMU are killed: the tap goes with the fd
    assert "kp-tap0" not in link_names(ns)
    assert snapshot(ns) != before     # the veth's filter is still there
    detach_recorded(tmp_path / RECORD_NAME)
    assert snapshot(ns) == before
    detach_recorded(tmp_path / RECORD_NAME)   # nothing left to do: a no-op


def test_a_namespace_already_carried_is_refused(namespaces, tmp_path):
    ns, peer = namespaces.create(), namespaces.create()
    namespaces.veth(ns, "eth0", "10.231.12.2/24", peer, "eth0", "10.231.12.1/24")
    first = attach(namespaces.path(ns), tmp_path / "first.json")
    try:
        carrying = snapshot(ns)
        with pytest.raises(NamespaceCarried, match="carried by another kata-py VM"):
            attach(namespaces.path(ns), tmp_path / "second.json")
        assert not (tmp_path / "second.json").exists()
        assert snapshot(ns) == carrying
        assert mirred_targets(ns, "eth0") == [index_of(ns, "kp-tap0")]
    finally:
        first.detach()


def test_no_network_path_attaches_nothing(tmp_path):
    attachment = attach(None, tmp_path / RECORD_NAME, "box")
    assert attachment.nics == [] and attachment.request["interfaces"] == []
    assert "127.0.1.1\tbox" in attachment.request["hosts"]
    assert not (tmp_path / RECORD_NAME).exists()


def test_agent_configures_nics_over_rtnetlink(namespaces, tmp_path):
    """The agent's own netlink code, in a namespace on the host: two NICs that
    must swap names, addresses of both families, routes through a gateway."""
    ns, peer = namespaces.create(), namespaces.create()
    namespaces.veth(ns, "eth0", "10.231.13.9/24", peer, "p0", "10.231.13.1/24")
    namespaces.veth(ns, "eth1", "10.231.14.9/24", peer, "p1", "10.231.14.1/24")
    with _ipr(ns) as ipr:
        macs = {name: ipr.get_links(ipr.link_lookup(ifname=name)[0])[0].get_attr("IFLA_ADDRESS")
                for name in ("eth0", "eth1")}
        for name in ("eth0", "eth1"):  # a fresh guest NIC: down, no address
            index = ipr.link_lookup(ifname=name)[0]
            ipr.flush_addr(index=index)
            ipr.link("set", index=index, state="down")
    interfaces = [
        {"name": "eth1", "mac": macs["eth0"], "mtu": 1300,
         "addresses": [{"address": "10.231.13.2", "prefix_len": 24}, {"address": "fd00:231::2", "prefix_len": 64}],
         "routes": [{"gateway": "10.231.13.1", "scope": "universe"},
                    {"dst": "10.231.50.0", "dst_len": 24, "gateway": "10.231.13.1", "metric": 5},
                    {"dst": "10.231.13.0", "dst_len": 24, "scope": "link"},     # the kernel's own: EEXIST
                    {"gateway": "fd00:231::1"}]},
        {"name": "eth0", "mac": macs["eth1"], "mtu": 1500, "addresses": [{"address": "10.231.14.2", "prefix_len": 24}]},
    ]
    network = Network(None, files_dir=str(tmp_path / "files"))
    with Netns(namespaces.path(ns)) as handle:
        done = handle.run(network.configure, interfaces, "127.0.0.1 localhost\n", "nameserver 192.0.2.53\n", "box")
    assert [(d["name"], d["mac"]) for d in done] == [("eth1", macs["eth0"]), ("eth0", macs["eth1"])]
    with _ipr(ns) as ipr:
        by_name = {m.get_attr("IFLA_IFNAME"): m for m in ipr.get_links()}
        assert by_name["eth1"].get_attr("IFLA_ADDRESS") == macs["eth0"]
        assert by_name["eth1"].get_attr("IFLA_MTU") == 1300 and by_name["eth1"]["flags"] & 1
        eth1 = by_name["eth1"]["index"]
        addresses = {(m.get_attr("IFA_ADDRESS"), m["prefixlen"]) for m in ipr.get_addr(index=eth1)}
        assert {("10.231.13.2", 24), ("fd00:231::2", 64)} <= addresses
        routes = {(m.get_attr("RTA_DST"), m["dst_len"], m.get_attr("RTA_GATEWAY"), m.get_attr("RTA_PRIORITY"))
                  for m in ipr.get_routes(family=socket.AF_UNSPEC, oif=eth1, table=254)}
        assert (None, 0, "10.231.13.1", None) in routes
        assert ("10.231.50.0", 24, "10.231.13.1", 5) in routes
        assert any(gateway == "fd00:231::1" for _, _, gateway, _ in routes)
    files = {p.name: p.read_text() for p in (tmp_path / "files").iterdir()}
    assert files == {"hosts": "127.0.0.1 localhost\n", "resolv.conf": "nameserver 192.0.2.53\n", "hostname": "box\n"}


# --- real guests ---

def _serve_forever(port: int, command: str) -> list[str]:
    """A container init that serves one connection after another on `port`."""
    return ["sh", "-c", f"while :; do {command}; done"]


def _exec(root: Path, container_id: str, script: str, timeout: float = 300):
    return cli(root, "exec", container_id, "sh", "-c", script, timeout=timeout)


def _start(root: Path, container_id: str, bundle: Path, logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{container_id}.out", "wb") as out:
        result = cli(root, "create", "--bundle", bundle, container_id, stdout=out, stderr=out)
    assert result.returncode == 0, (logs / f"{container_id}.out").read_text()
    result = cli(root, "start", container_id)
    assert result.returncode == 0, result.stderr


def _stop(root: Path, container_id: str) -> None:
    pid = json.loads(cli(root, "state", container_id).stdout)["pid"]
    assert cli(root, "kill", container_id, "KILL").returncode == 0
    reap(pid, timeout=60)
    result = cli(root, "delete", container_id)
    assert result.returncode == 0, result.stderr


@pytest.mark.vm
def test_two_containers_talk_tcp_both_ways_and_ping(namespaces, tmp_path):
    left, right = namespaces.create(), namespaces.create()
    namespaces.veth(left, "eth0", "10.231.1.1/24", right, "eth0", "10.231.1.2/24")
    before = {left: snapshot(left), right: snapshot(right)}
    root = tmp_path / "root"
    data = os.urandom(ECHO_BYTES)
    bundles = {}
    for name, ns in (("left", left), ("right", right)):
        bundles[name] = networked_bundle(tmp_path / name, _serve_forever(5000, "nc -l -p 5000 -e cat"),
                                         namespaces.path(ns))
        (bundles[name] / "rootfs" / "data").write_bytes(data)
        _start(root, name, bundles[name], tmp_path / "logs")

    for client, server_address in (("right", "10.231.1.1"), ("left", "10.231.1.2")):
        result = _exec(root, client, f"nc {server_address} 5000 < /data > /echo")
        assert result.returncode == 0, result.stderr
        echoed = (bundles[client] / "rootfs" / "echo").read_bytes()
        assert len(echoed) == ECHO_BYTES and echoed == data, f"{client}: {len(echoed)} bytes back"
        result = _exec(root, client, f"ping -c 3 -W 10 {server_address}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert b"3 packets received" in result.stdout

    for name in ("left", "right"):
        _stop(root, name)
    assert {left: snapshot(left), right: snapshot(right)} == before
    assert_nothing_left(root)


@pytest.mark.vm
def test_host_reaches_a_server_in_the_container(namespaces, tmp_path, image):
    """Through either of two interfaces: the guest gets one NIC per veth."""
    ns = namespaces.create()
    namespaces.veth(None, f"kpt{os.getpid() % 100000}h", "10.231.2.1/24", ns, "eth0", "10.231.2.2/24")
    namespaces.veth(None, f"kpt{os.getpid() % 100000}i", "10.231.4.1/24", ns, "eth1", "10.231.4.2/24", mtu=1280)
    namespaces.route(ns, "0.0.0.0/0", "10.231.2.1")
    root = tmp_path / "root"
    bundle = networked_bundle(tmp_path / "web", _serve_forever(8080, 'echo "hello from $(uname -r)" | nc -l -p 8080'),
                              namespaces.path(ns))
    _start(root, "web", bundle, tmp_path / "logs")
    try:
        for address in ("10.231.2.2", "10.231.4.2"):
            with connect_until((address, 8080), time.monotonic() + 120) as conn:
                conn.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
            assert reply.decode().strip() == f"hello from {image.kernel_release}" != f"hello from {os.uname().release}"
        # The guest's view: its NICs have the veths' names, addresses and MTUs, and a default route.
        result = _exec(root, "web", "ip -o addr show eth0; ip -o link show eth1; ip -o addr show eth1; ip route")
        out = result.stdout.decode()
        assert "10.231.2.2/24" in out and "10.231.4.2/24" in out and "mtu 1280" in out, out
        assert "default via 10.231.2.1 dev eth0" in out, out
    finally:
        _stop(root, "web")
    assert_nothing_left(root)


@pytest.mark.vm
@pytest.mark.parametrize("entry", ["new namespace", "no network entry"])
def test_without_a_namespace_path_the_guest_has_only_loopback(tmp_path, entry):
    root = tmp_path / "root"
    bundle = networked_bundle(tmp_path / "b", ["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"], None,
                              network_entry=entry == "new namespace")
    result = cli(root, "run", "--bundle", bundle, "lo-only", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"lo"]
    assert_nothing_left(root)


@pytest.mark.vm
@pytest.mark.parametrize("how", ["delete", "delete --force after the monitor was killed"])
def test_delete_leaves_the_namespace_as_it_was(namespaces, tmp_path, how):
    ns, peer = namespaces.create(), namespaces.create()
    namespaces.veth(ns, "eth0", "10.231.3.2/24", peer, "eth0", "10.231.3.1/24")
    before = snapshot(ns)
    root = tmp_path / "root"
    bundle = networked_bundle(tmp_path / "b", ["sleep", "1000"], namespaces.path(ns))
    with open(tmp_path / "out", "wb") as out:
        result = cli(root, "create", "--bundle", bundle, "d1", stdout=out, stderr=out)
    assert result.returncode == 0, (tmp_path / "out").read_text()
    during = snapshot(ns)
    assert "kp-tap0" in [link[1] for link in during["links"]]
    assert len(during["filters"]) > len(before["filters"]) and len(during["qdiscs"]) > len(before["qdiscs"])
    assert (root / "d1" / RECORD_NAME).exists()
    pid = json.loads(cli(root, "state", "d1").stdout)["pid"]
    if how == "delete":
        result = cli(root, "delete", "--force", "d1")
    else:
        os.kill(pid, signal.SIGKILL)
        reap(pid)
        assert json.loads(cli(root, "state", "d1").stdout)["status"] == "stopped"
        assert snapshot(ns) != before   # the tap went with QEMU; the veth's qdisc and filter remain
        result = cli(root, "delete", "--force", "d1")
    assert result.returncode == 0, result.stderr
    if how == "delete":
        reap(pid)
    assert snapshot(ns) == before
    assert monitors_under(root) == []
    assert_nothing_left(root)
