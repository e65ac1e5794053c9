"""The asyncio API: AsyncSandbox, AsyncContainer, AsyncProcess.

An AsyncSandbox is one VM, kept by a sandbox owner process
(kata_py.sandbox.owner) that this object starts and talks to. The sandbox
lives until `close()` (or the end of `async with`) — or until this process
dies: the owner holds the other end of a private connection and ends the
sandbox, leaving nothing, when that connection closes. If the owner or its
VM dies first, every later call raises SandboxGone with the reason, and
what they left behind is removed.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
import secrets
import signal as signals
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Optional, Sequence, Union

from ..errors import KataError
from ..sandbox import record as records
from ..sandbox.agent_client import open_stream
from ..sandbox.agent_sync import transport_of
from ..sandbox.owner import describe_exit
from ..sandbox.owner_client import OwnerClient, OwnerConnectionError, OwnerRequestError, spawn_owner
from ..sandbox.owner_protocol import DEFAULT_OUTPUT, MAX_FILE
from ..sandbox.process import DEFAULT_ENV
from .errors import (BootError, CommandFailed, Conflict, ContainerExited, InvalidRequest, NotFound, RequestFailed,
                     SandboxError, SandboxGone, SandboxTimeout)
from .types import ContainerInfo, Event, ExecResult, Size, parse_size

log = logging.getLogger(__name__)

Env = Union[Mapping[str, str], Sequence[str], None]
User = Union[int, str, tuple, None]

BOOT_TIMEOUT = 120.0        # the owner's own VM boot gives up after 60 s
REQUEST_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 60.0
MIN_MEMORY_MIB = 128
# Docker's default capability set: a container of a shared sandbox must not
# reconfigure the network all of them share (NET_ADMIN), mount over the
# guest (SYS_ADMIN), load modules or trace its neighbours' processes.
DEFAULT_CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                        "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                        "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
# runc's defaults: /proc/sys is the guest's, and its network part is shared by every container.
MASKED_PATHS = ["/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/sched_debug",
                "/sys/firmware"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
NAMESPACES = ["pid", "ipc", "uts", "mount", "cgroup"]
KEEP_ALIVE = ["sleep", "2147483647"]


def _env(env: Env, base: Sequence[str] = DEFAULT_ENV) -> list[str]:
    """KEY=VALUE entries: `base` overridden by `env` (a mapping or such entries)."""
    merged = dict(item.split("=", 1) for item in base)
    if env is None:
        pass
    elif isinstance(env, Mapping):
        merged.update({str(k): str(v) for k, v in env.items()})
    else:
        for item in env:
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise InvalidRequest(f"environment entry {item!r} is not KEY=VALUE", "invalid")
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _user(user: User) -> Optional[dict]:
    if user is None:
        return None
    if isinstance(user, int):
        return {"uid": user, "gid": user}
    if isinstance(user, tuple):
        return {"uid": int(user[0]), "gid": int(user[1])}
    uid, _, gid = str(user).partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise InvalidRequest(f"user {user!r}: expected UID[:GID] as numbers", "invalid")
    return {"uid": int(uid), "gid": int(gid or uid)}


def _bytes(data: Union[bytes, str, None]) -> Optional[bytes]:
    if data is None:
        return None
    return data.encode() if isinstance(data, str) else bytes(data)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _process_args(args: Sequence[str], env: Env, cwd: Optional[str], user: User, stdin, max_output: int,
                  privileged: bool, base_env: Sequence[str] = DEFAULT_ENV, with_env: bool = True) -> dict:
    if isinstance(args, (str, bytes)):
        raise InvalidRequest("args is a list of strings (argv), not one string", "invalid")
    wire: dict = {"args": [str(a) for a in args], "max_output": int(max_output)}
    if not wire["args"]:
        raise InvalidRequest("args is empty", "invalid")
    if with_env or env is not None:
        wire["env"] = _env(env, base_env)
    if cwd is not None:
        wire["cwd"] = cwd
    if (u := _user(user)) is not None:
        wire["user"] = u
    data = _bytes(stdin)
    if data is not None:
        wire["stdin"] = _b64(data)
    if privileged:
        wire["privileged"] = True
    else:
        wire["capabilities"] = {name: list(DEFAULT_CAPABILITIES) for name in ("bounding", "effective", "permitted")}
    return wire


def _container_args(rootfs, hostname: Optional[str], memory: Optional[Size], pids: Optional[int],
                    cpus: Optional[float], readonly: bool) -> dict:
    """The guest side of a container, from the OCI layer's defaults (its mounts,
    and the agent's create_container arguments built from an OCI config)."""
    from ..oci.busybox import DEFAULT_MOUNTS
    from ..oci.guest_spec import create_container_args

    path = os.path.abspath(os.fspath(rootfs))
    resources: dict = {}
    if memory is not None:
        resources["memory"] = {"limit": parse_size(memory, "memory")}
    if pids is not None:
        resources["pids"] = {"limit": int(pids)}
    if cpus is not None:
        if cpus <= 0:
            raise InvalidRequest(f"cpus {cpus}: must be above 0", "invalid")
        resources["cpu"] = {"quota": int(cpus * 100000), "period": 100000}
    config = {"root": {"readonly": readonly}, "mounts": DEFAULT_MOUNTS,
              "linux": {"namespaces": [{"type": t} for t in NAMESPACES], "resources": resources,
                        "maskedPaths": MASKED_PATHS, "readonlyPaths": READONLY_PATHS}}
    if hostname is not None:
        config["hostname"] = hostname
    guest = create_container_args("x", config, path, None)
    wire = {"rootfs": path, "readonly": readonly, "resources": resources, "namespaces": guest["namespaces"],
            "mounts": guest["mounts"], "masked_paths": guest["masked_paths"],
            "readonly_paths": guest["readonly_paths"]}
    if hostname is not None:
        wire["hostname"] = hostname
    return wire


def _translate(exc: OwnerRequestError) -> SandboxError:
    message = str(exc)
    code = exc.code
    if code == "gone":
        return SandboxGone(message)
    if code == "timeout":
        return SandboxTimeout(message)
    if code == "exited":
        return ContainerExited(message)
    if code == "not_found":
        return NotFound(message, code)
    if code == "invalid":
        return InvalidRequest(message, code)
    if code in ("exists", "state"):
        return Conflict(message, code)
    return RequestFailed(message, code)


class AsyncEventStream:
    """Events from the moment it was made: `async for event in stream`, or
    `await stream.get(timeout)`. It ends after the `gone` event."""

    def __init__(self, sandbox: "AsyncSandbox") -> None:
        self._sandbox = sandbox
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._ended = False
        self._cancel = sandbox.on_event(self._queue.put_nowait)

    async def get(self, timeout: Optional[float] = None) -> Event:
        """The next event; SandboxTimeout if none comes within `timeout`,
        SandboxGone once the stream has ended."""
        if self._ended and self._queue.empty():
            raise SandboxGone(self._sandbox.gone_reason or "the sandbox ended")
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise SandboxTimeout(f"no event within {timeout:g} s") from None
        if event.kind == "gone":
            self._ended = True
        return event

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> Event:
        if self._ended and self._queue.empty():
            raise StopAsyncIteration
        return await self.get()

    def close(self) -> None:
        self._cancel()

    async def __aenter__(self) -> "AsyncEventStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


def _with_vm(record: dict) -> dict:
    """The record with "vm": "pooled" or "booted" (a record read from a
    dead owner's sandbox.json of an older owner may lack it: a pooled VM's run
    directory is its standby's, so such a record has none)."""
    record.setdefault("vm", "booted" if record.get("vm_run_dir") else "pooled")
    return record


class AsyncSandbox:
    """One VM that holds containers. `async with AsyncSandbox(memory="256M", cpus=1) as sb:`

    `pool`: when a VM factory runs (`kata-py factory start`), claim a pooled
    VM of at least this size instead of booting one (it serves this sandbox
    only and is destroyed with it); `pool=False` always boots a fresh VM.
    The record says which: `info()["vm"]` is "pooled" or "booted"."""

    def __init__(self, memory: Size = "256M", cpus: int = 1, *, boot_timeout: float = BOOT_TIMEOUT,
                 log_level: str = "INFO", pool: bool = True) -> None:
        mib = parse_size(memory, "memory") >> 20     # an int is bytes, as everywhere in this API
        if mib < MIN_MEMORY_MIB:
            raise InvalidRequest(f"memory {memory!r}: a sandbox needs at least {MIN_MEMORY_MIB} MiB", "invalid")
        if not isinstance(cpus, int) or not 1 <= cpus <= (os.cpu_count() or 1) * 4:
            raise InvalidRequest(f"cpus {cpus!r}: 1..{(os.cpu_count() or 1) * 4}", "invalid")
        self.memory_mib = mib
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.log_level = log_level
        self.pool = bool(pool)
        self.id = secrets.token_hex(6)
        self.record: dict = {}
        self._process: Optional[asyncio.subprocess.Process] = None
        self._client: Optional[OwnerClient] = None
        self._listeners: list[Callable[[Event], None]] = []
        self._loss: Optional[asyncio.Task] = None
        self._closing = False
        self._owner_start: Optional[int] = None
        self.gone_reason: Optional[str] = None

    # -- life -----------------------------------------------------------------
    async def __aenter__(self) -> "AsyncSandbox":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> "AsyncSandbox":
        """Start the owner and boot the VM (or claim a pooled one); returns once containers can be made."""
        if self._process is not None:
            raise Conflict("this sandbox was started already", "state")
        self._process, self._client = await spawn_owner(self.id, self.memory_mib, self.cpus, self.log_level,
                                                        pool=self.pool)
        self._owner_start = records.start_time(self._process.pid)
        self._client.add_listener(self._dispatch)
        try:
            self.record = _with_vm(await self._client.request("ready", timeout=self.boot_timeout))
            await self._client.request("subscribe")
        except (OwnerRequestError, OwnerConnectionError) as exc:
            reason = await self._abandon()
            detail = str(exc) if isinstance(exc, OwnerRequestError) else (exc.reason or reason)
            raise BootError(detail) from exc
        except BaseException:
            await self._abandon()
            raise
        self._client.closed.add_done_callback(lambda _: self._lost())
        return self

    @property
    def alive(self) -> bool:
        return self._client is not None and self._client.failure is None and not self._closing

    @property
    def owner_pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    async def _abandon(self) -> str:
        """End the owner (a start that failed): nothing may be left."""
        reason = ""
        if self._client is not None:
            reason = self._client.gone_reason or ""
            await self._client.close()      # closing the control connection ends the owner
        if self._process is not None:
            await self._reap_owner()
            reason = reason or f"the sandbox owner ended ({describe_exit(self._process.returncode)})"
            reason += self._log_tail()
            await self._clean_up()
        self.gone_reason = self.gone_reason or reason
        return reason

    async def _reap_owner(self) -> None:
        """The owner ends by itself once its control connection is gone; one
        that does not within SHUTDOWN_TIMEOUT is killed (its QEMU dies with it).

        Gone means gone from /proc, not only that asyncio reported an exit:
        its child watcher reports 255 for a child that something else in this
        program reaped, and the owner may then still be running."""
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        try:
            await asyncio.wait_for(self._process.wait(), SHUTDOWN_TIMEOUT)
        except asyncio.TimeoutError:
            self._process.kill()
            await self._process.wait()
        pid, start = self._process.pid, self._owner_start
        while records.same_process(pid, start):
            if time.monotonic() >= deadline:
                log.warning("sandbox owner %d outlived its reported exit: killing it", pid)
                os.kill(pid, signals.SIGKILL)
                deadline = time.monotonic() + SHUTDOWN_TIMEOUT
            await asyncio.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            text = (records.sandbox_dir(self.id) / records.LOG).read_text(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
        return f"; its log: {lines[-1][-500:]}" if lines else ""

    async def _clean_up(self) -> None:
        """Remove what a dead owner left (idempotent: nothing when it cleaned up itself)."""
        record = self.record or {"run_dir": str(records.sandbox_dir(self.id)),
                                 "vm_run_dir": str(records.vm_dir(self.id))}
        found = records.read(records.sandbox_dir(self.id))
        if found:
            record = found
        await asyncio.get_running_loop().run_in_executor(None, records.clean_up_after, record)

    def _lost(self) -> None:
        """The connection to the owner closed."""
        if self._loss is None:
            self._loss = asyncio.ensure_future(self._after_loss())

    async def _after_loss(self) -> str:
        reason = self._client.gone_reason if self._client is not None else None
        if self._process is not None:
            await self._reap_owner()
            if reason is None:
                reason = (f"the sandbox owner (pid {self._process.pid}) died "
                          f"({describe_exit(self._process.returncode)})" + self._log_tail())
        await self._clean_up()
        self.gone_reason = self.gone_reason or reason or "the sandbox ended"
        if self._client is not None and self._client.gone_reason is None and not self._closing:
            # The owner could not say it: tell the listeners ourselves.
            now = time.time()
            self._dispatch({"event": "gone", "reason": self.gone_reason, "time": now})
        return self.gone_reason

    async def close(self) -> None:
        """End the sandbox: its containers, its VM, everything of it on the host. Idempotent."""
        if self._process is None or self._closing:
            if self._loss is not None:
                await asyncio.shield(self._loss)
            return
        self._closing = True
        if self._client is not None and self._client.failure is None:
            try:
                await self._client.request("shutdown", timeout=SHUTDOWN_TIMEOUT)
            except (OwnerRequestError, OwnerConnectionError) as exc:
                log.debug("shutdown: %s", exc)
        if self._client is not None:
            await self._client.close()
        self._lost()
        await asyncio.shield(self._loss)
        self.gone_reason = self.gone_reason or "closed"

    # -- requests ---------------------------------------------------------------
    async def _request(self, request_type: str, args: Optional[dict] = None,
                       timeout: Optional[float] = REQUEST_TIMEOUT) -> dict:
        if self._client is None:
            raise SandboxGone("the sandbox was never started")
        if self._closing:
            raise SandboxGone(self.gone_reason or "the sandbox was closed")
        try:
            return await self._client.request(request_type, args, timeout=timeout)
        except OwnerRequestError as exc:
            if exc.code == "gone" and self._loss is not None:
                raise SandboxGone(await asyncio.shield(self._loss)) from exc
            raise _translate(exc) from exc
        except OwnerConnectionError as exc:
            self._lost()
            raise SandboxGone(await asyncio.shield(self._loss)) from exc

    async def info(self) -> dict:
        """The sandbox record: id, VM ("vm": "pooled" or "booted"), owner and QEMU pids, containers."""
        self.record = _with_vm(await self._request("info"))
        return self.record

    async def containers(self) -> list[ContainerInfo]:
        return [ContainerInfo.from_wire(c) for c in (await self.info())["containers"]]

    def container(self, name: str) -> "AsyncContainer":
        """A handle on an existing container by name."""
        return AsyncContainer(self, name)

    async def create_container(self, name: str, rootfs: Union[str, os.PathLike], args: Sequence[str] = KEEP_ALIVE,
                               *, env: Env = None, cwd: str = "/", user: User = None,
                               hostname: Optional[str] = None, memory: Optional[Size] = None,
                               pids: Optional[int] = None, cpus: Optional[float] = None, readonly: bool = False,
                               privileged: bool = False, stdin: Union[bytes, str, None] = None,
                               max_output: int = DEFAULT_OUTPUT) -> "AsyncContainer":
        """A container with its own rootfs (a host directory, shared into the
        VM), namespaces and cgroup, and `args` as its init, created but held
        before exec: `start()` runs it. Its stdout and stderr are kept (the
        first `max_output` bytes each) for `wait()`. `memory`, `pids` and
        `cpus` are its cgroup's limits in the guest. `hostname` defaults to
        the name. Without `privileged`, processes get Docker's default
        capabilities (containers of one sandbox share its network)."""
        wire = {"name": name, **_container_args(rootfs, hostname, memory, pids, cpus, readonly),
                **_process_args(args, env, cwd, user, stdin, max_output, privileged)}
        await self._request("create_container", wire)
        return AsyncContainer(self, name)

    async def run(self, args: Sequence[str], rootfs: Union[str, os.PathLike], *,
                  stdin: Union[bytes, str, None] = None, env: Env = None, cwd: str = "/", user: User = None,
                  timeout: Optional[float] = None, hostname: Optional[str] = None, memory: Optional[Size] = None,
                  pids: Optional[int] = None, cpus: Optional[float] = None, readonly: bool = False,
                  privileged: bool = False, check: bool = False, max_output: int = DEFAULT_OUTPUT) -> ExecResult:
        """Run `args` in a one-shot container (created, started, deleted) and
        return how it ended. After `timeout` seconds it is killed and
        SandboxTimeout raised (its `result` holds the output so far)."""
        wire = {**_container_args(rootfs, hostname, memory, pids, cpus, readonly),
                **_process_args(args, env, cwd, user, stdin, max_output, privileged)}
        if timeout is not None:
            wire["timeout"] = float(timeout)
        result = ExecResult.from_wire(await self._request("run", wire, timeout=_reply_timeout(timeout)))
        return _checked(result, args, timeout, check)

    # -- events ---------------------------------------------------------------------
    def _dispatch(self, wire: dict) -> None:
        event = Event.from_wire(wire, time.time())
        if event.kind == "gone" and not self.gone_reason:
            self.gone_reason = event.reason
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event callback failed")

    def on_event(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback(event)` for each event from now on (in the event
        loop's thread; it must not block). Returns a function that unregisters it."""
        self._listeners.append(callback)

        def cancel() -> None:
            try:
                self._listeners.remove(callback)
            except ValueError:
                pass
        return cancel

    def events(self) -> AsyncEventStream:
        """A stream of the events from now on (exit, oom, gone)."""
        return AsyncEventStream(self)


def _reply_timeout(timeout: Optional[float]) -> Optional[float]:
    """How long to wait for the owner's answer to something killed after `timeout`."""
    return None if timeout is None else timeout + REQUEST_TIMEOUT


def _checked(result: ExecResult, args: Sequence[str], timeout: Optional[float], check: bool) -> ExecResult:
    if result.timed_out:
        raise SandboxTimeout(f"{list(args)[:1]} did not end within {timeout:g} s and was killed", result)
    if check and result.status != 0:
        raise CommandFailed(result, list(args))
    return result


class AsyncProcess:
    """A process whose stdio this program holds (AsyncContainer.exec_stream):
    `stdin` a StreamWriter, `stdout`/`stderr` StreamReaders, each a vsock
    connection of its own straight to the guest."""

    def __init__(self, container: "AsyncContainer", process_id: str) -> None:
        self.container = container
        self.process_id = process_id
        self.pid: Optional[int] = None
        self.stdin: Optional[asyncio.StreamWriter] = None
        self.stdout: Optional[asyncio.StreamReader] = None
        self.stderr: Optional[asyncio.StreamReader] = None
        self._writers: list[asyncio.StreamWriter] = []

    async def close_stdin(self) -> None:
        if self.stdin is not None:
            if self.stdin.can_write_eof():
                self.stdin.write_eof()
            await self.stdin.drain()

    async def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """How it ended (its output is what this program read from the streams)."""
        sandbox = self.container.sandbox
        wire = {"name": self.container.name, "process_id": self.process_id}
        if timeout is not None:
            wire["timeout"] = float(timeout)
        result = await sandbox._request("wait", wire, timeout=_reply_timeout(timeout))
        self.close()
        return ExecResult.from_wire(result)

    async def signal(self, signum: int = signals.SIGTERM) -> None:
        await self.container.signal(signum, process_id=self.process_id)

    async def kill(self) -> None:
        await self.signal(signals.SIGKILL)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


class AsyncContainer:
    """A container in an AsyncSandbox, by name."""

    def __init__(self, sandbox: AsyncSandbox, name: str) -> None:
        self.sandbox = sandbox
        self.name = name

    def __repr__(self) -> str:
        return f"AsyncContainer({self.name!r})"

    async def start(self) -> int:
        """Run its init; returns its pid in the guest."""
        return (await self.sandbox._request("start", {"name": self.name}))["pid"]

    async def info(self) -> ContainerInfo:
        for info in await self.sandbox.containers():
            if info.name == self.name:
                return info
        raise NotFound(f"no container {self.name!r}", "not_found")

    async def exec(self, args: Sequence[str], *, stdin: Union[bytes, str, None] = None, env: Env = None,
                   cwd: Optional[str] = None, user: User = None, timeout: Optional[float] = None,
                   privileged: bool = False, check: bool = False, max_output: int = DEFAULT_OUTPUT) -> ExecResult:
        """Run a further process in the container (its namespaces, root and
        cgroup) and return how it ended, with its output (the first
        `max_output` bytes of each stream). After `timeout` seconds it is
        killed and SandboxTimeout raised. `env` adds to the container's."""
        wire = {"name": self.name, **_process_args(args, env, cwd, user, stdin, max_output, privileged,
                                                   base_env=(), with_env=False)}
        if timeout is not None:
            wire["timeout"] = float(timeout)
        result = ExecResult.from_wire(await self.sandbox._request("exec", wire, timeout=_reply_timeout(timeout)))
        return _checked(result, args, timeout, check)

    async def exec_stream(self, args: Sequence[str], *, env: Env = None, cwd: Optional[str] = None,
                          user: User = None, privileged: bool = False,
                          streams: Sequence[str] = ("stdin", "stdout", "stderr")) -> AsyncProcess:
        """Start a further process whose stdio this program reads and writes
        itself, as it runs (see AsyncProcess). Streams left out get /dev/null."""
        wire = {"name": self.name, **_process_args(args, env, cwd, user, None, 0, privileged, base_env=(),
                                                   with_env=False),
                "streams": list(streams)}
        wire.pop("max_output")
        reply = await self.sandbox._request("exec_stream", wire)
        process = AsyncProcess(self, reply["process_id"])
        vsock = reply["vsock"]
        transport = transport_of(vsock, str(Path(vsock["uds"]).parent) if "uds" in vsock else None)
        try:
            for name in ("stdin", "stdout", "stderr"):
                if name in streams:
                    reader, writer = await open_stream(transport, reply["agent_process_id"], name)
                    process._writers.append(writer)
                    if name == "stdin":
                        process.stdin = writer
                    else:
                        setattr(process, name, reader)
            process.pid = (await self.sandbox._request("start_process", {"name": self.name,
                                                                         "process_id": process.process_id}))["pid"]
        except KataError as exc:
            process.close()
            if isinstance(exc, SandboxError):
                raise
            raise RequestFailed(f"attaching the stdio of {process.process_id}: {exc}") from exc
        return process

    async def signal(self, signum: int = signals.SIGTERM, *, process_id: Optional[str] = None) -> None:
        """Signal its init (or one of its processes)."""
        wire = {"name": self.name, "signal": int(signum)}
        if process_id is not None:
            wire["process_id"] = process_id
        await self.sandbox._request("signal", wire)

    async def kill(self) -> None:
        await self.signal(signals.SIGKILL)

    async def wait(self, timeout: Optional[float] = None) -> ExecResult:
        """Wait for its init to exit: its status and output. SandboxTimeout if
        it still runs after `timeout` (it is not killed)."""
        wire: dict = {"name": self.name}
        if timeout is not None:
            wire["timeout"] = float(timeout)
        return ExecResult.from_wire(await self.sandbox._request("wait", wire, timeout=_reply_timeout(timeout)))

    async def put_file(self, path: str, data: Union[bytes, str], *, mode: int = 0o644, parents: bool = True) -> None:
        """Write a file as the container sees its filesystem (its root and
        mounts; symlinks resolved inside its root), making parent directories."""
        raw = _bytes(data) or b""
        if len(raw) > MAX_FILE:
            raise InvalidRequest(f"{len(raw)} bytes: put_file takes at most {MAX_FILE}", "invalid")
        await self.sandbox._request("put_file", {"name": self.name, "path": path, "data": _b64(raw),
                                                 "mode": mode, "parents": parents})

    async def get_file(self, path: str, *, max_size: int = MAX_FILE) -> bytes:
        """Read a file as the container sees it (at most `max_size` bytes, else InvalidRequest)."""
        reply = await self.sandbox._request("get_file", {"name": self.name, "path": path,
                                                         "max_size": min(int(max_size), MAX_FILE)})
        return binascii.a2b_base64(reply["data"])

    async def delete(self) -> None:
        """Kill what runs in it and remove it from the sandbox."""
        await self.sandbox._request("delete_container", {"name": self.name})

    async def events(self) -> AsyncIterator[Event]:
        """This container's events from now on, until its init exits (that
        event included) or the sandbox ends."""
        stream = self.sandbox.events()
        try:
            async for event in stream:
                if event.kind == "gone":
                    yield event
                    return
                if event.container == self.name:
                    yield event
                    if event.kind == "exit" and event.init:
                        return
        finally:
            stream.close()
