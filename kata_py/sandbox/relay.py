"""One more process in a running sandbox's container, relayed from this
process: `kata-py exec` runs it inline; `exec --detach` starts this module
as a process of its own (the pid in --pid-file), which reports to the CLI
on a status pipe as the owner does for an init, relays the process's stdio
(its own, or a console socket's pty) and exits with the process's status.

    python -m kata_py.sandbox.relay --exec FILE --status-fd FD [--console-socket PATH] [--log FILE --log-format F]

FILE (removed once read) holds {"vsock", "run_dir", "agent_id", "process",
"terminal"}: where the VM's agent answers and what to run (the agent's
create_process arguments, computed by the CLI from the OCI process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from ..errors import KataError
from ..timing import mark
from .agent_sync import transport_of
from .handle import ReattachedSandbox
from .single import StatusPipe, console_session, detach_stdio, read_once, relay_to_end

log = logging.getLogger("kata_py.relay")
CONNECT_TIMEOUT = 10.0


async def connect(vsock: dict, run_dir: str | None, what: str) -> ReattachedSandbox:
    """A VM another process owns, as a handle of this one (its own agent connection)."""
    handle = ReattachedSandbox(transport_of(vsock, run_dir), run_dir=Path(run_dir) if run_dir else None,
                               timeout=CONNECT_TIMEOUT)
    try:
        await handle.start()
    except (KataError, OSError) as exc:
        raise KataError(f"{what}: cannot reach its VM's agent: {exc}") from exc
    return handle


async def run_in(handle: ReattachedSandbox, agent_id: str, spec: dict, terminal: bool,
                 console_socket: str | None, report: StatusPipe | None = None) -> int:
    """Start `spec` in the container and relay it until it exits; its status."""
    console = None
    try:
        session, console = console_session(handle, spec, agent_id, terminal, console_socket)
        await session.create()
        await session.start()
        if report is not None:
            report.send("ok", {"process": session.process_id, "guest_pid": session.pid})
        return await relay_to_end(session, console)
    finally:
        if console is not None:
            console.close()
        await handle.stop()


async def _detached(job: dict, console_socket: str | None, report: StatusPipe) -> int:
    handle = await connect(job["vsock"], job.get("run_dir"), "exec")
    return await run_in(handle, job["agent_id"], job["process"], bool(job.get("terminal")), console_socket, report)


def main(argv: list[str] | None = None) -> None:
    from ..logformat import log_to_runtime_log

    parser = argparse.ArgumentParser(prog="kata-py-exec-relay")
    parser.add_argument("--exec", dest="job", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--console-socket")
    parser.add_argument("--log")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    log_to_runtime_log(args.log, args.log_format, "exec")
    if args.console_socket:
        detach_stdio()
    report = StatusPipe(args.status_fd)
    mark("relay_started")
    try:
        status = asyncio.run(_detached(read_once(args.job), args.console_socket, report))
    except KataError as exc:
        log.error("%s", exc)
        report.send("error", str(exc))
        sys.exit(1)
    except BaseException as exc:
        log.exception("exec relay failed")
        report.send("error", repr(exc))
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    main()
