"""A container's network over its life, for the monitor and `delete`.

The record of what was made lives in the container's state directory, so a
`delete` after a killed monitor still finds it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ..errors import KataError
from .attach import Attachment, attach, carried_path, detach_recorded

log = logging.getLogger("kata_py.network")

RECORD_NAME = "network.json"
CONFIGURE_TIMEOUT = 90.0    # the guest may still be loading its NIC driver


async def attach_container(config: dict, state_dir: Path) -> Attachment:
    """Before the VM boots: the taps and mirroring for the namespace this
    monitor was started in (see carried_path)."""
    return await asyncio.to_thread(attach, carried_path(config, os.getpid()), Path(state_dir) / RECORD_NAME,
                                   config.get("hostname") or "")


async def configure_guest(attachment: Attachment, agent) -> dict:
    """Once the agent answers: QEMU holds the taps, so drop our fds, and have
    the agent set up the NICs and write the container's network files."""
    attachment.release()
    return await agent.request("configure_network", attachment.request, timeout=CONFIGURE_TIMEOUT)


async def detach_container(attachment: Attachment) -> None:
    try:
        await asyncio.to_thread(attachment.detach)
    except KataError as exc:
        log.error("network teardown: %s", exc)


def detach_container_recorded(state_dir: Path) -> None:
    """At `delete`: whatever a monitor that did not finish left behind."""
    try:
        detach_recorded(Path(state_dir) / RECORD_NAME)
    except KataError as exc:
        log.warning("network teardown: %s", exc)
