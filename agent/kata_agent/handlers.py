"""RPC handlers: each validates what the schema cannot and delegates to a do_* call.

The schemas (kata_py.protocol.messages) have already checked types and bounds
by the time a handler runs.
"""

from __future__ import annotations

import os
import time

from kata_py.protocol import PROTOCOL_VERSION

from . import AGENT_VERSION
from .processes import ProcessError, ProcessTable


class Handlers:
    def __init__(self, table: ProcessTable, power_off) -> None:
        self.table = table
        self.power_off = power_off

    def dispatch(self, request_type: str, args: dict) -> dict:
        handler = getattr(self, "rpc_" + request_type)
        return handler(args)

    def rpc_ping(self, args: dict) -> dict:
        return {"agent_version": AGENT_VERSION, "protocol": PROTOCOL_VERSION,
                "kernel": os.uname().release,
                # CLOCK_MONOTONIC: seconds since the guest kernel started, so the
                # host can split its boot time into guest and host parts.
                "uptime": round(time.monotonic(), 6)}

    def rpc_create_process(self, args: dict) -> dict:
        streams = args.get("streams", [])
        if len(set(streams)) != len(streams):
            raise ProcessError("invalid", "a stream is named twice")
        if args.get("tty") and "stderr" in streams:
            raise ProcessError("invalid", "a tty process has no separate stderr")
        cwd = args.get("cwd", "/")
        if not os.path.isdir(cwd):
            raise ProcessError("invalid", f"cwd {cwd!r} is not a directory")
        self.table.create(args["process_id"], args["argv"], args.get("env", []), cwd,
                          bool(args.get("tty", False)), streams, args.get("rows", 0), args.get("cols", 0))
        return {}

    def rpc_start_process(self, args: dict) -> dict:
        return {"pid": self.table.start(args["process_id"])}

    def rpc_signal_process(self, args: dict) -> dict:
        self.table.signal(args["process_id"], args["signal"])
        return {}

    def rpc_wait_process(self, args: dict) -> dict:
        exit_code, signum = self.table.wait(args["process_id"])
        return {"exit_code": exit_code, "signal": signum}

    def rpc_resize_tty(self, args: dict) -> dict:
        self.table.resize(args["process_id"], args["rows"], args["cols"])
        return {}

    def rpc_shutdown(self, args: dict) -> dict:
        # Reply first; the server powers off once the reply is on the wire.
        return {"_after_reply": self.power_off}
