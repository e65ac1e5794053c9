"""The containers of one sandbox, as its owner process keeps them.

Each container has its own entry in the sandbox's 9p export (its rootfs),
and in the guest its own mount/pid/ipc/uts/cgroup namespaces and cgroup
(the agent's create_container); all of them share the VM's network
namespace. Processes are addressed by (container, process id): the init is
`init`, further ones `e<N>` (captured output) or `s<N>` (stdio the client
attaches itself). The agent's ids are `<container>.<id>`.

The owner is the only one that waits for a guest process (the agent answers
one wait_process per process): every started process has a watcher task,
which records its exit, publishes an `exit` event at once, and then lets
`wait` requests have the result. OOM kills come from a blocking
`watch_oom` request per container: the agent answers it when the
container's memory.events changes, so the event is pushed, not polled.
"""

from __future__ import annotations

import asyncio
import binascii
import itertools
import logging
import signal
import time
from dataclasses import dataclass, field

from ..errors import KataError
from ..protocol.messages import MAX_FILE_CHUNK
from .agent_client import AgentRequestError
from .handle import SandboxHandle
from .owner_protocol import DEFAULT_OUTPUT, MAX_CONTAINERS, MAX_FILE
from .process import DEFAULT_ENV, ProcessSession, exit_status
from .share import TAG, ContainerShare, ShareError

log = logging.getLogger("kata_py.owner")

RELAY_CHUNK = 256 * 1024
DRAIN_TIMEOUT = 5.0         # after an exit: the most the rest of its output may take
KILL_WAIT = 30.0            # after a timeout's SIGKILL: the most its exit may take
DEFAULT_NAMESPACES = ["cgroup", "ipc", "mount", "pid", "uts"]
MAX_FINISHED = 256          # exited processes whose results a container keeps for `wait`
MAX_PROCESSES = 1024        # processes of one container at once


class OwnerError(KataError):
    """A request the owner refuses or fails: `code` is one of owner_protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def agent_failure(exc: KataError, what: str) -> OwnerError:
    """An agent error as the owner's client should see it."""
    if isinstance(exc, AgentRequestError):
        code = exc.code if exc.code in ("invalid", "not_found", "exists", "state") else "failed"
        return OwnerError(code, f"{what}: {exc}")
    if isinstance(exc, OwnerError):
        return exc
    return OwnerError("failed", f"{what}: {exc}")


class Output:
    """One captured stream: the first `limit` bytes; the rest is read and dropped
    (a process must never block on a pipe nobody drains)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    async def pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(RELAY_CHUNK):
                room = self.limit - len(self.data)
                if room > 0:
                    self.data += chunk[:room]
                if len(chunk) > room:
                    self.truncated = True
        except (OSError, KataError) as exc:
            log.debug("output relay ended: %s", exc)


@dataclass
class GuestProcess:
    container: "Container"
    process_id: str
    init: bool
    session: ProcessSession
    stdin: bytes | None = None
    outputs: dict[str, Output] = field(default_factory=dict)
    pumps: list[asyncio.Task] = field(default_factory=list)
    watcher: asyncio.Task | None = None
    pid: int | None = None
    exit: tuple[int | None, int | None] | None = None   # (exit_code, signal)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timed_out: bool = False
    finished_at: float | None = None

    @property
    def agent_id(self) -> str:
        return self.session.process_id

    def result(self) -> dict:
        exit_code, signum = self.exit or (None, None)
        out = {}
        for name in ("stdout", "stderr"):
            capture = self.outputs.get(name)
            data = bytes(capture.data) if capture else b""
            out[name] = binascii.b2a_base64(data, newline=False).decode("ascii")
            out[name + "_truncated"] = bool(capture and capture.truncated)
        return {"exit_code": exit_code, "signal": signum, "status": exit_status(exit_code, signum),
                "timed_out": self.timed_out, **out}


@dataclass
class Container:
    name: str
    entry: str
    rootfs: str
    env: list[str]
    cwd: str
    user: dict | None
    security: dict
    status: str = "created"
    init: GuestProcess | None = None
    processes: dict[str, GuestProcess] = field(default_factory=dict)
    oom_kill: int = 0
    oom_watcher: asyncio.Task | None = None
    deleting: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def info(self) -> dict:
        exit = self.init.exit if self.init is not None else None
        return {"name": self.name, "status": self.status, "rootfs": self.rootfs,
                "pid": self.init.pid if self.init is not None else None,
                "exit_status": exit_status(*exit) if exit is not None else None, "oom_kill": self.oom_kill}


def _merged(base: list[str], extra: list[str]) -> list[str]:
    env = dict(item.split("=", 1) for item in base if "=" in item)
    env.update(item.split("=", 1) for item in extra if "=" in item)
    return [f"{key}={value}" for key, value in env.items()]


def _security(args: dict) -> dict:
    return {key: args[key] for key in ("capabilities", "no_new_privileges") if key in args}


class Containers:
    """The owner's table of containers in its one VM."""

    def __init__(self, sandbox: SandboxHandle, export: ContainerShare, publish, lost, changed,
                 mount_tag: str = TAG) -> None:
        self.sandbox = sandbox          # booted (sandbox.Sandbox) or claimed from the pool (pool.PooledSandbox)
        self.export = export
        self.mount_tag = mount_tag      # the export's 9p tag: TAG, or "rootfs" in a pooled VM
        self.publish = publish          # publish(event dict)
        self.lost = lost                # lost(reason): the agent connection broke
        self.changed = changed          # changed(): rewrite the sandbox record
        self.by_name: dict[str, Container] = {}
        self.entries = itertools.count(1)
        self.serial = itertools.count(1)
        self.closing = False

    @property
    def agent(self):
        return self.sandbox.agent

    def get(self, name: str) -> Container:
        container = self.by_name.get(name)
        if container is None or container.deleting:
            raise OwnerError("not_found", f"no container {name!r}")
        return container

    def infos(self) -> list[dict]:
        return [c.info() for c in self.by_name.values()]

    def _running(self, container: Container) -> None:
        if container.status == "stopped":
            raise OwnerError("exited", f"container {container.name!r} has exited "
                                       f"(status {container.info()['exit_status']})")

    # -- processes ------------------------------------------------------------------
    def _session(self, container: Container, process_id: str, args: dict, init: bool,
                 streams: list[str], capture: bool) -> GuestProcess:
        env = container.env
        if "env" in args:
            # An init's environment is its own; a further process's adds to the container's.
            env = args["env"] if init else _merged(container.env, args["env"])
        # Placeholder descriptors: the session only needs to know which streams
        # exist; their data is captured here (or attached by the client).
        fds = {name: (-1 if name in streams else None) for name in ("stdin", "stdout", "stderr")}
        session = ProcessSession(self.sandbox, list(args["args"]), env=list(env),
                                 cwd=args.get("cwd", container.cwd), stdin_fd=fds["stdin"], stdout_fd=fds["stdout"],
                                 stderr_fd=fds["stderr"], container_id=container.name, init=init,
                                 user=args.get("user", container.user),
                                 security=None if args.get("privileged") else
                                 ({**container.security, **_security(args)} or None),
                                 process_id=f"{container.name}.{process_id}")
        proc = GuestProcess(container, process_id, init, session)
        if capture:
            limit = args.get("max_output", DEFAULT_OUTPUT)
            proc.outputs = {name: Output(limit) for name in ("stdout", "stderr")}
        return proc

    async def _open(self, proc: GuestProcess) -> None:
        """create_process and its stdio connections; start capturing."""
        await proc.session.create()
        for name, capture in proc.outputs.items():
            if name in proc.session.connections:
                proc.pumps.append(asyncio.ensure_future(capture.pump(proc.session.connections[name][0])))

    def _feed_stdin(self, proc: GuestProcess) -> None:
        if "stdin" not in proc.session.connections:
            return
        writer = proc.session.connections["stdin"][1]
        data = proc.stdin or b""

        async def feed() -> None:
            try:
                if data:
                    writer.write(data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
            except (OSError, KataError) as exc:     # it exited without reading it all: its right
                log.debug("stdin of %s: %s", proc.agent_id, exc)

        proc.pumps.append(asyncio.ensure_future(feed()))

    def _watch(self, proc: GuestProcess) -> None:
        proc.watcher = asyncio.ensure_future(self._wait_for_exit(proc))

    async def _wait_for_exit(self, proc: GuestProcess) -> None:
        try:
            result = await self.agent.request("wait_process", {"process_id": proc.agent_id}, timeout=None)
        except AgentRequestError as exc:
            log.warning("wait for %s: %s", proc.agent_id, exc)
            result = {"exit_code": None, "signal": signal.SIGKILL}
        except KataError as exc:
            if not self.closing:
                self.lost(f"the guest agent's connection failed: {exc}")
            proc.done.set()
            return
        proc.exit = (result["exit_code"], result["signal"])
        proc.finished_at = time.time()
        container = proc.container
        if proc.init:
            container.status = "stopped"
        # Pushed at once: the output that is still on its way does not delay it.
        self.publish({"event": "exit", "container": container.name, "process_id": proc.process_id,
                      "init": proc.init, "exit_code": proc.exit[0], "signal": proc.exit[1],
                      "status": exit_status(*proc.exit), "time": proc.finished_at})
        if proc.init:
            self.changed()
        if proc.pumps:
            _, pending = await asyncio.wait(proc.pumps, timeout=DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
        proc.session.close()
        proc.done.set()
        self._prune(container)

    def _prune(self, container: Container) -> None:
        finished = [p for p in container.processes.values() if p.done.is_set() and not p.init]
        for proc in finished[:max(0, len(finished) - MAX_FINISHED)]:
            container.processes.pop(proc.process_id, None)

    def _process(self, container: Container, process_id: str | None) -> GuestProcess:
        if process_id is None or process_id == "init":
            if container.init is None:
                raise OwnerError("state", f"container {container.name!r} has no init process")
            return container.init
        proc = container.processes.get(process_id)
        if proc is None:
            raise OwnerError("not_found", f"no process {process_id!r} in container {container.name!r}")
        return proc

    async def _finish(self, proc: GuestProcess, timeout: float | None) -> dict:
        """Wait for the process (killing it after `timeout`); its result."""
        try:
            await asyncio.wait_for(asyncio.shield(proc.done.wait()), timeout)
        except asyncio.TimeoutError:
            proc.timed_out = True
            try:
                await self.agent.request("signal_process", {"process_id": proc.agent_id, "signal": signal.SIGKILL})
            except AgentRequestError:
                pass    # it exited meanwhile
            except KataError as exc:
                raise agent_failure(exc, "killing the process after its timeout") from exc
            try:
                await asyncio.wait_for(asyncio.shield(proc.done.wait()), KILL_WAIT)
            except asyncio.TimeoutError:
                raise OwnerError("failed", f"process {proc.process_id} did not die within {KILL_WAIT:.0f} s "
                                           "of SIGKILL") from None
        if proc.exit is None:
            raise OwnerError("gone", "the sandbox's VM went away before the process ended")
        return proc.result()

    # -- requests -------------------------------------------------------------------
    async def create(self, args: dict) -> Container:
        name = args["name"]
        if name in self.by_name:
            raise OwnerError("exists", f"container {name!r} already exists")
        if len(self.by_name) >= MAX_CONTAINERS:
            raise OwnerError("state", f"a sandbox holds at most {MAX_CONTAINERS} containers")
        container = Container(name=name, entry=f"c{next(self.entries)}", rootfs=args["rootfs"],
                              env=list(args.get("env", DEFAULT_ENV)), cwd=args.get("cwd", "/"),
                              user=args.get("user"), security={} if args.get("privileged") else _security(args))
        self.by_name[name] = container
        async with container.lock:
            created = False
            try:
                self.export.add(args["rootfs"], readonly=bool(args.get("readonly")), name=container.entry)
                spec = {"container_id": name, "mount_tag": self.mount_tag, "rootfs_path": container.entry,
                        "readonly": bool(args.get("readonly")), "hostname": args.get("hostname", name),
                        "resources": args.get("resources", {}),
                        "namespaces": sorted(set(args.get("namespaces", DEFAULT_NAMESPACES)) | {"mount"}),
                        "mounts": list(args.get("mounts", [])),
                        "masked_paths": list(args.get("masked_paths", [])),
                        "readonly_paths": list(args.get("readonly_paths", []))}
                await self.agent.request("create_container", spec)
                created = True
                init = self._session(container, "init", args, init=True,
                                     streams=["stdout", "stderr"] + (["stdin"] if "stdin" in args else []),
                                     capture=True)
                init.stdin = binascii.a2b_base64(args["stdin"]) if "stdin" in args else None
                await self._open(init)
                container.init = init
                init.pid = await init.session.prepare()
                self._watch(init)
            except BaseException as exc:
                self.by_name.pop(name, None)
                if container.init is not None:
                    container.init.session.close()
                if created:
                    try:
                        await self.agent.request("delete_container", {"container_id": name})
                    except KataError as undo:
                        log.warning("undoing container %s: %s", name, undo)
                self.export.remove(container.entry)
                if isinstance(exc, ShareError):
                    raise OwnerError("invalid", str(exc)) from exc
                if isinstance(exc, KataError):
                    raise agent_failure(exc, f"creating container {name!r}") from exc
                raise
        container.oom_watcher = asyncio.ensure_future(self._watch_oom(container))
        self.changed()
        return container

    async def _watch_oom(self, container: Container) -> None:
        while not container.deleting and not self.closing:
            try:
                result = await self.agent.request("watch_oom", {"container_id": container.name,
                                                                "seen": container.oom_kill}, timeout=None)
            except KataError as exc:
                log.debug("OOM watch of %s ended: %s", container.name, exc)
                return
            if result["ended"] or container.deleting:
                return
            if result["oom_kill"] > container.oom_kill:
                container.oom_kill = result["oom_kill"]
                self.publish({"event": "oom", "container": container.name, "oom_kill": container.oom_kill,
                              "time": time.time()})

    async def start(self, name: str) -> int:
        container = self.get(name)
        async with container.lock:
            self._running(container)
            if container.status == "running":
                raise OwnerError("state", f"container {name!r} is already running")
            try:
                pid = await container.init.session.start()
            except KataError as exc:
                raise agent_failure(exc, f"starting container {name!r}") from exc
            container.status = "running"
            self._feed_stdin(container.init)
        self.changed()
        return pid

    async def exec(self, args: dict) -> dict:
        container = self.get(args["name"])
        self._running(container)
        if len(container.processes) >= MAX_PROCESSES:
            raise OwnerError("state", f"container {container.name!r} has {MAX_PROCESSES} processes")
        proc = self._session(container, f"e{next(self.serial)}", args, init=False,
                             streams=["stdout", "stderr"] + (["stdin"] if "stdin" in args else []), capture=True)
        proc.stdin = binascii.a2b_base64(args["stdin"]) if "stdin" in args else None
        try:
            await self._open(proc)
            container.processes[proc.process_id] = proc
            proc.pid = await proc.session.start()
        except KataError as exc:
            container.processes.pop(proc.process_id, None)
            for task in proc.pumps:
                task.cancel()
            proc.session.close()
            if container.status == "stopped":
                raise OwnerError("exited", f"container {container.name!r} has exited") from exc
            raise agent_failure(exc, f"exec in container {container.name!r}") from exc
        self._watch(proc)
        self._feed_stdin(proc)
        return await self._finish(proc, args.get("timeout"))

    async def exec_stream(self, args: dict) -> dict:
        container = self.get(args["name"])
        self._running(container)
        if len(container.processes) >= MAX_PROCESSES:
            raise OwnerError("state", f"container {container.name!r} has {MAX_PROCESSES} processes")
        streams = list(dict.fromkeys(args.get("streams", ["stdin", "stdout", "stderr"])))
        proc = self._session(container, f"s{next(self.serial)}", args, init=False, streams=streams, capture=False)
        try:
            await self.agent.request("create_process", proc.session.args)
        except KataError as exc:
            raise agent_failure(exc, f"exec in container {container.name!r}") from exc
        container.processes[proc.process_id] = proc
        return {"process_id": proc.process_id, "agent_process_id": proc.agent_id,
                "vsock": self.sandbox.transport.address()}

    async def start_process(self, name: str, process_id: str) -> int:
        container = self.get(name)
        proc = self._process(container, process_id)
        if proc.init:
            raise OwnerError("invalid", "the init process starts with `start`")
        if proc.pid is not None:
            raise OwnerError("state", f"process {process_id!r} already started")
        try:
            proc.pid = await proc.session.start()
        except KataError as exc:
            raise agent_failure(exc, f"starting process {process_id!r}") from exc
        self._watch(proc)
        return proc.pid

    async def signal(self, name: str, process_id: str | None, signum: int) -> None:
        container = self.get(name)
        proc = self._process(container, process_id)
        if proc.exit is not None:
            raise OwnerError("exited", f"process {proc.process_id!r} of {name!r} has exited")
        try:
            await proc.session.signal(signum)
        except KataError as exc:
            raise agent_failure(exc, f"signalling {proc.process_id!r} of {name!r}") from exc

    async def wait(self, name: str, process_id: str | None, timeout: float | None) -> dict:
        container = self.get(name)
        proc = self._process(container, process_id)
        if proc.pid is None and not proc.init:
            raise OwnerError("state", f"process {proc.process_id!r} is not started")
        try:
            await asyncio.wait_for(asyncio.shield(proc.done.wait()), timeout)
        except asyncio.TimeoutError:
            raise OwnerError("timeout", f"{proc.process_id!r} of {name!r} still runs after {timeout:g} s") from None
        if proc.exit is None:
            raise OwnerError("gone", "the sandbox's VM went away before the process ended")
        return proc.result()

    async def delete(self, name: str) -> None:
        container = self.get(name)
        container.deleting = True
        async with container.lock:
            try:
                await self.agent.request("delete_container", {"container_id": name})
            except AgentRequestError as exc:
                if exc.code != "not_found":
                    container.deleting = False
                    raise agent_failure(exc, f"deleting container {name!r}") from exc
            except KataError as exc:
                container.deleting = False
                raise agent_failure(exc, f"deleting container {name!r}") from exc
            procs = [p for p in [container.init, *container.processes.values()] if p is not None]
            waiting = [p.done.wait() for p in procs if p.watcher is not None]
            if waiting:
                await asyncio.wait([asyncio.ensure_future(w) for w in waiting], timeout=DRAIN_TIMEOUT)
            for proc in procs:
                for task in proc.pumps:
                    task.cancel()
                proc.session.close()
            self.export.remove(container.entry)
            self.by_name.pop(name, None)
        self.changed()

    async def put_file(self, name: str, path: str, data: bytes, mode: int, parents: bool) -> None:
        container = self.get(name)
        self._running(container)
        if len(data) > MAX_FILE:
            raise OwnerError("invalid", f"{len(data)} bytes: the most put_file takes is {MAX_FILE}")
        offset = 0
        try:
            while True:
                chunk = data[offset:offset + MAX_FILE_CHUNK]
                await self.agent.request("write_file", {
                    "container_id": name, "path": path, "offset": offset, "truncate": offset == 0,
                    "mode": mode, "parents": parents and offset == 0,
                    "data": binascii.b2a_base64(chunk, newline=False).decode("ascii")})
                offset += len(chunk)
                if offset >= len(data):
                    return
        except KataError as exc:
            raise self._file_failure(container, exc, f"writing {path}") from exc

    async def get_file(self, name: str, path: str, max_size: int) -> bytes:
        container = self.get(name)
        self._running(container)
        data = bytearray()
        try:
            while True:
                result = await self.agent.request("read_file", {
                    "container_id": name, "path": path, "offset": len(data), "length": MAX_FILE_CHUNK})
                data += binascii.a2b_base64(result["data"])
                if result["size"] > max_size or len(data) > max_size:
                    raise OwnerError("invalid", f"{path} has {max(result['size'], len(data))} bytes, more than "
                                                f"the {max_size} asked for")
                if result["eof"] or not result["data"]:
                    return bytes(data)
        except KataError as exc:
            raise self._file_failure(container, exc, f"reading {path}") from exc

    def _file_failure(self, container: Container, exc: KataError, what: str) -> OwnerError:
        if container.status == "stopped":
            return OwnerError("exited", f"container {container.name!r} has exited")
        return agent_failure(exc, what)

    async def run(self, args: dict) -> dict:
        """A one-shot container: create, start, wait (kill after `timeout`), delete."""
        name = args.get("name")
        while name is None or name in self.by_name:
            name = f"run-{next(self.serial)}"
        container = await self.create(dict(args, name=name))
        try:
            await self.start(name)
            return await self._finish(container.init, args.get("timeout"))
        finally:
            if name in self.by_name and not self.closing:
                try:
                    await self.delete(name)
                except KataError as exc:
                    log.warning("deleting one-shot container %s: %s", name, exc)
