"""A process forked ahead of time for a container's first process.

The agent forks every container process from itself, so no container pays
Python's start-up in the guest; what the first one still pays is the fork
of the agent (page tables and all, under TCG ~20 ms) on the way from
`create` to the process held at its barrier. A VM waiting in the pool has
nothing else to do, so the agent forks that process while it waits: into a
new pid namespace (it becomes the container's pid 1), holding nothing of
the agent's but the end of a socket pair, and blocked on it.

When a container's first process is launched and the pre-forked one fits
(it makes its own pid namespace, joins none and has no user namespace), the
agent records the pre-forked pid and sends it a recipe: the container's
create arguments, its compiled seccomp filter and the process's own
arguments, as JSON, with stdio and the child's ends of spawn's pipes as
SCM_RIGHTS. The pre-forked process rebuilds the container and process
from them with the agent's own code and goes on exactly as a freshly forked
child would (spawn._child): set-up, barrier, exec. Anything else (or a
pre-forked process that is gone) forks as before. One at a time: it is
forked again once no container is left (a pooled VM's warm-up container is
deleted before the VM is offered).
"""

from __future__ import annotations

import array
import gc
import json
import os
import socket
import struct
import threading

from .pid1 import log
from .spawn import HandoverFailed
from .syscalls import CLONE_NEWPID

_HEADER = struct.Struct("!I")       # the recipe's length, sent with the fds
MAX_RECIPE = 4 << 20
MAX_FDS = 5                         # stdin, stdout, stderr, status, barrier


class Zygote:
    """The agent's side: arm() in a thread of its own, then take() once."""

    def __init__(self, containers, enabled: bool = True) -> None:
        self.containers = containers
        self.enabled = enabled
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self._arming = False

    def arm_in_background(self) -> None:
        """Arm in a thread of its own, unless armed (or arming) already."""
        with self.lock:
            if not self.enabled or self.pid is not None or self._arming:
                return
            self._arming = True
        threading.Thread(target=self.arm, daemon=True).start()

    def rearm_when_idle(self) -> None:
        """After a container is deleted: when none is left (a pooled VM after
        its warm-up container, or a sandbox between containers), arm again."""
        with self.containers.lock:
            idle = not self.containers.by_id
        if idle:
            self.arm_in_background()

    def arm(self) -> None:
        """Fork the process (in the calling thread, which must be one of its
        own: its children stay in the new pid namespace afterwards)."""
        try:
            self._fork()
        finally:
            with self.lock:
                self._arming = False

    def _fork(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.containers.sys.unshare(CLONE_NEWPID)
        except OSError as exc:
            log(f"pre-fork: no pid namespace: {exc}")
            ours.close()
            theirs.close()
            return
        pid = os.fork()
        if pid == 0:
            _wait_for_work(theirs.fileno(), self.containers)     # never returns
        theirs.close()
        with self.lock:
            self.pid, self.sock = pid, ours
        log(f"pre-forked pid {pid} for a container's first process")

    def take(self, container, proc) -> "Handover | None":
        """The pre-forked process for this container's first process, if it
        fits; None otherwise (fork as usual)."""
        if container.join or container.user_namespace or "pid" not in container.namespaces:
            return None
        with self.lock:
            if self.pid is None:
                return None
            pid, sock, self.pid, self.sock = self.pid, self.sock, None, None
        log(f"container {container.id}: its first process is the pre-forked pid {pid}")
        return Handover(pid, sock, _recipe(container, proc))

    def close(self) -> None:
        with self.lock:
            sock, self.pid, self.sock = self.sock, None, None
        if sock is not None:
            sock.close()    # it exits on end of file


class Handover:
    """spawn()'s `via`: the pre-forked pid, and how to hand it the work."""

    def __init__(self, pid: int, sock: socket.socket, recipe: bytes) -> None:
        self.pid = pid
        self._sock = sock
        self._recipe = recipe

    def hand(self, stdio: tuple[int, int, int], status_w: int, barrier_r: int | None) -> None:
        fds = [*stdio, status_w] + ([barrier_r] if barrier_r is not None else [])
        try:
            self._sock.sendmsg([_HEADER.pack(len(self._recipe))],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            self._sock.sendall(self._recipe)
        except OSError as exc:
            raise HandoverFailed(exc.errno or 0, f"the pre-forked process is gone: {exc.strerror}") from None
        finally:
            self._sock.close()


def _recipe(container, proc) -> bytes:
    seccomp = container.seccomp
    return json.dumps({
        "container": {"id": container.id, "share": container.share, "mount_tag": container.mount_tag,
                      "spec": container.spec},
        "seccomp": None if seccomp is None else {"program": seccomp.program.hex(), "flags": seccomp.flags},
        "process": {"id": proc.id, "argv": proc.argv, "env": proc.env, "cwd": proc.cwd, "tty": proc.tty,
                    "user": proc.user, "security": proc.security},
    }).encode()


# -- in the pre-forked process ----------------------------------------------------
def _wait_for_work(fd: int, containers) -> None:
    """Hold nothing of the agent's, wait for a recipe, then become the child."""
    status_w = None
    try:
        # Nothing it inherited is collected or closed behind its back: the
        # agent's objects here refer to descriptors closed just below, whose
        # numbers the received ones may take.
        gc.disable()
        os.closerange(3, fd)
        os.closerange(fd + 1, 1 << 16)
        header, fds = _receive(fd)
        if header is None:
            os._exit(0)     # the agent closed its end: not needed
        (length,) = _HEADER.unpack(header)
        if length > MAX_RECIPE or len(fds) not in (4, 5):
            os._exit(1)
        recipe = json.loads(_read_exactly(fd, length))
        stdio, status_w = tuple(fds[:3]), fds[3]
        barrier_r = fds[4] if len(fds) == 5 else None
        os.close(fd)
        _become(containers, recipe, stdio, status_w, barrier_r)
    except BaseException:
        if status_w is not None:
            from .spawn import _report

            _report(status_w, 0, "pre-forked process")
    finally:
        os._exit(127)


def _receive(fd: int) -> tuple[bytes | None, list[int]]:
    sock = socket.socket(fileno=fd)
    try:
        # Close-on-exec, as spawn's own pipes are: the program it execs must
        # not hold the status pipe open (its end of file says the exec worked).
        data, ancillary, _, _ = sock.recvmsg(_HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    finally:
        sock.detach()
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if len(data) < _HEADER.size:
        return None, list(fds)
    return data, list(fds)


def _read_exactly(fd: int, length: int) -> bytes:
    chunks, left = [], length
    while left:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            raise EOFError("the recipe was cut short")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _become(containers, recipe: dict, stdio, status_w: int, barrier_r: int | None) -> None:
    """Rebuild the container and the process as the agent made them, and run
    the child's part of spawn() with them."""
    from .container import Container
    from .processes import Process, _env_dict, _finalizer, _then
    from .seccomp import Filter
    from .spawn import _child

    made = recipe["container"]
    container = Container(made["id"], made["share"], made["spec"])
    container.mount_tag = made["mount_tag"]
    if recipe["seccomp"] is not None:
        container.seccomp = Filter(bytes.fromhex(recipe["seccomp"]["program"]), recipe["seccomp"]["flags"])
    wanted = recipe["process"]
    proc = Process(wanted["id"], wanted["argv"], wanted["env"], wanted["cwd"], wanted["tty"], [], 0, 0)
    proc.container_id, proc.init = container.id, True
    proc.user, proc.security, proc.seccomp = wanted["user"], wanted["security"], container.seccomp
    setup, _, _ = containers.init_setup(container)
    finish = _finalizer(proc)
    _child(proc.argv, _env_dict(proc.env), proc.cwd, stdio, proc.tty, proc.tty, _then(setup, finish),
           None, status_w, barrier_r, None, finish.pre_exec)
