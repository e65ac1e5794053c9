"""Host-side fault handling without a VM: each of these was an unbounded wait or
a wrong state found by the fault and hostile-guest suites (tests/integration/
test_faults.py, test_hostile_guest.py), pinned down here with fakes."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest

from kata_py.errors import KataError, ProtocolError
from kata_py.oci import container as container_module
from kata_py.oci import state as state_module
from kata_py.oci.state import ContainerState, StateStore, Status
from kata_py.protocol.framing import encode_frame, recv_frame
from kata_py.sandbox import agent_client as agent_client_module
from kata_py.sandbox import process as process_module
from kata_py.sandbox.agent_client import AgentClient
from kata_py.sandbox.process import ProcessSession


def run(coro, bound: float = 30):
    """The outer bound is far above what each case needs: reaching it is the hang."""
    return asyncio.run(asyncio.wait_for(coro, bound))


async def client_and_peer() -> tuple[AgentClient, socket.socket]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    return AgentClient(reader, writer), theirs


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_schema_violating_reply_fails_the_request_at_once(timeout):
    async def go():
        client, peer = await client_and_peer()
        try:
            request = asyncio.ensure_future(client.request("wait_process", {"process_id": "p"}, timeout=timeout))
            message = await asyncio.get_running_loop().run_in_executor(None, recv_frame, peer)
            peer.sendall(encode_frame({"id": message["id"], "ok": True, "result": {"exit_code": "zero"}}))
            with pytest.raises(ProtocolError, match="invalid wait_process reply"):
                await request
        finally:
            await client.close()
            peer.close()
    run(go(), bound=10)


def test_close_is_bounded_when_the_peer_stops_reading(monkeypatch):
    monkeypatch.setattr(agent_client_module, "CLOSE_TIMEOUT", 0.5)

    async def go():
        client, peer = await client_and_peer()
        try:
            # More than the socket buffers hold: the rest waits in the transport,
            # which close() would flush forever to a peer that never reads.
            client._writer.write(b"\0" * (32 << 20))
            await client.close()
        finally:
            peer.close()
    run(go(), bound=10)


class _Agent:
    async def request(self, request_type, args=None, timeout=None):
        assert request_type == "wait_process"
        return {"exit_code": 3, "signal": None}


class _Writer:
    def close(self) -> None:
        pass


@pytest.mark.parametrize("keeps_sending", [False, True], ids=["silent", "flooding"])
def test_relay_after_exit_is_bounded(monkeypatch, keeps_sending):
    """The process has exited but the guest keeps its stdout open (silent, or
    still sending): the output so far is relayed and the status comes back."""
    monkeypatch.setattr(process_module, "DRAIN_IDLE", 0.3)
    monkeypatch.setattr(process_module, "DRAIN_LIMIT", 1.5)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)

    async def go():
        session = ProcessSession(type("Sandbox", (), {"agent": _Agent()})(), ["x"], stdin_fd=None,
                                 stdout_fd=write_fd, stderr_fd=None)
        reader = asyncio.StreamReader()
        reader.feed_data(b"before exit\n")
        session.connections["stdout"] = (reader, _Writer())

        async def flood():
            while True:
                await asyncio.sleep(0.05)
                try:
                    os.read(read_fd, 1 << 16)       # keep the pipe from filling
                except BlockingIOError:
                    pass
                if keeps_sending:
                    reader.feed_data(b"more\n")
        flooding = asyncio.ensure_future(flood())
        try:
            return await session.relay_and_wait()
        finally:
            flooding.cancel()
    try:
        assert run(go(), bound=20) == 3
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _full_disk(monkeypatch):
    class Full:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def fileno(self):
            return -1

    monkeypatch.setattr(state_module, "open", Full, raising=False)


def test_start_on_a_full_disk_releases_nothing(tmp_path, monkeypatch):
    """The new state is written before the process is released: on a full disk
    start fails first, and the container is still created, truthfully."""
    store = StateStore(tmp_path)
    state = ContainerState(id="c1", bundle="/b", rootfs="/b/rootfs", status=Status.CREATED.value,
                           pid=os.getpid(), pid_start_time=state_module.process_start_time(os.getpid()))
    with store.lock("c1", create=True):
        store.save(state)
    released = []

    async def fake_start(state):
        released.append(state.id)
    monkeypatch.setattr(container_module, "_start", fake_start)
    _full_disk(monkeypatch)
    with pytest.raises(KataError, match="No space left"):
        container_module.start(store, "c1")
    assert released == []
    assert store.load("c1").live_status() is Status.CREATED


class _PairTransport:
    """connect_sync hands out one end of a socket pair; the test plays the agent on the other."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()

    def connect_sync(self, port, timeout):
        return self.ours


def test_sync_client_deadline_holds_against_a_drip():
    """A reply that arrives a byte at a time, each within the timeout, must not
    stretch the request past its deadline."""
    import threading

    from kata_py.errors import AgentTimeout
    from kata_py.sandbox import agent_sync

    transport = _PairTransport()
    stop = threading.Event()

    def drip():
        recv_frame(transport.theirs)      # hello
        recv_frame(transport.theirs)      # the request
        transport.theirs.sendall(b"\0\0\0\x64")
        while not stop.wait(0.1):
            try:
                transport.theirs.sendall(b" ")
            except OSError:
                return
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # 100 bytes at 10 a second take 10 s; without the deadline the frame
        # would complete (as junk: a ProtocolError) instead of timing out.
        with pytest.raises(AgentTimeout, match="did not answer ping within 1 s"):
            agent_sync.request(transport, "ping", timeout=1.0)
    finally:
        stop.set()
        transport.theirs.close()
        dripper.join(5)
