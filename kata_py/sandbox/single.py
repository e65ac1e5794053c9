"""A sandbox that lives and dies with one container: the OCI CLI's shape.

`kata-py create` computes everything the guest needs from the bundle (the
agent's create_container and create_process arguments, the bind sources to
export, the createContainer hooks) and starts the sandbox owner with it as a
JSON file (`--container FILE`, a `Launch`), with its stdio as the
container's and inside the container's network namespace. The owner boots
the VM (or claims a pooled one), binds the rootfs and the bind sources into
its export under the names the CLI chose, creates the container and
prepares its init, runs the createContainer hooks, and reports to `create`
on a status pipe: one line "ok <json>" (the VM's run directory and vsock
address, the init's process id and guest pid) or "error <message>". The init
is held before exec until `kata-py start`. When it exits the sandbox ends,
and the owner exits with its status (128+N when killed by signal N), so that
a subreaper (conmon, containerd's runc shim) reaps the container's status
from the pid in --pid-file, which is the owner's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from .console import HostConsole
from .guest_hooks import run_guest_hooks
from .handle import SandboxHandle
from .process import ProcessSession
from .share import ContainerShare

ROOTFS_ENTRY = "rootfs"     # the container's rootfs in the export (create_container's rootfs_path)
INIT_PROCESS = "init"       # the init's process id in the agent
MAX_LAUNCH = 4 << 20


@dataclass
class Launch:
    agent_id: str                   # the container's id in the agent
    create: dict                    # create_container arguments
    process: dict                   # create_process arguments of the init (argv, env, cwd, user, security, rows, cols)
    rootfs: str                     # host path, exported as ROOTFS_ENTRY
    binds: list = field(default_factory=list)   # [{"source", "name", "readonly", "recursive"}]
    terminal: bool = False
    console_socket: str | None = None
    hooks: list = field(default_factory=list)   # createContainer
    hook_state: dict = field(default_factory=dict)
    network_config: dict = field(default_factory=dict)  # the spec, for the network layer
    state_dir: str = ""             # where the network layer keeps its record
    name: str = "kata-py"           # the VM's name (QEMU -name; seen in ps)
    # The spec's linux.cgroupsPath and linux.resources: the sandbox's host
    # processes (QEMU, back end, owner) live in that cgroup, under those
    # limits plus the VM's overhead; None: QEMU gets a cgroup of its own.
    cgroups_path: str | None = None
    host_resources: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: str) -> "Launch":
        """The file `create` wrote (this process's to remove)."""
        try:
            return cls(**read_once(path))
        except TypeError as exc:
            raise ConfigError(f"container launch file {path}: {exc}") from exc

    def write(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.__dict__, f)


def read_once(path: str) -> dict:
    """A JSON object the CLI wrote for this process (at most MAX_LAUNCH
    bytes), removed once read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LAUNCH + 1)
        os.unlink(path)
        data = json.loads(raw)
        if len(raw) > MAX_LAUNCH or not isinstance(data, dict):
            raise ValueError("not a JSON object of at most 4 MiB")
        return data
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


class PlannedShare:
    """Stands for the export while `create` computes the guest's arguments:
    records each bind source and the entry name it will have, which the
    owner then binds in the same order (ContainerShare's naming)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix        # several containers share one export (a pod's VM)
        self.binds: list[dict] = []

    def add(self, source: str, readonly: bool = False, recursive: bool = True) -> str:
        name = f"{self.prefix}m{len(self.binds)}"
        self.binds.append({"source": source, "name": name, "readonly": readonly, "recursive": recursive})
        return name


class StatusPipe:
    """The owner's one report to `create`: "ok <json>" or "error <message>"."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def sent(self) -> bool:
        return self.fd < 0

    def send(self, kind: str, payload) -> None:
        if self.fd < 0:
            return
        line = f"{kind} {json.dumps(payload)}\n".encode()
        try:
            os.write(self.fd, line)
        except OSError:
            pass        # create is gone: it kills this process anyway
        finally:
            os.close(self.fd)
            self.fd = -1


def stdio_of(console: HostConsole | None) -> dict:
    """The guest process's stdio on this side: the pty's slave, or this
    process's own stdio (the caller's: podman's conmon pipes, a shim's FIFOs)."""
    if console is not None:
        return {"stdin_fd": console.slave, "stdout_fd": console.slave, "stderr_fd": None, "tty": True}
    return {"stdin_fd": 0, "stdout_fd": 1, "stderr_fd": 2}


def bind_into(export: ContainerShare, launch: Launch) -> None:
    export.add(launch.rootfs, name=ROOTFS_ENTRY, exist_ok=True)
    for bind in launch.binds:
        name = export.add(bind["source"], readonly=bool(bind["readonly"]), recursive=bool(bind["recursive"]),
                          name=bind["name"])
        if name != bind["name"]:
            raise ConfigError(f"bind {bind['source']}: exported as {name}, not {bind['name']}")


def console_session(handle: SandboxHandle, spec: dict, agent_id: str, terminal: bool,
                    console_socket: str | None, **kwargs) -> tuple[ProcessSession, HostConsole | None]:
    """A session for `spec` (create_process arguments) whose stdio is this
    process's own, or with a terminal a new host pty, its master sent to
    `console_socket` (the caller's terminal size is the process's)."""
    console = None
    if terminal:
        if not console_socket:
            raise ConfigError("a process with a terminal needs --console-socket")
        console = HostConsole()
        try:
            console.send_master(console_socket)
        except BaseException:
            console.close()
            raise
        rows, cols = console.size()
        spec = dict(spec)
        spec.setdefault("rows", rows)
        spec.setdefault("cols", cols)
    session = ProcessSession(handle, spec["argv"], env=spec["env"], cwd=spec["cwd"], user=spec["user"],
                             security=spec["security"], rows=spec.get("rows", 0), cols=spec.get("cols", 0),
                             container_id=agent_id, **stdio_of(console), **kwargs)
    return session, console


async def relay_to_end(session: ProcessSession, console: HostConsole | None) -> int:
    """Relay the started process's stdio, and this process's signals and
    window size, until it exits; its exit status."""
    if console is not None:
        console.attach_session(session)
    session.forward_signals()
    return await session.relay_and_wait()


async def run_init(sandbox: SandboxHandle, launch: Launch, report: StatusPipe) -> int:
    """Create the container and its init, report, then relay the init's stdio
    until it exits; its exit status."""
    await sandbox.agent.request("create_container", launch.create)
    session, console = console_session(sandbox, launch.process, launch.agent_id, launch.terminal,
                                       launch.console_socket, init=True, process_id=INIT_PROCESS)
    try:
        await session.create()
        guest_pid = await session.prepare()
        # The container's namespaces exist now (its init waits at the barrier).
        await run_guest_hooks(sandbox, launch.agent_id, "createContainer", launch.hooks,
                              dict(launch.hook_state, pid=os.getpid()))
        report.send("ok", {"run_dir": str(sandbox.run_dir), "vsock": sandbox.transport.address(),
                           "init_process": session.process_id, "guest_pid": guest_pid})
        return await relay_to_end(session, console)
    finally:
        if console is not None:
            console.close()


def detach_stdio() -> None:
    """With a terminal the container's stdio is the pty: the owner keeps
    none of its caller's. containerd's runc shim reads `create`'s output
    through a pipe until end of file, so holding that pipe for the
    container's life would hang the shim (`docker run -it`). runc's init,
    too, holds only the pty."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def wait_for_go(fd: int) -> None:
    """`create` says go once the prestart hooks ran; end of file means they
    failed (or create died): there is nothing to build."""
    from ..errors import KataError

    with os.fdopen(fd, "rb") as pipe:
        word = pipe.readline(16)
    if word != b"go\n":
        raise KataError("create did not finish its prestart hooks")


