"""The sandbox owner: one process that owns one VM for the sandbox's life.

    python -m kata_py.sandbox.owner --id ID [--memory-mib N] [--cpus N] [--control-fd FD] [--pool]

It boots the VM (kata_py.sandbox.sandbox.Sandbox), or, with --pool and a VM
factory running, claims a pooled VM of at least that size instead
(kata_py.sandbox.pool: a VM that serves this one sandbox and that its
standby destroys when the claim connection closes), holds any number of
containers in it (containers.py), and serves requests from other processes
on a Unix socket, `<run_dir()>/sb-<ID>/owner.sock` (0600), in the agent
protocol's frames with schemas of its own (owner_protocol.py). Handlers
validate what the schema cannot and delegate to do_* methods. Container
exits and OOM kills are pushed to subscribed connections as they happen.
Its record, `sandbox.json` beside the socket, names the VM, the owner's and
QEMU's pids with their start times, and the containers (record.py).

It runs in a mount namespace of its own, entered before any thread exists:
the binds of the containers' rootfs into the VM's 9p export live there and
die with it (and with QEMU, which shares it), however the owner ends. With a
pooled VM it is the standby's namespace, joined as early, and the export is
the standby's share directory (9p tag "rootfs"), where each container gets
an entry of its own beside the standby's; the standby removes the share.

**Lifetime.** The sandbox ends, and the owner removes everything of it (the
VM, its vsock back end, its host cgroups, the export and its binds, the run
directories) and exits, when:
- a `shutdown` request comes (on any connection; the reply comes once all
  is gone);
- its control connection closes: the one it was started with (`--control-fd`,
  one end of a socketpair whose other end the client that spawned it holds).
  A client that exits or dies without closing the sandbox closes it by
  dying: the kernel closes its end. Other connections (the Unix socket)
  come and go without effect;
- its VM dies (QEMU killed or crashed, the agent's connection lost): every
  connection first gets a `gone` event with the reason;
- SIGTERM. (SIGINT and SIGHUP are ignored: it runs in its own session, and a
  terminal's ^C is for the client.)
**One container's sandbox** (`--container FILE`, the OCI CLI's shape; see
single.py): the owner runs in the container's network namespace with the
container's stdio, attaches that namespace to the VM, creates the container
and its init from what `create` computed, reports on `--status-fd`, and ends
the sandbox when the init exits, exiting with the init's status. Where the
spec names a `linux.cgroupsPath`, the sandbox's host processes live in that
cgroup under the spec's limits plus the VM's overhead (Kata's
sandbox_cgroup_only; vmm/host_cgroup.py): QEMU, the vsock back end and this
process, which moves back out before the cgroup is removed.

A SIGKILLed owner cannot clean up: QEMU dies with it (PR_SET_PDEATHSIG), the
vsock back end with QEMU, the binds with the mount namespace, and the record
lets the client remove the rest (record.clean_up_after).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .. import paths
from ..errors import KataError
from ..timing import mark
from ..protocol.framing import FrameError, encode_frame, read_frame
from ..protocol.schema import SchemaError
from . import record as records
from .containers import Containers, OwnerError
from .pool import Claim
from .owner_protocol import DEFAULT_OUTPUT, MAX_FILE, MAX_FRAME, PROTOCOL_VERSION, check_request, error_reply
from .share import TAG, ContainerShare, enter_private_mount_namespace
from .single import Launch, StatusPipe, bind_into, detach_stdio, run_init

# The 9p tag of a pooled VM's share (kata_py/factory/standby.py), and of a
# one-container sandbox's (the tag an OCI container's create_container names).
POOL_TAG = "rootfs"

log = logging.getLogger("kata_py.owner")

MAX_CONNECTIONS = 64
MAX_IN_FLIGHT = 256             # requests of one connection being handled at once
MAX_WRITE_BUFFER = 64 << 20     # a connection that does not read its replies and events is dropped
CLOSE_TIMEOUT = 5.0
# How long a broken agent connection waits for the VM watcher to report a
# QEMU exit before it ends the sandbox with its own reason.
AGENT_LOST_GRACE = 1.0


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


class Connection:
    def __init__(self, owner: "Owner", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 control: bool) -> None:
        self.owner = owner
        self.reader = reader
        self.writer = writer
        self.control = control
        self.subscribed = False
        self.tasks: set[asyncio.Task] = set()
        self.closed = False

    def send(self, message: dict) -> None:
        """Queue one frame (FrameError if it cannot be one: too large)."""
        frame = encode_frame(message, MAX_FRAME)
        if self.closed or self.writer.is_closing():
            return
        try:
            self.writer.write(frame)
        except (OSError, RuntimeError) as exc:
            log.warning("dropping a message: %s", exc)
            return
        transport = self.writer.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("a client does not read what it is sent: closing its connection")
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    async def serve(self) -> None:
        try:
            while True:
                message = await read_frame(self.reader, MAX_FRAME)
                try:
                    request_id, request_type, args = check_request(message)
                except SchemaError as exc:
                    request_id = message.get("id") if isinstance(message.get("id"), int) else 0
                    self.send(error_reply(request_id, "invalid", str(exc)))
                    continue
                if len(self.tasks) >= MAX_IN_FLIGHT:
                    self.send(error_reply(request_id, "state", "too many requests in flight"))
                    continue
                task = asyncio.ensure_future(self.owner.handle(self, request_id, request_type, args))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except (EOFError, OSError) as exc:
            log.debug("connection closed: %s", exc)
        except FrameError as exc:
            log.warning("a client broke framing: %s", exc)
        finally:
            self.closed = True
            self.writer.close()


class Owner:
    def __init__(self, sandbox_id: str, memory_mib: int, cpus: int, control_fd: int | None = None,
                 claimed: Claim | None = None, launch: Launch | None = None,
                 report: StatusPipe | None = None, exit_report: StatusPipe | None = None) -> None:
        self.id = sandbox_id
        self.launch = launch            # one container's sandbox: what its init is
        self.report = report
        self.exit_report = exit_report  # `run`: the init's status, sent before the teardown
        self.network = None             # the network namespace's attachment (one container's sandbox)
        self.primary: asyncio.Future | None = None
        self.exit_status: int | None = None
        self.claimed = claimed          # a pooled VM (its standby's mount namespace is ours already)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.control_fd = control_fd
        self.dir = records.sandbox_dir(sandbox_id)
        self.socket_path = self.dir / records.SOCKET
        self.export: ContainerShare | None = None
        self.sandbox = None
        self.containers: Containers | None = None
        self.connections: set[Connection] = set()
        self.server: asyncio.base_events.Server | None = None
        self.booted: asyncio.Future | None = None
        self.ending: asyncio.Event | None = None
        self.ended: asyncio.Event | None = None
        self.reason = ""
        self.failed = False
        self.status = "booting"
        self.boot_seconds: float | None = None
        self.created = time.time()

    # -- the record ---------------------------------------------------------------
    def record(self) -> dict:
        sandbox = self.sandbox
        machine = sandbox.machine if sandbox is not None and self.claimed is None else None  # a pooled VM's is its standby's
        transport = sandbox.transport if sandbox is not None else None
        qemu_pid = machine.pid if machine is not None else None
        backend_pid = transport.backend_pid() if transport is not None else None
        vsock = transport.address() if transport is not None else None
        pooled = self.claimed is not None
        standby = {"standby_pid": self.claimed.pid,
                   "standby_start": records.start_time(self.claimed.pid)} if pooled else {}
        return {
            "vm": "pooled" if pooled else "booted", **standby,
            "id": self.id, "protocol": PROTOCOL_VERSION, "status": self.status,
            "run_dir": str(self.dir), "socket": str(self.socket_path), "share_dir": str(self.export.path if self.export is not None else self.dir / records.SHARE),
            # A pooled VM's run directory is its standby's, which removes it.
            "vm_run_dir": None if pooled else str(records.vm_dir(self.id)),
            "owner_pid": os.getpid(), "owner_start": records.start_time(os.getpid()) or 0,
            "qemu_pid": qemu_pid, "qemu_start": records.start_time(qemu_pid) if qemu_pid else None,
            "backend_pid": backend_pid,
            "backend_start": records.start_time(backend_pid) if backend_pid is not None else None,
            "vsock": vsock, "memory_mib": self.memory_mib, "cpus": self.cpus,
            "boot_seconds": self.boot_seconds, "created": self.created,
            "containers": self.containers.infos() if self.containers is not None else [],
        }

    def save(self) -> None:
        if self.status == "stopped":
            return
        try:
            records.write(self.record())
        except OSError as exc:
            log.warning("writing the sandbox record: %s", exc)

    # -- events -------------------------------------------------------------------
    def publish(self, event: dict) -> None:
        log.debug("event %s", event)
        for connection in list(self.connections):
            if connection.subscribed or event["event"] == "gone":
                try:
                    connection.send(event)
                except FrameError as exc:
                    log.error("event not sent: %s", exc)

    # -- life -----------------------------------------------------------------------
    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self.booted = loop.create_future()
        self.ending = asyncio.Event()
        self.ended = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, lambda: None)
        loop.add_signal_handler(signal.SIGTERM, lambda: self.end("the owner received SIGTERM", failed=True))
        # A boot error nobody asked for is not an "exception never retrieved".
        self.booted.add_done_callback(lambda f: f.cancelled() or f.exception())
        boot = None
        try:
            if self.claimed is not None:
                self.export = ContainerShare(self.claimed.share_dir, existing=True)
            else:
                self.export = ContainerShare(self.dir / records.SHARE)
            self.save()
            await self._listen()
            boot = asyncio.ensure_future(self._boot())
            await self.ending.wait()
        except BaseException as exc:
            log.exception("the owner failed")
            self.end(f"the owner failed: {exc!r}", failed=True)
        finally:
            for task in (boot, self.primary):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (boot, self.primary) if t is not None), return_exceptions=True)
            await self._teardown()
        if self.failed or (self.launch is not None and self.exit_status is None):
            return 1
        return self.exit_status if self.exit_status is not None else 0

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.socket_path))
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        sock.listen(16)
        self.server = await asyncio.start_unix_server(self._accept, sock=sock, limit=1 << 16)
        if self.control_fd is not None:
            control = socket.socket(fileno=self.control_fd)
            reader, writer = await asyncio.open_unix_connection(sock=control, limit=1 << 16)
            connection = Connection(self, reader, writer, control=True)
            self.connections.add(connection)

            async def serve_control() -> None:
                await connection.serve()
                self.connections.discard(connection)
                self.end("its client closed the control connection")

            asyncio.ensure_future(serve_control())

    async def _accept(self, reader, writer) -> None:
        if len(self.connections) >= MAX_CONNECTIONS or self.ending.is_set():
            writer.close()
            return
        connection = Connection(self, reader, writer, control=False)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

    async def _boot(self) -> None:
        from ..image import ensure_image
        from ..vmm.host_cgroup import HostLimits
        from .pool import PooledSandbox
        from .sandbox import Sandbox, Share

        started = time.monotonic()
        tag = POOL_TAG if self.claimed is not None or self.launch is not None else TAG
        try:
            if self.launch is not None:
                bind_into(self.export, self.launch)
            if self.claimed is not None:
                self.sandbox = PooledSandbox(self.claimed)
            else:
                nics = []
                if self.launch is not None:
                    from ..network import attach_container

                    self.network = await attach_container(self.launch.network_config, Path(self.launch.state_dir))
                    nics = self.network.nics
                cgroups_path = self.launch.cgroups_path if self.launch is not None else None
                limits = HostLimits.from_resources(self.launch.host_resources) if cgroups_path else None
                self.sandbox = Sandbox(ensure_image(progress=False), memory_mib=self.memory_mib, cpus=self.cpus,
                                       run_dir=records.vm_dir(self.id), shares=[Share(tag, self.export.path)],
                                       name=self.launch.name if self.launch else f"kata-py-sb-{self.id}",
                                       qmp_socket=self.launch is not None, nics=nics,
                                       host_cgroup=cgroups_path, host_limits=limits)
            await self.sandbox.start()
            if self.claimed is None and self.sandbox.host_cgroup is not None:
                # This process serves the sandbox for its whole life: it is
                # accounted with it (moved out again before the cgroup goes).
                self.sandbox.adopt_host_process(os.getpid())
            if self.network is not None:
                from ..network import configure_guest

                await configure_guest(self.network, self.sandbox.agent)
            self.boot_seconds = round(time.monotonic() - started, 3)
            self.containers = Containers(self.sandbox, self.export, self.publish, self._agent_lost, self.save,
                                         mount_tag=tag)
            self.status = "running"
            self.save()
        except asyncio.CancelledError:
            self.booted.cancel()
            raise
        except BaseException as exc:
            log.error("boot failed: %s", exc)
            # kata-py create reports the error itself, as it always has (a
            # bind source that cannot be shared, a network it cannot carry).
            reason = (str(exc) if self.launch is not None and isinstance(exc, KataError)
                      else f"the sandbox's VM did not boot: {exc}")
            self.booted.set_exception(OwnerError("failed", reason))
            self.end(reason, failed=True)
            return
        self.booted.set_result(None)
        log.info("sandbox %s up in %.2f s (%s VM)", self.id, self.boot_seconds,
                 "pooled" if self.claimed is not None else "booted")
        asyncio.ensure_future(self._watch_vm())
        if self.launch is not None:
            self.primary = asyncio.ensure_future(self._run_init())

    async def _run_init(self) -> None:
        """One container's sandbox: its init, from creation to exit."""
        try:
            self.exit_status = await run_init(self.sandbox, self.launch, self.report)
        except asyncio.CancelledError:
            raise
        except KataError as exc:
            self.end(str(exc), failed=True)
            return
        except Exception as exc:
            log.exception("the container's init failed")
            self.end(repr(exc), failed=True)
            return
        if self.exit_report is not None and not self.exit_report.sent:
            # `run` returns this status now; the teardown goes on here. The
            # caller's stdio is let go too (the init's output is all relayed),
            # so that whoever reads `run`'s output sees its end with `run`'s exit.
            self.exit_report.send("exit", self.exit_status)
            detach_stdio()
        self.end(f"its container's init exited ({describe_exit(self.exit_status)})")

    async def _watch_vm(self) -> None:
        if self.claimed is not None:
            await self._watch_standby(self.claimed.pid)
            return
        code = await self.sandbox.machine.process.wait()
        if not self.ending.is_set():
            self.end(f"the sandbox's VM exited unexpectedly (QEMU {describe_exit(code)})", failed=True)

    async def _watch_standby(self, pid: int) -> None:
        """A pooled VM's standby exits when its VM does (or is killed, which kills the VM)."""
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            gone = loop.create_future()
            loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
            try:
                await gone
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        if not self.ending.is_set():
            self.end("the sandbox's pooled VM ended unexpectedly (its standby exited)", failed=True)

    def _agent_lost(self, reason: str) -> None:
        if self.ending.is_set():
            return
        # A killed or crashed QEMU breaks the agent's connection too, and the
        # broken connection is often seen first: the VM's own watcher gets a
        # moment to say what really happened (the first reason stands).
        asyncio.get_running_loop().call_later(AGENT_LOST_GRACE, self.end, reason, True)

    def end(self, reason: str, failed: bool = False) -> None:
        """Begin ending the sandbox (once; the first reason stands)."""
        if self.ending.is_set():
            return
        log.info("ending: %s", reason)
        self.reason = reason
        self.failed = failed
        self.ending.set()

    async def _teardown(self) -> None:
        self.status = "stopping"
        self.save()
        if self.containers is not None:
            self.containers.closing = True
        if self.server is not None:
            self.server.close()
        if self.sandbox is not None:
            try:
                await self.sandbox.stop()       # agent shutdown, QEMU's ladder, back end, VM run dir
            except Exception as exc:
                log.error("stopping the VM: %s", exc)
        elif self.claimed is not None:          # ended before its handle was made: let go of the claim
            await asyncio.get_running_loop().run_in_executor(None, self.claimed.release)
        if self.network is not None:
            from ..network import detach_container

            await detach_container(self.network)
        if self.export is not None:
            # The binds (ours to undo here), then the directory (a pooled VM's
            # standby removed its own already, unless it had to be killed).
            self.export.close()
        self.status = "stopped"
        for path in (self.dir / records.RECORD, self.socket_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.publish({"event": "gone", "reason": self.reason, "time": time.time()})
        self.ended.set()                        # shutdown requests reply now
        await asyncio.sleep(0)
        for connection in list(self.connections):
            connection.close()
        for connection in list(self.connections):
            try:
                await asyncio.wait_for(connection.writer.wait_closed(), CLOSE_TIMEOUT)
            except (asyncio.TimeoutError, OSError):
                pass
        try:
            (self.dir / records.LOG).unlink()
        except FileNotFoundError:
            pass
        try:
            self.dir.rmdir()
        except OSError as exc:
            log.warning("run directory left: %s", exc)

    # -- requests -------------------------------------------------------------------
    async def handle(self, connection: Connection, request_id: int, request_type: str, args: dict) -> None:
        try:
            handler = getattr(self, "rpc_" + request_type)
            result = await handler(connection, args)
            reply = {"id": request_id, "ok": True, "result": result}
        except OwnerError as exc:
            reply = error_reply(request_id, exc.code, str(exc))
        except KataError as exc:
            reply = error_reply(request_id, "failed", str(exc))
        except asyncio.CancelledError:
            reply = error_reply(request_id, "gone", self.reason or "the sandbox is ending")
        except Exception as exc:     # a bug must not take the sandbox down
            log.exception("%s failed", request_type)
            reply = error_reply(request_id, "internal", repr(exc))
        try:
            connection.send(reply)
        except FrameError as exc:
            connection.send(error_reply(request_id, "internal", f"the reply cannot be sent: {exc}"))

    async def _ready(self) -> Containers:
        """The containers table once the VM is up; the boot's error, or `gone`."""
        if self.ending.is_set():
            raise OwnerError("gone", self.reason)
        await asyncio.shield(self.booted)
        if self.ending.is_set():
            raise OwnerError("gone", self.reason)
        return self.containers

    async def rpc_ready(self, connection: Connection, args: dict) -> dict:
        await self._ready()
        return self.record()

    async def rpc_info(self, connection: Connection, args: dict) -> dict:
        return self.record()

    async def rpc_subscribe(self, connection: Connection, args: dict) -> dict:
        connection.subscribed = True
        return {}

    async def rpc_shutdown(self, connection: Connection, args: dict) -> dict:
        self.end("shutdown requested")
        await self.ended.wait()
        return {}

    async def rpc_create_container(self, connection: Connection, args: dict) -> dict:
        _check_process(args)
        _check_mounts(args)
        _check_rootfs(args["rootfs"])
        containers = await self._ready()
        container = await containers.create(args)
        return {"pid": container.init.pid}

    async def rpc_start(self, connection: Connection, args: dict) -> dict:
        containers = await self._ready()
        return {"pid": await containers.start(args["name"])}

    async def rpc_exec(self, connection: Connection, args: dict) -> dict:
        _check_process(args)
        containers = await self._ready()
        return await containers.exec(args)

    async def rpc_exec_stream(self, connection: Connection, args: dict) -> dict:
        _check_process(args)
        if len(set(args.get("streams", []))) != len(args.get("streams", [])):
            raise OwnerError("invalid", "a stream is named twice")
        containers = await self._ready()
        return await containers.exec_stream(args)

    async def rpc_start_process(self, connection: Connection, args: dict) -> dict:
        containers = await self._ready()
        return {"pid": await containers.start_process(args["name"], args["process_id"])}

    async def rpc_signal(self, connection: Connection, args: dict) -> dict:
        containers = await self._ready()
        await containers.signal(args["name"], args.get("process_id"), args["signal"])
        return {}

    async def rpc_wait(self, connection: Connection, args: dict) -> dict:
        containers = await self._ready()
        return await containers.wait(args["name"], args.get("process_id"), args.get("timeout"))

    async def rpc_delete_container(self, connection: Connection, args: dict) -> dict:
        containers = await self._ready()
        await containers.delete(args["name"])
        return {}

    async def rpc_put_file(self, connection: Connection, args: dict) -> dict:
        data = _unbase64(args["data"], "data")
        containers = await self._ready()
        await containers.put_file(args["name"], args["path"], data, args.get("mode", 0o644),
                                  bool(args.get("parents", True)))
        return {}

    async def rpc_get_file(self, connection: Connection, args: dict) -> dict:
        containers = await self._ready()
        data = await containers.get_file(args["name"], args["path"], args.get("max_size", MAX_FILE))
        return {"data": binascii.b2a_base64(data, newline=False).decode("ascii"), "size": len(data)}

    async def rpc_run(self, connection: Connection, args: dict) -> dict:
        _check_process(args)
        _check_mounts(args)
        _check_rootfs(args["rootfs"])
        containers = await self._ready()
        return await containers.run(args)


def _unbase64(text: str, what: str) -> bytes:
    try:
        return binascii.a2b_base64(text)
    except (binascii.Error, ValueError) as exc:
        raise OwnerError("invalid", f"{what} is not base64: {exc}") from None


def _check_process(args: dict) -> None:
    if "stdin" in args:
        _unbase64(args["stdin"], "stdin")
    for item in args.get("env", []):
        if "=" not in item or item.startswith("="):
            raise OwnerError("invalid", f"environment entry {item[:64]!r} is not KEY=VALUE")
    if any("\0" in a for a in args["args"]):
        raise OwnerError("invalid", "an argument holds a NUL byte")
    args.setdefault("max_output", DEFAULT_OUTPUT)


def _check_mounts(args: dict) -> None:
    """Filesystem mounts only: a bind's source would be a path of the guest's
    own (the agent's files), not a host path, which needs the export."""
    for index, mount in enumerate(args.get("mounts", [])):
        options = mount.get("options", [])
        if mount.get("type") == "bind" or "bind" in options or "rbind" in options:
            raise OwnerError("invalid", f"/args/mounts/{index}: bind mounts are not supported here")


def _check_rootfs(path: str) -> None:
    if not os.path.isdir(path):
        raise OwnerError("invalid", f"rootfs {path}: not a directory")
    if os.path.realpath(path) == "/":
        raise OwnerError("invalid", "the host's / cannot be a container's rootfs")


def _setup_logging(log_path: Path, level: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    # From here on a traceback lands in the log, not on the client's terminal.
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level),
                        format="%(asctime)s owner %(levelname)s %(name)s: %(message)s")


def _claim(memory_mib: int, cpus: int) -> Claim | None:
    """A pooled VM of at least this size, its standby's mount namespace
    entered; None (boot one) when no factory runs or none fits."""
    from .pool import claim

    claimed = claim(memory_mib, cpus)
    if claimed is None:
        log.info("no pooled VM fits: booting one")
        return None
    try:
        claimed.enter_mount_namespace()
    except OSError as exc:
        log.warning("cannot join the mount namespace of standby %d (%s): booting a VM instead", claimed.pid, exc)
        claimed.release()
        return None
    log.info("using pooled VM of standby %d", claimed.pid)
    mark("vm_claimed")
    return claimed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kata-py-sandbox-owner")
    parser.add_argument("--id", required=True, help="the sandbox's id ([A-Za-z0-9_.-], at most 32)")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--control-fd", type=int, default=None,
                        help="a connected socket: the sandbox ends when it closes")
    parser.add_argument("--pool", action="store_true",
                        help="claim a pooled VM of at least this size when a VM factory runs; boot one otherwise")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    one = parser.add_argument_group("one container's sandbox (kata-py create)")
    one.add_argument("--container", metavar="FILE", help="what the container is (single.Launch; removed once read)")
    one.add_argument("--status-fd", type=int, default=-1, help="where the one-line report goes")
    one.add_argument("--go-fd", type=int, default=-1,
                     help="wait for 'go' on this fd first (create runs the prestart hooks meanwhile)")
    one.add_argument("--exit-fd", type=int, default=-1,
                     help="report 'exit N' here when the init exits, before the VM is torn down (kata-py run)")
    one.add_argument("--log", help="the CLI's --log file (else nowhere: stderr is the container's)")
    one.add_argument("--log-format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    if not all(c.isalnum() or c in "_.-" for c in args.id) or not 0 < len(args.id) <= 32:
        parser.error(f"--id {args.id!r}: letters, digits, _ . - only, at most 32")
    if not 1 <= args.cpus <= 64 or not 96 <= args.memory_mib <= 1 << 20:
        parser.error("--cpus must be 1..64 and --memory-mib 96..1048576")
    if args.container:
        sys.exit(_main_one_container(args))
    directory = records.sandbox_dir(args.id)
    paths.ensure_private_dir(directory.parent)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        parser.error(f"sandbox {args.id} exists already ({directory})")
    _setup_logging(directory / records.LOG, args.log_level)
    claimed = _claim(args.memory_mib, args.cpus) if args.pool else None
    try:
        # Before any thread exists (unshare(CLONE_NEWNS) and setns(CLONE_NEWNS)
        # are refused to a threaded process).
        if claimed is None:
            enter_private_mount_namespace()
    except OSError as exc:
        log.error("cannot make a mount namespace: %s", exc)
        (directory / records.LOG).unlink()
        directory.rmdir()
        sys.exit(1)
    status = asyncio.run(Owner(args.id, args.memory_mib, args.cpus, args.control_fd, claimed).main())
    sys.exit(status)


def _main_one_container(args) -> int:
    """kata-py create's owner: its stdio is the container's; errors go to
    the status pipe (and the CLI's --log), the exit status is the init's."""
    from ..logformat import log_to_runtime_log
    from .single import wait_for_go

    log_to_runtime_log(args.log, args.log_format, "owner")
    report = StatusPipe(args.status_fd)
    if args.exit_fd >= 0:
        os.set_inheritable(args.exit_fd, False)  # a child holding it would hold `run` until it exits
    mark("owner_started")
    directory = records.sandbox_dir(args.id)
    made = False
    error = None
    status = 1
    try:
        launch = Launch.read(args.container)
        if launch.terminal:
            detach_stdio()
        if args.go_fd >= 0:
            wait_for_go(args.go_fd)
        paths.ensure_private_dir(directory.parent)
        records.remove_leftovers(directory)  # of an earlier container of the same (root, id), killed
        directory.mkdir(mode=0o700)
        made = True
        # Before any thread exists: the export's binds live and die with this
        # process and its QEMU, or with the standby of a pooled VM, whose
        # mount namespace this joins.
        claimed = _claim(args.memory_mib, args.cpus) if args.pool else None
        if claimed is None:
            enter_private_mount_namespace()
        owner = Owner(args.id, args.memory_mib, args.cpus, claimed=claimed, launch=launch, report=report,
                      exit_report=StatusPipe(args.exit_fd) if args.exit_fd >= 0 else None)
        status = asyncio.run(owner.main())
        error = owner.reason or "the sandbox ended before its container was created"
    except KataError as exc:
        log.error("%s", exc)
        error = str(exc)
    except BaseException as exc:
        log.exception("the owner failed")
        error = repr(exc)
    finally:
        # Everything is removed before a failure is reported: `create` kills
        # this process as soon as it reads the report.
        if made:
            records.remove_leftovers(directory)
        if not report.sent:
            report.send("error", error or "the owner failed")
    return status


if __name__ == "__main__":
    main()
