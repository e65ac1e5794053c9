"""Host network reachability. The harness listens on the host's loopback
and on a host address; the container, given no network namespace path,
tries to connect and send a token. Only the listener's word counts: a
connection that carried the token reached the host."""

from __future__ import annotations

import secrets

from .host import host_address
from .probe import Output, Probe, SkipProbe, Verdict, broke, held, one_line

CONNECT = r"""
echo "addresses=$(ip -o -4 addr 2>/dev/null | awk '{print $2 "=" $4}' | tr '\n' ' ')"
if out=$(echo "$H_TOKEN" | nc -w 3 "$H_ADDR" "$H_PORT" 2>&1); then echo "connect=done $out"
else echo "connect=failed: $out"; fi
"""


def _setup(name: str, address: str | None, host) -> dict[str, str]:
    if address is None:
        raise SkipProbe("this host has no global IPv4 address to listen on")
    listener = host.listener(address)
    token = "net-" + secrets.token_hex(12)
    host.fixtures[name] = (listener, token)
    return {"H_ADDR": address, "H_PORT": str(listener.port), "H_TOKEN": token}


def _check(name: str, output: Output, host) -> Verdict:
    listener, token = host.fixtures[name]
    where = f"{listener.address}:{listener.port}"
    for peer, data in listener.received:
        if token.encode() in data:
            return broke(f"the host's listener on {where} got the container's token from {peer}")
    addresses = output.value("addresses").strip() or "none"
    return held(one_line(f"nothing reached the host's {where}; container: {output.value('connect') or 'no report'}; "
                         f"its addresses: {addresses}"))


LOOPBACK = Probe(
    name="net-host-loopback",
    title="connect to a TCP listener on the host's 127.0.0.1",
    setup=lambda host: _setup("net-host-loopback", "127.0.0.1", host),
    script=CONNECT,
    evidence=("addresses", "connect"),
    check=lambda output, host: _check("net-host-loopback", output, host))

ADDRESS = Probe(
    name="net-host-address",
    title="connect to a TCP listener on a host address",
    setup=lambda host: _setup("net-host-address", host_address(), host),
    script=CONNECT,
    evidence=("addresses", "connect"),
    check=lambda output, host: _check("net-host-address", output, host))

PROBES = [LOOPBACK, ADDRESS]
