"""The blocking API: Sandbox, Container, Process, EventStream.

Each Sandbox runs its AsyncSandbox on an event loop in a thread of its own,
so it can be used from any (non-async) code; every method blocks until the
owner has answered. Callbacks given to `on_event` run in that thread.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal as signals
import threading
from typing import Any, Callable, Coroutine, Iterator, Optional, Sequence, TypeVar, Union

from ..sandbox.owner_protocol import DEFAULT_OUTPUT, MAX_FILE
from .aio import BOOT_TIMEOUT, KEEP_ALIVE, AsyncContainer, AsyncProcess, AsyncSandbox, Env, User
from .errors import SandboxGone, SandboxTimeout
from .types import ContainerInfo, Event, ExecResult, Size

T = TypeVar("T")


class _Loop:
    """An event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        running = threading.Event()
        self.loop.call_soon(running.set)
        self.thread = threading.Thread(target=self._run, name="kata-py-sandbox", daemon=True)
        self.thread.start()
        running.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a blocking kata_py.Sandbox method was called from its own event callback")
        if not self.loop.is_running() or self.loop.is_closed():
            coro.close()
            raise SandboxGone("the sandbox was closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class EventStream:
    """Events from the moment it was made: `for event in stream`, or
    `stream.get(timeout)`. Iteration ends after the `gone` event."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox
        self._queue: "queue.Queue[Event]" = queue.Queue()
        self._ended = False
        self._cancel = sandbox.on_event(self._queue.put)

    def get(self, timeout: Optional[float] = None) -> Event:
        """The next event; SandboxTimeout if none comes within `timeout`."""
        if self._ended and self._queue.empty():
            raise SandboxGone(self._sandbox.gone_reason or "the sandbox ended")
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise SandboxTimeout(f"no event within {timeout:g} s") from None
        if event.kind == "gone":
            self._ended = True
        return event

    def __iter__(self) -> Iterator[Event]:
        while not (self._ended and self._queue.empty()):
            yield self.get()

    def close(self) -> None:
        self._cancel()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sandbox:
    """One VM that holds containers.

        with kata_py.Sandbox(memory="256M", cpus=1) as sb:
            c = sb.create_container("web", rootfs="/srv/rootfs", args=[...], env={...})
            c.start(); r = c.exec(["sh", "-c", "echo hi"], timeout=10)
            sb.run(["python3", "-c", code], rootfs=..., stdin=b"...", timeout=5)

    The sandbox ends with `close()` (the `with` block), or when this process
    exits or dies, whichever comes first; it leaves nothing behind.

    With a VM factory running it claims a pooled VM of a fitting size
    instead of booting one (`pool=False`: always boot); `info()["vm"]` says
    "pooled" or "booted".
    """

    def __init__(self, memory: Size = "256M", cpus: int = 1, *, boot_timeout: float = BOOT_TIMEOUT,
                 log_level: str = "INFO", pool: bool = True) -> None:
        self._async = AsyncSandbox(memory, cpus, boot_timeout=boot_timeout, log_level=log_level, pool=pool)
        self._loop: Optional[_Loop] = None

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, memory_mib={self.memory_mib}, cpus={self.cpus}, alive={self.alive})"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise SandboxGone(self.gone_reason or "the sandbox was never started")
        return self._loop.run(coro)

    def start(self) -> "Sandbox":
        """Start its owner and boot its VM (seconds under TCG), or claim a pooled one."""
        if self._loop is not None:
            return self
        loop = _Loop()
        try:
            loop.run(self._async.start())
        except BaseException:
            loop.stop()
            raise
        self._loop = loop
        return self

    def close(self) -> None:
        """End the sandbox and everything of it. Idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            loop.run(self._async.close())
        finally:
            loop.stop()

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def memory_mib(self) -> int:
        return self._async.memory_mib

    @property
    def cpus(self) -> int:
        return self._async.cpus

    @property
    def alive(self) -> bool:
        return self._async.alive

    @property
    def gone_reason(self) -> Optional[str]:
        return self._async.gone_reason

    @property
    def owner_pid(self) -> Optional[int]:
        return self._async.owner_pid

    @property
    def record(self) -> dict:
        return self._async.record

    def info(self) -> dict:
        return self._run(self._async.info())

    def containers(self) -> list[ContainerInfo]:
        return self._run(self._async.containers())

    def container(self, name: str) -> "Container":
        return Container(self, self._async.container(name))

    def create_container(self, name: str, rootfs: Union[str, os.PathLike], args: Sequence[str] = KEEP_ALIVE,
                         *, env: Env = None, cwd: str = "/", user: User = None, hostname: Optional[str] = None,
                         memory: Optional[Size] = None, pids: Optional[int] = None, cpus: Optional[float] = None,
                         readonly: bool = False, privileged: bool = False, stdin: Union[bytes, str, None] = None,
                         max_output: int = DEFAULT_OUTPUT) -> "Container":
        """See AsyncSandbox.create_container."""
        return Container(self, self._run(self._async.create_container(
            name, rootfs, args, env=env, cwd=cwd, user=user, hostname=hostname, memory=memory, pids=pids, cpus=cpus,
            readonly=readonly, privileged=privileged, stdin=stdin, max_output=max_output)))

    def run(self, args: Sequence[str], rootfs: Union[str, os.PathLike], *, stdin: Union[bytes, str, None] = None,
            env: Env = None, cwd: str = "/", user: User = None, timeout: Optional[float] = None,
            hostname: Optional[str] = None, memory: Optional[Size] = None, pids: Optional[int] = None,
            cpus: Optional[float] = None, readonly: bool = False, privileged: bool = False, check: bool = False,
            max_output: int = DEFAULT_OUTPUT) -> ExecResult:
        """See AsyncSandbox.run."""
        return self._run(self._async.run(
            args, rootfs, stdin=stdin, env=env, cwd=cwd, user=user, timeout=timeout, hostname=hostname,
            memory=memory, pids=pids, cpus=cpus, readonly=readonly, privileged=privileged, check=check,
            max_output=max_output))

    def on_event(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback(event)` for each event from now on, in the sandbox's
        own thread (it must not block, nor call this sandbox's methods).
        Returns a function that unregisters it."""
        if self._loop is None:
            raise SandboxGone("the sandbox was never started")
        loop = self._loop.loop
        done: "queue.Queue[Callable[[], None]]" = queue.Queue()
        loop.call_soon_threadsafe(lambda: done.put(self._async.on_event(callback)))
        cancel_there = done.get(timeout=10)

        def cancel() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(cancel_there)
        return cancel

    def events(self) -> EventStream:
        """A stream of the events from now on (exit, oom, gone)."""
        return EventStream(self)


class Process:
    """A process whose stdio this program holds (Container.exec_stream)."""

    def __init__(self, sandbox: Sandbox, process: AsyncProcess) -> None:
        self._sandbox = sandbox
        self._async = process

    @property
    def process_id(self) -> str:
        return self._async.process_id

    @property
    def pid(self) -> Optional[int]:
        return self._async.pid

    def write(self, data: Union[bytes, str]) -> None:
        async def write() -> None:
            if self._async.stdin is None:
                raise ValueError("this process has no stdin stream")
            self._async.stdin.write(data.encode() if isinstance(data, str) else data)
            await self._async.stdin.drain()
        self._sandbox._run(write())

    def close_stdin(self) -> None:
        self._sandbox._run(self._async.close_stdin())

    def read(self, n: int = -1, stream: str = "stdout") -> bytes:
        """Up to n bytes of stdout (or stderr) as they come; b"" at its end.
        n=-1 reads to the end."""
        reader = getattr(self._async, stream)
        if reader is None:
            raise ValueError(f"this process has no {stream} stream")
        return self._sandbox._run(reader.read(n))

    def readline(self, stream: str = "stdout") -> bytes:
        reader = getattr(self._async, stream)
        if reader is None:
            raise ValueError(f"this process has no {stream} stream")
        return self._sandbox._run(reader.readline())

    def wait(self, timeout: Optional[float] = None) -> ExecResult:
        return self._sandbox._run(self._async.wait(timeout))

    def signal(self, signum: int = signals.SIGTERM) -> None:
        self._sandbox._run(self._async.signal(signum))

    def kill(self) -> None:
        self.signal(signals.SIGKILL)


class Container:
    """A container in a Sandbox, by name. See AsyncContainer for each method."""

    def __init__(self, sandbox: Sandbox, container: AsyncContainer) -> None:
        self._sandbox = sandbox
        self._async = container

    def __repr__(self) -> str:
        return f"Container({self.name!r})"

    @property
    def name(self) -> str:
        return self._async.name

    def start(self) -> int:
        return self._sandbox._run(self._async.start())

    def info(self) -> ContainerInfo:
        return self._sandbox._run(self._async.info())

    @property
    def status(self) -> str:
        return self.info().status

    def exec(self, args: Sequence[str], *, stdin: Union[bytes, str, None] = None, env: Env = None,
             cwd: Optional[str] = None, user: User = None, timeout: Optional[float] = None,
             privileged: bool = False, check: bool = False, max_output: int = DEFAULT_OUTPUT) -> ExecResult:
        return self._sandbox._run(self._async.exec(args, stdin=stdin, env=env, cwd=cwd, user=user, timeout=timeout,
                                                   privileged=privileged, check=check, max_output=max_output))

    def exec_stream(self, args: Sequence[str], *, env: Env = None, cwd: Optional[str] = None, user: User = None,
                    privileged: bool = False, streams: Sequence[str] = ("stdin", "stdout", "stderr")) -> Process:
        return Process(self._sandbox, self._sandbox._run(self._async.exec_stream(
            args, env=env, cwd=cwd, user=user, privileged=privileged, streams=streams)))

    def signal(self, signum: int = signals.SIGTERM, *, process_id: Optional[str] = None) -> None:
        self._sandbox._run(self._async.signal(signum, process_id=process_id))

    def kill(self) -> None:
        self.signal(signals.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> ExecResult:
        return self._sandbox._run(self._async.wait(timeout))

    def put_file(self, path: str, data: Union[bytes, str], *, mode: int = 0o644, parents: bool = True) -> None:
        self._sandbox._run(self._async.put_file(path, data, mode=mode, parents=parents))

    def get_file(self, path: str, *, max_size: int = MAX_FILE) -> bytes:
        return self._sandbox._run(self._async.get_file(path, max_size=max_size))

    def delete(self) -> None:
        self._sandbox._run(self._async.delete())
