"""The host side of container networking without a kernel to change: which
interfaces, addresses and routes the guest takes over, the files it gets, the
QEMU arguments, the record of what was made, the namespace checks."""

from __future__ import annotations

import json
import os
import socket

import pytest

from kata_py.network import NetworkError, namespace_path
from kata_py.network.attach import GuestNic, configure_request
from kata_py.network.files import _without_loopback_servers, hosts_file
from kata_py.network.netns import Netns
from kata_py.network.record import Made, Record, load
from kata_py.network.scan import Endpoint, endpoints
from kata_py.protocol.messages import SchemaError, check_request

V4, V6 = socket.AF_INET, socket.AF_INET6


def link(index, name, kind="veth", type_=1, mac="aa:bb:cc:00:00:01", mtu=1500):
    return {"index": index, "name": name, "kind": kind, "type": type_, "mac": mac, "mtu": mtu}


def route(oif, family=V4, dst=None, dst_len=0, gateway=None, proto=4, table=254, type_=1, scope=0, flags=0,
          source=None, metric=None):
    return {"family": family, "table": table, "type": type_, "proto": proto, "scope": scope, "flags": flags,
            "dst": dst, "dst_len": dst_len, "gateway": gateway, "source": source, "metric": metric, "oif": oif}


def test_only_ethernet_like_links_are_carried():
    links = [link(1, "lo", kind=None, type_=772, mac="00:00:00:00:00:00"),
             link(2, "eth0", mac="AA:BB:CC:00:00:02", mtu=1400),
             link(3, "br0", kind="bridge"), link(4, "kp-tap0", kind="tun"), link(5, "kp-tap1", kind=None),
             link(6, "mv0", kind="macvlan", mac="aa:bb:cc:00:00:06"), link(7, "wg0", kind="wireguard", type_=65534),
             link(8, "phys0", kind=None, mac="aa:bb:cc:00:00:08")]
    found = endpoints(links, [], [])
    assert [(e.name, e.index, e.mac, e.mtu) for e in found] == [
        ("eth0", 2, "aa:bb:cc:00:00:02", 1400), ("mv0", 6, "aa:bb:cc:00:00:06", 1500),
        ("phys0", 8, "aa:bb:cc:00:00:08", 1500)]


def test_addresses_keep_global_ones_of_the_link():
    addresses = [{"index": 2, "family": V4, "address": "10.0.0.2", "prefix_len": 24, "scope": 0},
                 {"index": 2, "family": V6, "address": "fd00::2", "prefix_len": 64, "scope": 0},
                 {"index": 2, "family": V6, "address": "fe80::1", "prefix_len": 64, "scope": 253},
                 {"index": 2, "family": V4, "address": "127.0.0.5", "prefix_len": 8, "scope": 254},
                 {"index": 9, "family": V4, "address": "10.9.9.9", "prefix_len": 24, "scope": 0}]
    (found,) = endpoints([link(2, "eth0")], addresses, [])
    assert found.addresses == [{"address": "10.0.0.2", "prefix_len": 24}, {"address": "fd00::2", "prefix_len": 64}]


def test_routes_skip_the_kernels_own_and_other_tables():
    routes = [route(2, gateway="10.0.0.1"),
              route(2, dst="10.0.0.0", dst_len=24, proto=2, scope=253),                     # kernel prefix route
              route(2, dst="10.5.0.0", dst_len=16, gateway="10.0.0.9", metric=20, source="10.0.0.2"),
              route(2, dst="192.0.2.0", dst_len=24, scope=253),                             # a device route
              route(2, gateway="192.0.2.1", flags=0x4),                                     # onlink
              route(2, dst="10.7.0.0", dst_len=16, gateway="10.0.0.1", table=100),          # policy table
              route(2, dst="10.8.0.0", dst_len=16, type_=6),                                # prohibit
              route(3, gateway="10.0.1.1"),                                                 # another link
              route(2, family=V6, dst="fe80::", dst_len=64, proto=3),
              route(2, family=V6, gateway="fd00::1", metric=1024),
              route(2, family=V6, dst=None, scope=253)]                                     # default dev eth0
    (found,) = endpoints([link(2, "eth0")], [], routes)
    assert found.routes == [
        {"scope": "universe", "gateway": "10.0.0.1"},
        {"scope": "universe", "dst": "10.5.0.0", "dst_len": 16, "gateway": "10.0.0.9", "source": "10.0.0.2",
         "metric": 20},
        {"scope": "link", "dst": "192.0.2.0", "dst_len": 24},
        {"scope": "universe", "gateway": "192.0.2.1", "onlink": True},
        {"scope": "universe", "gateway": "fd00::1", "metric": 1024},
        {"scope": "link", "dst": "::", "dst_len": 0}]


def test_the_request_fits_the_agents_schema():
    endpoint = Endpoint("eth0", 2, "aa:bb:cc:00:00:02", 1450, [{"address": "10.0.0.2", "prefix_len": 24}],
                        [{"scope": "universe", "gateway": "10.0.0.1"}])
    request = configure_request("web-1", [endpoint], None)
    check_request({"id": 1, "type": "configure_network", "args": request})
    assert request["interfaces"][0]["name"] == "eth0"
    assert "10.0.0.2\tweb-1" in request["hosts"]
    endpoint.guest_name = "eth0"
    assert endpoint.guest_nic()["name"] == "eth0"


@pytest.mark.parametrize("change,path", [
    (lambda a: a["interfaces"].extend([a["interfaces"][0]] * 8), "/args/interfaces"),
    (lambda a: a.update(hosts="x" * (64 * 1024 + 1)), "/args/hosts"),
    (lambda a: a["interfaces"][0].update(mac="AA:BB:CC:00:00:02"), "/args/interfaces/0/mac"),
    (lambda a: a["interfaces"][0].update(name="x" * 16), "/args/interfaces/0/name"),
    (lambda a: a["interfaces"][0].update(name="eth0\n"), "/args/interfaces/0/name"),
    (lambda a: a["interfaces"][0].update(mtu=67), "/args/interfaces/0/mtu"),
    (lambda a: a["interfaces"][0]["addresses"][0].update(address="10.0.0.2; rm"), "/args/interfaces/0/addresses/0"),
    (lambda a: a["interfaces"][0]["routes"][0].update(scope="site"), "/args/interfaces/0/routes/0/scope"),
    (lambda a: a["interfaces"][0]["routes"][0].update(table=5), "/args/interfaces/0/routes/0"),
    (lambda a: a.pop("resolv_conf"), "/args"),
])
def test_the_schema_bounds_the_request(change, path):
    args = {"interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500,
                            "addresses": [{"address": "10.0.0.2", "prefix_len": 24}],
                            "routes": [{"gateway": "10.0.0.1"}]}],
            "hosts": "", "resolv_conf": "", "hostname": "h"}
    check_request({"id": 1, "type": "configure_network", "args": json.loads(json.dumps(args))})
    change(args)
    with pytest.raises(SchemaError) as caught:
        check_request({"id": 1, "type": "configure_network", "args": args})
    assert caught.value.path.startswith(path)


def test_hosts_file_names_the_container():
    assert hosts_file("", []).splitlines() == ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    assert hosts_file("box", []).splitlines()[-1] == "127.0.1.1\tbox"
    v6_first = Endpoint("eth0", 2, "aa:bb:cc:00:00:02", 1500,
                        [{"address": "fd00::2", "prefix_len": 64}, {"address": "10.0.0.2", "prefix_len": 24}])
    assert hosts_file("box", [v6_first]).splitlines()[-1] == "10.0.0.2\tbox"
    v6_first.addresses.pop()
    assert hosts_file("box", [v6_first]).splitlines()[-1] == "fd00::2\tbox"


def test_loopback_name_servers_are_dropped():
    text = "# generated\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 192.0.2.53\nsearch example.org\n"
    assert _without_loopback_servers(text) == "# generated\nnameserver 192.0.2.53\nsearch example.org\n"
    assert _without_loopback_servers("nameserver 127.0.0.1\n") == ""


@pytest.mark.parametrize("namespaces,expected", [
    ([{"type": "network", "path": "/run/netns/cni-1"}, {"type": "mount"}], "/run/netns/cni-1"),
    ([{"type": "network"}], None),
    ([{"type": "network", "path": ""}], None),
    ([{"type": "mount"}], None),
])
def test_which_namespace_is_carried(namespaces, expected):
    assert namespace_path({"linux": {"namespaces": namespaces}}) == expected
    assert namespace_path({}) is None


def test_guest_nic_qemu_arguments_follow_the_bus():
    nic = GuestNic("net0", 17, "aa:bb:cc:00:00:02")
    assert nic.qemu_args("mmio") == ["-netdev", "tap,id=net0,fd=17",
                                     "-device", "virtio-net-device,netdev=net0,mac=aa:bb:cc:00:00:02"]
    assert nic.qemu_args("pci")[-1] == "virtio-net-pci,netdev=net0,mac=aa:bb:cc:00:00:02"


def test_record_round_trip_and_damage(tmp_path):
    path = tmp_path / "network.json"
    assert load(path) is None
    record = Record(path, "/run/netns/x", (4, 12345))
    record.add(Made("tap", "kp-tap0", 7))
    record.add(Made("filter", "eth0", 2, 49152))
    loaded = load(path)
    assert (loaded.netns, loaded.identity, loaded.made) == ("/run/netns/x", (4, 12345), record.made)
    record.remove()
    assert not path.exists()
    path.write_text('{"netns": "/x", "made": []}')
    with pytest.raises(NetworkError, match="unreadable"):
        load(path)
    path.write_text("x" * (2 << 20))
    with pytest.raises(NetworkError, match="unreadable"):
        load(path)


def test_only_a_network_namespace_is_accepted(tmp_path):
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(NetworkError, match="not a namespace"):
        Netns(str(plain))
    with pytest.raises(NetworkError, match="not a network namespace"):
        Netns("/proc/self/ns/uts")
    with pytest.raises(NetworkError, match="No such file"):
        Netns(str(tmp_path / "missing"))


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")
def test_work_in_a_namespace_returns_or_raises():
    with Netns("/proc/self/ns/net") as own:
        assert own.run(lambda: 42) == 42
        with pytest.raises(ZeroDivisionError):
            own.run(lambda: 1 // 0)


def test_features_tell_what_the_network_namespace_does():
    from kata_py.cli.features import features

    reported = features()
    assert "network" in reported["linux"]["namespaces"]
    assert "loopback only" in reported["annotations"]["io.kata-py.network"]
