"""A pooled VM as the container monitor uses it.

`PooledSandbox` offers what the container code needs of a Sandbox (agent,
transport, run_dir, start, stop) for a VM that a standby booted and keeps.
"""

from __future__ import annotations

import asyncio

from ..sandbox.agent_client import AgentClient
from ..vsock.transport import HybridVsock
from .client import Claim, claim

CONNECT_TIMEOUT = 10.0


def eligible(config: dict) -> tuple[int, int] | None:
    """(memory MiB, vCPUs) to claim for this container, or None when it must
    boot its own VM: a pooled VM has no NIC (microvm cannot hot-plug one)."""
    from ..oci.process_spec import vm_size

    from ..network.guard import network_entry

    present, path = network_entry(config)
    if path is not None:
        return None
    hooks = config.get("hooks") or {}
    if present and (hooks.get("prestart") or hooks.get("createRuntime")):
        return None     # a hook may put interfaces into the new namespace (Docker's does)
    return vm_size(config)


def claim_for(config: dict) -> Claim | None:
    size = eligible(config)
    return claim(*size) if size else None


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
