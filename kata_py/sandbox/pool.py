"""The pool client: claiming a VM that the factory's pool booted, and using it.

The factory daemon and its standbys (kata_py.factory) keep the pool; a
container's sandbox owner claims one VM here. `PooledSandbox` is a SandboxHandle
(kata_py/sandbox/handle.py: agent, transport, run_dir, start, stop) for a VM
that a standby booted and keeps.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from .. import hostsys, paths
from ..errors import KataError
from ..vsock.transport import HybridVsock
from .agent_client import AgentClient
from .pool_wire import WireError, call

CLAIM_TIMEOUT = 5.0
RELEASE_TIMEOUT = 20.0
CONNECT_TIMEOUT = 10.0


class FactoryError(KataError):
    pass


def factory_dir() -> Path:
    return paths.run_dir() / "factory"


def socket_path() -> Path:
    return factory_dir() / "factory.sock"


def request(message: dict, timeout: float = 5.0) -> dict | None:
    """One request to the running factory; None when none is running."""
    try:
        sock, reply = call(str(socket_path()), message, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except (OSError, WireError) as exc:
        raise FactoryError(f"the factory did not answer: {exc}") from exc
    sock.close()
    return reply


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to end."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@dataclass
class Claim:
    """A pooled VM held by this process: the standby ends it when `conn` closes."""

    conn: socket.socket
    pid: int            # the standby's
    run_dir: Path
    uds: Path
    share_dir: Path

    def enter_mount_namespace(self) -> None:
        """Join the standby's mount namespace (where QEMU's export lives), so
        the container's rootfs and bind sources can be bound into it. Only in
        a single-threaded process."""
        fd = os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            hostsys.setns(fd, hostsys.CLONE_NEWNS)
        finally:
            os.close(fd)

    def release(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """Let go: the standby ends the VM; wait for it, kill it if it hangs."""
        self.conn.close()
        if not wait_gone(self.pid, timeout):
            try:
                os.kill(self.pid, signal.SIGKILL)  # its QEMU dies with it
            except ProcessLookupError:
                pass


def claim(memory_mib: int, cpus: int) -> Claim | None:
    """A pooled VM of at least this size, or None (no factory, no idle VM, too small)."""
    try:
        reply = request({"op": "claim", "memory_mib": memory_mib, "cpus": cpus}, timeout=CLAIM_TIMEOUT)
    except FactoryError:
        return None
    if not reply or not reply.get("ok"):
        return None
    try:
        conn, info = call(str(reply["socket"]), {"op": "claim", "owner": os.getpid()}, CLAIM_TIMEOUT)
    except (OSError, WireError, KeyError):
        return None
    if not info.get("ok"):
        conn.close()
        return None
    conn.settimeout(None)
    try:
        return Claim(conn=conn, pid=int(info["pid"]), run_dir=Path(info["run_dir"]), uds=Path(info["uds"]),
                     share_dir=Path(info["share_dir"]))
    except (KeyError, TypeError, ValueError):
        conn.close()
        return None


class PooledSandbox:
    def __init__(self, claimed: Claim) -> None:
        self.claim = claimed
        self.run_dir = claimed.run_dir
        self.transport = HybridVsock(claimed.run_dir)
        self.agent: AgentClient | None = None
        self.agent_info: dict = {}

    async def start(self) -> None:
        self.agent = await AgentClient.connect(self.transport, timeout=CONNECT_TIMEOUT)
        self.agent_info = await self.agent.request("ping", timeout=CONNECT_TIMEOUT)

    async def stop(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.claim is not None:
            claimed, self.claim = self.claim, None
            await asyncio.get_running_loop().run_in_executor(None, claimed.release)
