"""Run one process in a sandbox with its stdio relayed to host file descriptors.

stdout and stderr are written to the host in full before the exit status is
returned. Host stdin is read by a daemon thread (a blocking read of a tty or
pipe cannot be cancelled, and must not keep the program alive once the guest
process has exited).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import threading

from .agent_client import open_stream

RELAY_CHUNK = 256 * 1024
STDIO = ("stdin", "stdout", "stderr")


def exit_status(exit_code: int | None, signum: int | None) -> int:
    """The shell's convention, which runc and conmon follow: 128+N when killed by N."""
    return 128 + signum if signum else int(exit_code or 0)


async def _relay_out(reader: asyncio.StreamReader, fd: int) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await reader.read(RELAY_CHUNK)
        if not data:
            return
        # Off the loop: a slow consumer of our stdout must not stall the other streams.
        await loop.run_in_executor(None, _write_all, fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


def _start_stdin_reader(fd: int, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop,
                        done: asyncio.Event) -> None:
    """Host fd -> guest stdin, with backpressure: one chunk in flight at a time."""

    async def push(data: bytes) -> None:
        if data:
            writer.write(data)
            await writer.drain()
        else:
            if writer.can_write_eof():
                writer.write_eof()
            done.set()

    def run() -> None:
        try:
            while True:
                try:
                    data = os.read(fd, RELAY_CHUNK)
                except OSError:
                    data = b""
                future = asyncio.run_coroutine_threadsafe(push(data), loop)
                future.result()
                if not data:
                    return
        except Exception:  # the loop is gone or the guest side closed: nothing left to feed
            return

    threading.Thread(target=run, name="stdin-relay", daemon=True).start()


async def run_process(sandbox, argv: list[str], env: list[str] | None = None, cwd: str = "/",
                      stdin_fd: int | None = 0, stdout_fd: int = 1, stderr_fd: int = 2,
                      forward_signals: bool = False) -> int:
    """Run argv in the guest; return its exit status (128+N if killed by signal N)."""
    agent = sandbox.agent
    process_id = "p-" + secrets.token_hex(6)
    streams = ["stdout", "stderr"] + (["stdin"] if stdin_fd is not None else [])
    await agent.request("create_process", {
        "process_id": process_id, "argv": list(argv),
        "env": list(env if env is not None else ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                                  "HOME=/root", "TERM=xterm"]),
        "cwd": cwd, "streams": streams,
    })
    connections = {name: await open_stream(sandbox.transport, process_id, name) for name in streams}
    await agent.request("start_process", {"process_id": process_id})

    loop = asyncio.get_running_loop()
    stdin_done = asyncio.Event()
    if stdin_fd is not None:
        _start_stdin_reader(stdin_fd, connections["stdin"][1], loop, stdin_done)
    relays = [asyncio.ensure_future(_relay_out(connections[name][0], fd))
              for name, fd in (("stdout", stdout_fd), ("stderr", stderr_fd))]
    forwarded = []
    if forward_signals:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            loop.add_signal_handler(signum, lambda s=signum: asyncio.ensure_future(
                agent.request("signal_process", {"process_id": process_id, "signal": int(s)})))
            forwarded.append(signum)
    try:
        result = await agent.request("wait_process", {"process_id": process_id}, timeout=None)
        await asyncio.gather(*relays)
    finally:
        for signum in forwarded:
            loop.remove_signal_handler(signum)
        for task in relays:
            task.cancel()
        for _, writer in connections.values():
            writer.close()
    return exit_status(result["exit_code"], result["signal"])
