"""Timing records: one log line per milestone of a container's life.

`bench/` splits a cold start into its phases with them (QEMU spawned, guest
kernel, agent ready, container created, process exited, torn down). They go
to the `--log` file at level info, as `timing {"event": ..., "t": <unix time>}`;
without a log file they cost one level check.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("kata_py.timing")

# Agent replies that mark a milestone, by request type. (A ping's reply also
# carries the guest's uptime, which places the guest's console times.)
REPLY_MILESTONES = {"ping": "agent_ready", "create_container": "container_created",
                    "create_process": "process_created", "prepare_process": "process_prepared",
                    "start_process": "process_started", "wait_process": "process_exited"}


def mark(event: str, **fields) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("timing %s", json.dumps({"event": event, "t": round(time.time(), 6), "pid": os.getpid(), **fields}))
