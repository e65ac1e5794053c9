"""The jailed vsock back end's broker (kata_py/sandbox/vsock_jail.py): the
back end names a port, the broker outside the jail connects to that port's
host service socket and hands the connection over; nothing else."""

import asyncio
import socket

import pytest

from kata_py.sandbox.vsock_jail import Broker
from kata_py.vsock import hybrid


@pytest.fixture(params=["thread", "event loop"])
def pair(request, tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    uds = str(tmp_path / "vsock.sock")
    if request.param == "thread":
        broker = Broker(ours, uds)
        yield broker, theirs, uds, None
    else:
        loop = asyncio.new_event_loop()

        async def make():
            return Broker(ours, uds)
        broker = loop.run_until_complete(make())
        yield broker, theirs, uds, loop
        loop.close()
    broker.close()
    theirs.close()


def ask(pair, port):
    """connect_through() from the back end's side, with the event loop (if any) turning meanwhile."""
    broker, theirs, _, loop = pair
    if loop is None:
        return hybrid.connect_through(theirs, port)
    return loop.run_until_complete(loop.run_in_executor(None, hybrid.connect_through, theirs, port))


def test_a_port_with_a_listener_gives_a_connection_to_it(pair):
    _, _, uds, _ = pair
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(hybrid.service_path(uds, 5001))
    listener.listen(1)
    conn = ask(pair, 5001)
    assert conn is not None
    served, _ = listener.accept()
    conn.setblocking(True)
    conn.sendall(b"through the broker")
    assert served.recv(64) == b"through the broker"
    for s in (conn, served, listener):
        s.close()


def test_a_port_nobody_serves_gives_nothing(pair):
    assert ask(pair, 5000) is None


def test_a_request_is_only_ever_a_port(pair):
    """A path sent as a request is cut to 4 bytes and read as a port number:
    only `<hybrid socket>_<number>` is ever connected to; the next request
    is answered as usual."""
    _, theirs, uds, _ = pair
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(hybrid.service_path(uds, 7))
    listener.listen(1)
    theirs.send(b"../../etc/passwd")
    conn = ask(pair, 7)
    assert conn is not None
    conn.close()
    listener.close()


def test_without_a_broker_the_back_end_gets_nothing(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    assert hybrid.connect_through(theirs, 5001) is None
    theirs.close()
