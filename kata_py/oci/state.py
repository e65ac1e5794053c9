"""The container state store under --root, and the status rules.

One directory per container: `state.json` (written atomically), `lock`
(flock held for every change). The status written there is only a claim:
on load it is checked against reality (is the sandbox owner process still the
same live process?), and a dead owner means the container has stopped.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, KataError

# \Z, not $: "$" also matches before a trailing newline, which would let "c1\n" through.
ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
MAX_ID = 255  # the id is a directory name under --root: NAME_MAX


# The messages below are runc's, word for word: containerd's runc shim, conmon
# and CRI-O decide what an error means by matching on them ("does not exist",
# "container not running", ...), so a different wording turns a harmless case
# (killing a container that already exited) into a failure they retry forever.


class ContainerNotFound(KataError):
    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        super().__init__("container does not exist")


class ContainerExists(KataError):
    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        super().__init__("container with given ID already exists")


class ContainerBusy(KataError):
    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        super().__init__(f"container {container_id!r} is locked by another operation")


def status_wording(operation: str, container_id: str, status: "Status") -> str:
    """runc's message for `operation` refused in `status` (runc 1.1)."""
    if operation == "start":
        if status is Status.RUNNING:
            return "cannot start an already running container"
        if status is Status.STOPPED:
            return "cannot start a container that has stopped"
        return f"cannot start a container in the {status.value} state"
    if operation == "delete":
        return f"cannot delete container {container_id} that is not stopped: {status.value}"
    if operation == "exec in":
        if status is Status.PAUSED:
            return "cannot exec in a paused container (use --ignore-paused to override)"
        return f"cannot exec in a {status.value} container"
    if operation == "resume":
        return "container not paused"
    if operation == "read stats of":
        return f"container with id {container_id} is not running"
    return "container not running"      # kill, pause, update, ...


class StatusError(KataError):
    """The operation is not allowed in the container's current status."""

    def __init__(self, container_id: str, operation: str, status: "Status") -> None:
        self.container_id = container_id
        self.operation = operation
        self.status = status
        super().__init__(status_wording(operation, container_id, status))


class Status(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    # The rules of the runtime spec (runtime.md "Lifecycle" / "Operations"),
    # plus runc's: a created container can be deleted without --force.
    def can_start(self) -> bool:
        return self is Status.CREATED

    def can_kill(self) -> bool:
        return self in (Status.CREATED, Status.RUNNING, Status.PAUSED)

    def can_delete(self) -> bool:
        return self in (Status.CREATED, Status.STOPPED)

    def can_exec(self) -> bool:
        # runc, too, execs into a created container: its namespaces exist.
        return self in (Status.CREATED, Status.RUNNING)

    def can_pause(self) -> bool:
        return self is Status.RUNNING

    def can_resume(self) -> bool:
        return self is Status.PAUSED


def validate_id(container_id: str) -> str:
    if not container_id:
        raise ConfigError("container id must not be empty")
    if len(container_id) > MAX_ID:
        raise ConfigError(f"invalid container id {container_id[:80]!r}...: longer than {MAX_ID} characters")
    if not ID_PATTERN.match(container_id) or container_id in (".", ".."):
        raise ConfigError(f"invalid container id {container_id[:80]!r}: use letters, digits and _ . + - "
                          "(not starting with a symbol)")
    return container_id


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a live process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_time: int | None) -> bool:
    if not pid:
        return False
    current = process_start_time(pid)
    if current is None:
        return False
    if start_time is not None and current != start_time:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class ContainerState:
    id: str
    bundle: str
    rootfs: str
    status: str = Status.CREATING.value
    pid: int = 0                     # the container's sandbox owner process
    pid_start_time: int | None = None
    created: str = field(default_factory=now_rfc3339)
    owner: str = ""
    annotations: dict = field(default_factory=dict)
    run_dir: str = ""                # the sandbox's run directory (sockets, logs)
    vsock: dict = field(default_factory=dict)     # how to reach the agent: {"uds": path} or {"cid": n}
    init_process: str = ""           # the init process's id in the agent
    terminal: bool = False
    exit_status: int | None = None
    config_hooks: dict = field(default_factory=dict)
    no_pivot: bool = False           # create --no-pivot: MS_MOVE + chroot instead of pivot_root

    def live_status(self) -> Status:
        status = Status(self.status)
        if status is Status.STOPPED:
            return status
        if status is Status.CREATING:
            return Status.CREATING if pid_alive(self.pid, self.pid_start_time) or not self.pid else Status.STOPPED
        return status if pid_alive(self.pid, self.pid_start_time) else Status.STOPPED

    def require(self, operation: str, allowed) -> Status:
        """The live status, if `allowed(status)` (a Status rule); else StatusError."""
        status = self.live_status()
        if not allowed(status):
            raise StatusError(self.id, operation, status)
        return status

    def oci_state(self) -> dict:
        status = self.live_status()
        state = {"ociVersion": "1.0.2", "id": self.id, "status": status.value,
                 "pid": self.pid if status is not Status.STOPPED else 0,
                 "bundle": self.bundle, "rootfs": self.rootfs, "created": self.created, "owner": self.owner}
        if self.annotations:
            state["annotations"] = self.annotations
        return state


class StateStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def dir(self, container_id: str) -> Path:
        return self.root / validate_id(container_id)

    def ensure_root(self) -> None:
        """The state root, 0700 (as runc's): it names every container and holds
        their state and locks. An existing root of ours that is looser is tightened."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.root.stat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(self.root, 0o700)

    @contextmanager
    def lock(self, container_id: str, create: bool = False, wait: bool = True):
        """Hold the container's flock. With create, make its directory first
        (refusing an existing one); the directory is removed again if the
        block fails before anything was saved. Without wait, a lock held
        elsewhere raises ContainerBusy."""
        directory = self.dir(container_id)
        made = False
        if create:
            self.ensure_root()
            try:
                directory.mkdir(mode=0o700)
                made = True
            except FileExistsError:
                raise ContainerExists(container_id) from None
        elif not directory.is_dir():
            raise ContainerNotFound(container_id)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise ContainerNotFound(container_id) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ContainerBusy(container_id) from None
            yield directory
        except BaseException:
            if made and not (directory / "state.json").exists():
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            os.close(fd)

    @contextmanager
    def locked(self, container_id: str):
        """The container's state, loaded under its lock."""
        with self.lock(container_id):
            yield self.load(container_id)

    def load(self, container_id: str) -> ContainerState:
        path = self.dir(container_id) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ContainerNotFound(container_id) from None
        except (OSError, ValueError) as exc:
            raise KataError(f"state of container {container_id!r} is unreadable: {exc}") from None
        known = {k: v for k, v in data.items() if k in ContainerState.__dataclass_fields__}
        return ContainerState(**known)

    def save(self, state: ContainerState) -> None:
        self.prepare(state)()

    def prepare(self, state: ContainerState):
        """Write `state` beside the current one; return the commit (a rename,
        which needs no room). An operation that prepares before it acts fails
        on a full disk before it has changed anything, so the state on disk
        never disagrees with what was done."""
        directory = self.dir(state.id)
        tmp = directory / "state.json.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(state), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KataError(f"cannot record the state of container {state.id!r}: {exc.strerror}") from None

        def commit() -> None:
            try:
                os.replace(tmp, directory / "state.json")
            except OSError as exc:
                raise KataError(f"cannot record the state of container {state.id!r}: {exc.strerror}") from None
        return commit

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.dir(container_id), ignore_errors=True)

    def list_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if ID_PATTERN.match(p.name) and (p / "state.json").is_file())
