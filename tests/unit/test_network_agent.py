"""The guest agent's network set-up without a kernel: rtnetlink messages as
bytes, reply parsing against a fake socket, the order of steps against a
recording fake, and the handler's checks."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from kata_agent import rtnetlink  # noqa: E402
from kata_agent.handlers import Handlers  # noqa: E402
from kata_agent.network import Network  # noqa: E402
from kata_agent.processes import ProcessError, ProcessTable  # noqa: E402
from kata_agent.rtnetlink import (IFA_F_NODAD, NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR, RTM_NEWLINK, Link,  # noqa: E402
                                  NetlinkError, Rtnl, address_request, attr, link_request, message,
                                  parse_attrs, parse_link, route_request, split_messages)


def test_attributes_are_padded_and_parse_back():
    raw = attr(3, b"eth0\0") + attr(4, struct.pack("=I", 1400)) + attr(1, bytes.fromhex("aabbcc000002"))
    assert len(attr(3, b"eth0\0")) == 12          # 4 header + 5 payload, padded to 4
    assert parse_attrs(raw) == {3: b"eth0\0", 4: struct.pack("=I", 1400), 1: bytes.fromhex("aabbcc000002")}
    assert parse_attrs(raw[:-3]) == {3: b"eth0\0", 4: struct.pack("=I", 1400)}  # a cut attribute is dropped


def test_a_link_message_parses():
    payload = (struct.pack("=BxHiII", 0, 1, 7, 0x1003, 0) + attr(3, b"eth0\0") + attr(4, struct.pack("=I", 9000))
               + attr(1, bytes.fromhex("AABBCC000002")))
    link = parse_link(payload)
    assert (link.index, link.name, link.mac, link.flags, link.mtu) == (7, "eth0", "aa:bb:cc:00:00:02", 0x1003, 9000)


def test_link_request_changes_only_what_is_asked():
    family, _, index, flags, change = struct.unpack_from("=BxHiII", link_request(5, mtu=1400, up=True))
    assert (index, flags, change) == (5, 1, 1)
    assert parse_attrs(link_request(5, mtu=1400, up=True)[16:]) == {4: struct.pack("=I", 1400)}
    _, _, _, flags, change = struct.unpack_from("=BxHiII", link_request(5, name="eth1"))
    assert (flags, change) == (0, 0)
    assert parse_attrs(link_request(5, name="eth1")[16:]) == {3: b"eth1\0"}


def test_address_requests():
    family, prefix, flags, scope, index = struct.unpack_from("=BBBBI", address_request(3, "10.0.0.2", 24))
    assert (family, prefix, flags, index) == (socket.AF_INET, 24, 0, 3)
    assert parse_attrs(address_request(3, "10.0.0.2", 24)[8:]) == {1: bytes([10, 0, 0, 2]), 2: bytes([10, 0, 0, 2])}
    family, prefix, flags, _, _ = struct.unpack_from("=BBBBI", address_request(3, "fd00::2", 64))
    assert (family, prefix, flags) == (socket.AF_INET6, 64, IFA_F_NODAD)


def test_route_requests():
    body = route_request(4, {"dst": "10.5.0.0", "dst_len": 16, "gateway": "10.0.0.1", "metric": 20,
                             "source": "10.0.0.2", "onlink": True})
    family, dst_len, _, _, table, proto, scope, kind, flags = struct.unpack_from("=BBBBBBBBI", body)
    assert (family, dst_len, table, proto, scope, kind, flags) == (socket.AF_INET, 16, 254, 4, 0, 1, 4)
    attrs = parse_attrs(body[12:])
    assert attrs[1] == bytes([10, 5, 0, 0]) and attrs[5] == bytes([10, 0, 0, 1]) and attrs[7] == bytes([10, 0, 0, 2])
    assert attrs[6] == struct.pack("=I", 20) and attrs[4] == struct.pack("=I", 4)
    # A default route: no RTA_DST, length 0; the family follows the gateway.
    body = route_request(4, {"gateway": "fd00::1"})
    family, dst_len, *_ = struct.unpack_from("=BBBBBBBBI", body)
    assert (family, dst_len) == (socket.AF_INET6, 0) and 1 not in parse_attrs(body[12:])
    # Without a gateway, a route is on the link.
    assert struct.unpack_from("=BBBBBBBBI", route_request(4, {"dst": "192.0.2.0", "dst_len": 24}))[6] == 253


class FakeSocket:
    """Hands out prepared datagrams; remembers what was sent."""

    def __init__(self, datagrams):
        self.datagrams = list(datagrams)
        self.sent = []

    def sendto(self, data, address):
        self.sent.append(data)

    def recv(self, size):
        return self.datagrams.pop(0)

    def close(self):
        pass


def rtnl_with(datagrams) -> Rtnl:
    rtnl = Rtnl.__new__(Rtnl)
    rtnl.sock = FakeSocket(datagrams)
    rtnl.seq = 0
    return rtnl


def ack(seq, error=0):
    return message(NLMSG_ERROR, 0, seq, struct.pack("=i", -error) + b"\0" * 16)


def link_payload(index, name, mac):
    return struct.pack("=BxHiII", 0, 1, index, 0, 0) + attr(3, name.encode() + b"\0") + attr(1, bytes.fromhex(mac))


def test_a_dump_spans_datagrams_and_ends_at_done():
    rtnl = rtnl_with([
        ack(99),  # a stale answer to an earlier request: skipped
        message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(1, "lo", "000000000000"))
        + message(RTM_NEWLINK, NLM_F_MULTI, 1, link_payload(2, "eth0", "aabbcc000002")),
        message(NLMSG_DONE, NLM_F_MULTI, 1, b"\0" * 4),
    ])
    assert [(link.index, link.name, link.mac) for link in rtnl.links()] == [
        (1, "lo", "00:00:00:00:00:00"), (2, "eth0", "aa:bb:cc:00:00:02")]


def test_an_error_ack_raises_with_its_errno():
    rtnl = rtnl_with([ack(1, error=17), ack(2)])
    with pytest.raises(NetlinkError) as caught:
        rtnl.add_address(2, "10.0.0.2", 24)
    assert caught.value.errno == 17
    rtnl.set_link(2, up=True)
    sent = list(split_messages(rtnl.sock.sent[1]))
    assert sent[0][:3] == (RTM_NEWLINK, rtnetlink.NLM_F_REQUEST | rtnetlink.NLM_F_ACK, 2)


def test_a_truncated_message_is_refused():
    with pytest.raises(NetlinkError):
        list(split_messages(struct.pack("=IHHII", 64, 16, 0, 1, 0) + b"\0" * 8))


class FakeRtnl:
    """Records every step; links as given; errors to raise by step."""

    def __init__(self, links, fail=None):
        self.links_now = links
        self.fail = fail or {}
        self.steps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def links(self):
        return [Link(link.index, link.name, link.mac, link.flags, link.mtu) for link in self.links_now]

    def _do(self, step):
        self.steps.append(step)
        error = self.fail.get(step[0])
        if error:
            raise NetlinkError(error, os.strerror(error))

    def set_link(self, index, name=None, mtu=None, up=None):
        self._do(("link", index, name, mtu, up))

    def add_address(self, index, address, prefix_len):
        self._do(("address", index, address, prefix_len))

    def add_route(self, index, route):
        self._do(("route", index, route.get("dst"), route.get("gateway")))


GUEST_LINKS = [Link(1, "lo", "00:00:00:00:00:00", 0, 65536), Link(2, "eth0", "aa:bb:cc:00:00:02", 0, 1500),
               Link(3, "eth1", "aa:bb:cc:00:00:03", 0, 1500)]


def configure(tmp_path, interfaces, fake, ready=None):
    network = Network(ready, rtnl_factory=lambda: fake, files_dir=str(tmp_path / "net"))
    return network.configure(interfaces, "hosts\n", "resolv\n", "box")


def test_nics_swap_names_through_temporary_ones_and_routes_via_gateways_come_last(tmp_path):
    fake = FakeRtnl(GUEST_LINKS)
    done = configure(tmp_path, [
        {"name": "eth1", "mac": "aa:bb:cc:00:00:02", "mtu": 1400,
         "addresses": [{"address": "10.0.0.2", "prefix_len": 24}],
         "routes": [{"gateway": "10.0.0.1"}, {"dst": "192.0.2.0", "dst_len": 24}]},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "mtu": 1500}], fake)
    assert done == [{"name": "eth1", "mac": "aa:bb:cc:00:00:02", "index": 2},
                    {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "index": 3}]
    assert fake.steps == [
        ("link", 2, "kpnic0", None, None), ("link", 3, "kpnic1", None, None),
        ("link", 2, "eth1", None, None), ("link", 3, "eth0", None, None),
        ("link", 2, None, 1400, True), ("address", 2, "10.0.0.2", 24),
        ("link", 3, None, 1500, True),
        ("route", 2, "192.0.2.0", None), ("route", 2, None, "10.0.0.1")]
    assert {p.name: p.read_text() for p in (tmp_path / "net").iterdir()} == {
        "hosts": "hosts\n", "resolv.conf": "resolv\n", "hostname": "box\n"}


def test_a_nic_already_named_right_is_not_renamed(tmp_path):
    fake = FakeRtnl(GUEST_LINKS)
    configure(tmp_path, [{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500}], fake)
    assert fake.steps == [("link", 2, None, 1500, True)]


def test_no_interfaces_still_writes_the_files(tmp_path):
    fake = FakeRtnl(GUEST_LINKS)
    assert configure(tmp_path, [], fake) == []
    assert fake.steps == [] and (tmp_path / "net" / "hosts").read_text() == "hosts\n"


def test_failures_name_the_step(tmp_path):
    nic = {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500,
           "addresses": [{"address": "10.0.0.2", "prefix_len": 24}], "routes": [{"gateway": "10.0.0.1"}]}
    with pytest.raises(ProcessError, match="no guest NIC with MAC aa:bb:cc:00:00:09") as caught:
        configure(tmp_path, [dict(nic, mac="aa:bb:cc:00:00:09")], FakeRtnl(GUEST_LINKS))
    assert caught.value.code == "not_found"
    with pytest.raises(ProcessError, match="eth0: route default via 10.0.0.1: Network is unreachable"):
        configure(tmp_path, [nic], FakeRtnl(GUEST_LINKS, fail={"route": 101}))
    # EEXIST (what the kernel made itself) is not a failure.
    configure(tmp_path, [nic], FakeRtnl(GUEST_LINKS, fail={"address": 17, "route": 17}))


def test_waits_for_the_nic_driver(tmp_path):
    ready = threading.Event()
    network = Network(ready, rtnl_factory=lambda: FakeRtnl(GUEST_LINKS), files_dir=str(tmp_path / "net"))
    network.MODULES_TIMEOUT = 0.01
    with pytest.raises(ProcessError, match="network modules did not load"):
        network.configure([], "", "", "")
    ready.set()
    assert network.configure([], "", "", "") == []


@pytest.mark.parametrize("interfaces,message", [
    ([{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500}, {"name": "eth1", "mac": "aa:bb:cc:00:00:02",
                                                                  "mtu": 1500}], "same mac"),
    ([{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500}, {"name": "eth0", "mac": "aa:bb:cc:00:00:03",
                                                                  "mtu": 1500}], "same name"),
    ([{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500,
       "addresses": [{"address": "10.0.0.256", "prefix_len": 24}]}], "not an IP address"),
    ([{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500,
       "addresses": [{"address": "10.0.0.2", "prefix_len": 33}]}], "prefix too long"),
    ([{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500,
       "routes": [{"dst": "10.0.0.0", "dst_len": 8, "gateway": "fd00::1"}]}], "mixes IPv4 and IPv6"),
    ([{"name": "eth0", "mac": "aa:bb:cc:00:00:02", "mtu": 1500, "routes": [{"metric": 5}]}], "no dst, gateway"),
])
def test_the_handler_refuses_what_the_schema_cannot(tmp_path, interfaces, message):
    fake = FakeRtnl(GUEST_LINKS)
    handlers = Handlers(ProcessTable(), power_off=lambda: None,
                        network=Network(None, rtnl_factory=lambda: fake, files_dir=str(tmp_path / "net")))
    with pytest.raises(ProcessError, match=message) as caught:
        handlers.dispatch("configure_network", {"interfaces": interfaces, "hosts": "", "resolv_conf": ""})
    assert caught.value.code == "invalid" and fake.steps == []
    assert not (tmp_path / "net").exists()
