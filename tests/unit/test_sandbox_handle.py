"""One handle for a booted, pooled or reattached sandbox, and the transport
methods the sandbox code calls on either vsock host end (no probing)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from kata_py.errors import KataError
from kata_py.oci.exec_process import connect
from kata_py.oci.state import ContainerState
from kata_py.protocol.framing import recv_frame
from kata_py.sandbox.handle import ReattachedSandbox, SandboxHandle
from kata_py.sandbox.pool import Claim, PooledSandbox
from kata_py.sandbox.sandbox import Sandbox
from kata_py.vsock.transport import HybridVsock, KernelVsock


def test_kernel_transport_has_what_the_sandbox_calls():
    transport = KernelVsock(7)
    transport.start()   # nothing to start
    assert transport.alive()
    assert transport.address() == {"cid": 7}
    assert transport.backend_pid() is None


def test_hybrid_transport_before_start(tmp_path):
    transport = HybridVsock(tmp_path)
    assert not transport.alive()
    assert transport.address() == {"uds": str(tmp_path / "vsock.sock")}
    assert transport.backend_pid() is None


def test_all_three_kinds_are_sandbox_handles(tmp_path):
    claim = Claim(conn=None, pid=0, run_dir=tmp_path, uds=tmp_path / "vsock.sock", share_dir=tmp_path / "share")
    handles = [Sandbox(image=None), PooledSandbox(claim), ReattachedSandbox(KernelVsock(7))]
    assert all(isinstance(handle, SandboxHandle) for handle in handles)
    assert all(handle.agent is None for handle in handles)


class _PairTransport:
    """A transport whose connections are socket pairs; the far ends are kept."""

    def __init__(self) -> None:
        self.peers: list[socket.socket] = []

    async def open_connection(self, port: int, timeout: float):
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        return await asyncio.open_unix_connection(sock=ours)


def test_reattached_sandbox_connects_and_lets_go():
    async def go():
        transport = _PairTransport()
        handle = ReattachedSandbox(transport, run_dir=Path("/nowhere"))
        await handle.start()
        assert handle.agent is not None and len(transport.peers) == 1
        assert recv_frame(transport.peers[0], 1024) == {"role": "control"}
        await handle.stop()
        assert handle.agent is None
        assert transport.peers[0].recv(1) == b""    # our end closed
        await handle.stop()                         # again: nothing to do
        transport.peers[0].close()

    asyncio.run(asyncio.wait_for(go(), 10))


def test_connect_to_a_gone_vm_is_one_error(tmp_path):
    state = ContainerState(id="c1", bundle=str(tmp_path), rootfs=str(tmp_path), run_dir=str(tmp_path), vsock={"uds": str(tmp_path)})
    with pytest.raises(KataError, match="'c1': cannot reach its VM's agent"):
        asyncio.run(connect(state))
