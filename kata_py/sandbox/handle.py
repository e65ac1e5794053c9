"""The one shape of "a sandbox" that process sessions, hooks and the OCI
operations talk to.

Three kinds of sandbox satisfy it:

- `kata_py.sandbox.sandbox.Sandbox`: a VM this process boots and owns;
- `kata_py.sandbox.pool.PooledSandbox`: a VM a pool standby booted and this
  process claimed;
- `ReattachedSandbox` (here): a VM another process owns (a container's
  sandbox owner), reached from this one for `exec` or `start` through its vsock
  address; stopping it only closes this process's agent connection.

Each has an agent connection (once started) and a vsock transport, and a run
directory (where known); `start()` makes the agent answer, `stop()` lets go
of whatever this process holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from ..vsock.transport import VsockTransport
from .agent_client import AgentClient

CONNECT_TIMEOUT = 10.0


@runtime_checkable
class SandboxHandle(Protocol):
    @property
    def agent(self) -> AgentClient | None: ...

    @property
    def transport(self) -> VsockTransport | None: ...

    @property
    def run_dir(self) -> Path | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ReattachedSandbox:
    """A sandbox another process owns: its transport, and an agent connection of this process's own."""

    def __init__(self, transport: VsockTransport, run_dir: Path | None = None,
                 timeout: float = CONNECT_TIMEOUT) -> None:
        self.transport = transport
        self.run_dir = run_dir
        self.timeout = timeout
        self.agent: AgentClient | None = None

    async def start(self) -> None:
        """Connect to the agent (no ping: the owner has seen it answer)."""
        self.agent = await AgentClient.connect(self.transport, timeout=self.timeout)

    async def stop(self) -> None:
        """Close this process's agent connection; the VM is its owner's."""
        if self.agent is not None:
            agent, self.agent = self.agent, None
            await agent.close()
