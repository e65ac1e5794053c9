"""Processes in a sandbox, with their stdio relayed to host file descriptors.

A ProcessSession walks one guest process through the agent's steps: create
(register it, with its stdio streams), attach (one vsock connection per
stream), prepare (fork and hold before exec: OCI `create`) or start, and
relay + wait. stdout and stderr are written to the host in full before the
exit status is returned. Host stdin is read by a daemon thread (a blocking
read of a tty or pipe cannot be cancelled, and must not keep the program
alive once the guest process has exited).
"""

from __future__ import annotations

import asyncio
import os
import select
import secrets
import signal
import threading
import time

from ..errors import KataError
from ..timing import mark
from .agent_client import AgentClient, open_stream
from .handle import SandboxHandle

RELAY_CHUNK = 256 * 1024
DRAIN_IDLE = 5.0        # after exit: seconds without output that end the relay
DRAIN_LIMIT = 60.0      # after exit: the most the relay goes on
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=xterm"]
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def exit_status(exit_code: int | None, signum: int | None) -> int:
    """The shell's convention, which runc and conmon follow: 128+N when killed by N."""
    return 128 + signum if signum else int(exit_code or 0)


class _LastData:
    """When output last arrived on any stream of a process, and whether some
    is being written out now (to a slow reader: that is not the guest idling)."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.writing = 0


async def _relay_out(reader: asyncio.StreamReader, fd: int, last: _LastData | None = None) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await reader.read(RELAY_CHUNK)
        if not data:
            return
        if last is None:
            last = _LastData()
        last.writing += 1
        try:
            # Off the loop: a slow consumer of our stdout must not stall the other streams.
            await loop.run_in_executor(None, _write_all, fd, data)
        finally:
            last.writing -= 1
            last.at = time.monotonic()


async def _drain(relays: list[asyncio.Future], last: _LastData) -> None:
    """After the process has exited: what it wrote is relayed in full, but a
    stream the guest keeps open (a background child holding it, or a hostile
    agent) is cut after DRAIN_IDLE seconds without data or DRAIN_LIMIT in all."""
    deadline = time.monotonic() + DRAIN_LIMIT
    pending = set(relays)
    while pending:
        now = time.monotonic()
        if now >= deadline or (not last.writing and now >= last.at + DRAIN_IDLE):
            return
        done, pending = await asyncio.wait(pending, timeout=min(1.0, deadline - now))
        for task in done:
            task.result()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


def _start_stdin_reader(fd: int, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
    """Host fd -> guest stdin, with backpressure: one chunk in flight at a time."""

    async def push(data: bytes) -> None:
        if data:
            writer.write(data)
            await writer.drain()
        elif writer.can_write_eof():
            writer.write_eof()

    def run() -> None:
        # poll before each read: a FIFO opened without O_NONBLOCK-safe
        # semantics (a shim's stdin FIFO, opened before its writer) reads as
        # end of file while no writer has come yet; poll waits until there is
        # data, or until a writer has come and gone (POLLHUP).
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        try:
            while True:
                try:
                    poller.poll()
                    data = os.read(fd, RELAY_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                asyncio.run_coroutine_threadsafe(push(data), loop).result()
                if not data:
                    return
        except Exception:  # the loop is gone or the guest side closed: nothing left to feed
            return

    threading.Thread(target=run, name="stdin-relay", daemon=True).start()


class ProcessSession:
    """One guest process and its host-side stdio.

    `stdin_fd` None means the process gets /dev/null; with `tty`, stdout_fd
    receives the terminal's output and stderr_fd is unused.
    """

    def __init__(self, sandbox: SandboxHandle, argv: list[str], env: list[str] | None = None, cwd: str = "/",
                 stdin_fd: int | None = 0, stdout_fd: int | None = 1, stderr_fd: int | None = 2,
                 tty: bool = False, rows: int = 0, cols: int = 0, container_id: str | None = None,
                 init: bool = False, user: dict | None = None, process_id: str | None = None,
                 security: dict | None = None) -> None:
        self.sandbox = sandbox
        self.process_id = process_id or "p-" + secrets.token_hex(6)
        self.fds = {"stdin": stdin_fd, "stdout": stdout_fd, "stderr": None if tty else stderr_fd}
        self.streams = [name for name, fd in self.fds.items() if fd is not None]
        self.args = {"process_id": self.process_id, "argv": list(argv),
                     "env": list(DEFAULT_ENV if env is None else env), "cwd": cwd, "streams": self.streams}
        if tty:
            self.args.update(tty=True, rows=rows, cols=cols)
        if container_id is not None:
            self.args.update(container_id=container_id, init=init)
        if user is not None:
            self.args["user"] = user
        if security:  # umask, rlimits, capabilities, no_new_privileges, oom_score_adj
            self.args.update(security)
        self.connections: dict[str, tuple] = {}
        self.pid: int | None = None

    @property
    def agent(self) -> AgentClient:
        return self.sandbox.agent

    async def create(self) -> None:
        await self.agent.request("create_process", self.args)
        # Concurrently: each stream is its own vsock connection and handshake.
        opened = await asyncio.gather(*(open_stream(self.sandbox.transport, self.process_id, name)
                                        for name in self.streams), return_exceptions=True)
        failed = next((result for result in opened if isinstance(result, BaseException)), None)
        for name, result in zip(self.streams, opened):
            if not isinstance(result, BaseException):
                self.connections[name] = result
        if failed is not None:
            self.close()
            raise failed
        mark("streams_connected")

    async def prepare(self) -> int:
        self.pid = (await self.agent.request("prepare_process", {"process_id": self.process_id}))["pid"]
        return self.pid

    async def start(self) -> int:
        self.pid = (await self.agent.request("start_process", {"process_id": self.process_id}))["pid"]
        return self.pid

    async def signal(self, signum: int) -> None:
        await self.agent.request("signal_process", {"process_id": self.process_id, "signal": int(signum)})

    async def resize(self, rows: int, cols: int) -> None:
        await self.agent.request("resize_tty", {"process_id": self.process_id, "rows": rows, "cols": cols})

    def forward_signals(self) -> list[int]:
        """Pass the host's termination signals on to the guest process."""
        loop = asyncio.get_running_loop()

        async def forward(signum: int) -> None:
            try:
                await self.signal(signum)
            except KataError:
                pass  # it has exited already: nothing to signal

        for signum in FORWARDED_SIGNALS:
            loop.add_signal_handler(signum, lambda s=signum: asyncio.ensure_future(forward(s)))
        return list(FORWARDED_SIGNALS)

    async def relay_and_wait(self) -> int:
        """Relay stdio until the process has exited and its output is drained;
        return its exit status (128+N if killed by signal N)."""
        loop = asyncio.get_running_loop()
        if "stdin" in self.connections:
            _start_stdin_reader(self.fds["stdin"], self.connections["stdin"][1], loop)
        last = _LastData()
        relays = [asyncio.ensure_future(_relay_out(self.connections[name][0], self.fds[name], last))
                  for name in ("stdout", "stderr") if name in self.connections]
        try:
            # No timeout: the process runs as long as it runs. A VM that dies
            # ends the wait (the connection closes); a hung one is for delete.
            result = await self.agent.request("wait_process", {"process_id": self.process_id}, timeout=None)
            last.at = time.monotonic()
            await _drain(relays, last)
        finally:
            for task in relays:
                task.cancel()
            self.close()
        return exit_status(result["exit_code"], result["signal"])

    def close(self) -> None:
        for _, writer in self.connections.values():
            writer.close()


async def run_process(sandbox: SandboxHandle, argv: list[str], forward_signals: bool = False, **kwargs) -> int:
    """Run argv in the guest; return its exit status (128+N if killed by signal N)."""
    session = ProcessSession(sandbox, argv, **kwargs)
    await session.create()
    await session.start()
    forwarded = session.forward_signals() if forward_signals else []
    try:
        return await session.relay_and_wait()
    finally:
        loop = asyncio.get_running_loop()
        for signum in forwarded:
            loop.remove_signal_handler(signum)
