"""fork + exec of a guest process, without the `subprocess` module, with an
optional barrier between set-up and exec.

`subprocess` costs the agent ~0.3 s of imports at boot under TCG, and the
container set-up (namespaces, mounts, credentials) has to run in the child
between fork and exec anyway. The child talks to the parent over a
close-on-exec status pipe: "R" when it is set up and waiting at the barrier,
"E<errno>:<step>" when a step failed; end-of-file with nothing more means the
exec succeeded. The barrier is how OCI `create` holds a container's process
until `start` (runc's exec.fifo idea).
"""

from __future__ import annotations

import _signal
import os

# Python sets these to SIG_IGN for itself; an exec'd program must get them back
# at their defaults (SIGPIPE kills `yes | head`, as it should).
_RESET_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)
_STDIO_BASE = 1000  # where the child parks its stdio fds while shuffling them


class SpawnError(OSError):
    """The child failed before exec: errno and the step that failed."""


class HandoverFailed(OSError):
    """A process forked earlier (spawn's `via`) could not be handed the work:
    it is gone. Nothing was started."""


class StepFailed(Exception):
    def __init__(self, step: str, errno: int = 0) -> None:
        self.step = step
        self.errno = errno


def _read_status(fd: int, until_ready: bool, answer=None) -> bytes:
    """Read the child's report. A "U" is a request for its user namespace's id
    maps: `answer()` writes them and replies on the sync pipe."""
    data = b""
    while True:
        chunk = os.read(fd, 512)
        if not chunk:
            return data
        data += chunk
        while data.startswith(b"U") and answer is not None:
            data = data[1:]
            answer()
        if until_ready and data.startswith(b"R"):
            return data


# In the forked child: (status write fd, sync read fd) for ask_parent().
_child_channel: tuple[int, int] | None = None


def ask_parent_for_id_maps() -> None:
    """Called by a child's set-up right after unshare(CLONE_NEWUSER): the parent
    writes /proc/<child>/uid_map and gid_map (only a process outside the new
    namespace may map ids other than its own)."""
    if _child_channel is None:
        raise StepFailed("user namespace: no parent to write the id maps")
    status_w, sync_r = _child_channel
    os.write(status_w, b"U")
    if os.read(sync_r, 1) != b"M":
        raise StepFailed("user namespace id maps", 1)


def _raise_for(report: bytes) -> None:
    errno_text, _, step = report[1:].decode(errors="replace").partition(":")
    errno = int(errno_text) if errno_text.isdigit() else 0
    raise SpawnError(errno, f"{step}: {os.strerror(errno) if errno else 'failed'}")


class Child:
    """A forked child, possibly held at the barrier before exec."""

    def __init__(self, pid: int, status_fd: int, barrier_fd: int | None) -> None:
        self.pid = pid
        self._status_fd = status_fd
        self._barrier_fd = barrier_fd

    def release(self) -> None:
        """Let a held child exec; raise SpawnError if the exec fails."""
        try:
            if self._barrier_fd is not None:
                try:
                    os.write(self._barrier_fd, b"G")
                finally:
                    os.close(self._barrier_fd)
                    self._barrier_fd = None
            report = _read_status(self._status_fd, until_ready=False)
        finally:
            self.close()
        if report:
            _raise_for(report)

    def close(self) -> None:
        for name in ("_status_fd", "_barrier_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def spawn(argv: list[str], env: dict[str, str], cwd: str, stdio: tuple[int, int, int],
          new_session: bool = False, controlling_tty: bool = False, setup=None,
          hold: bool = False, on_fork=None, write_id_maps=None, pre_exec=None, via=None) -> Child:
    """Fork a child that runs `setup()` (in the child), waits at the barrier if
    `hold`, runs `pre_exec()` (in the child), then execs argv. Without hold the
    returned Child is already released. Raises SpawnError for a failure before
    exec.

    `pre_exec` is for what must come last, after the barrier too: a seccomp
    filter under no_new_privs, which then need not allow the set-up's own calls.

    `on_fork(pid)` runs in the parent right after fork, so the caller can record
    the pid before anyone could reap the child. `write_id_maps(pid)` answers a
    set-up that entered a new user namespace (see ask_parent_for_id_maps).

    `via`: a process forked earlier (zygote.py's Handover) that runs the
    child's part instead of a new fork: it knows argv, set-up and pre_exec
    already and takes only stdio and the child's ends of the pipes here. Its
    pid is recorded (on_fork) before it is handed anything. If it is gone,
    spawn raises its HandoverFailed with nothing started.
    """
    if via is not None and write_id_maps is not None:
        raise ValueError("a process forked earlier cannot ask for id maps")
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    barrier_r, barrier_w = os.pipe2(os.O_CLOEXEC) if hold else (None, None)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC) if write_id_maps else (None, None)
    if via is None:
        pid = os.fork()
        if pid == 0:  # child: only this function's code runs from here to exec
            global _child_channel
            if sync_r is not None:
                os.close(sync_w)
                _child_channel = (status_w, sync_r)
            _child(argv, env, cwd, stdio, new_session, controlling_tty, setup, status_r, status_w,
                   barrier_r, barrier_w, pre_exec)
        if on_fork is not None:
            on_fork(pid)
    else:
        pid = via.pid
        if on_fork is not None:
            on_fork(pid)
        try:
            via.hand(stdio, status_w, barrier_r)
        except BaseException:
            for fd in (status_r, status_w, barrier_r, barrier_w):
                if fd is not None:
                    os.close(fd)
            raise
    os.close(status_w)
    if barrier_r is not None:
        os.close(barrier_r)
    child = Child(pid, status_r, barrier_w)

    def answer() -> None:
        try:
            write_id_maps(pid)
            reply = b"M"
        except OSError:
            reply = b"X"
        os.write(sync_w, reply)

    try:
        report = _read_status(status_r, until_ready=hold, answer=answer if write_id_maps else None)
    except BaseException:
        child.close()
        raise
    finally:
        if sync_r is not None:
            os.close(sync_r)
            os.close(sync_w)
    if hold and report.startswith(b"R"):
        return child
    child.close()
    if report:
        _raise_for(report)
    return child


def _child(argv, env, cwd, stdio, new_session, controlling_tty, setup, status_r, status_w,
           barrier_r, barrier_w, pre_exec=None) -> None:
    step = "setup"
    try:
        if status_r is not None:    # (a process forked earlier never had the parent's ends)
            os.close(status_r)
        if barrier_w is not None:
            os.close(barrier_w)
        for signum in _RESET_SIGNALS:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
        if new_session:
            step = "setsid"
            os.setsid()
        step = "stdio"
        # Park first, so a source fd that is also a target (0, 1, 2) is not
        # overwritten before it is copied.
        parked = [os.dup2(fd, _STDIO_BASE + i, inheritable=False) for i, fd in enumerate(stdio)]
        for target, fd in enumerate(parked):
            os.dup2(fd, target, inheritable=True)
            os.close(fd)
        if controlling_tty:
            import fcntl
            import termios

            step = "controlling tty"
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if setup is not None:
            setup()
        step = "cwd"
        os.chdir(cwd)
        keep = sorted(fd for fd in (status_w, barrier_r) if fd is not None)
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 65536)
        if barrier_r is not None:
            step = "barrier"
            os.write(status_w, b"R")
            if os.read(barrier_r, 1) != b"G":
                raise StepFailed("barrier: never released")
            os.close(barrier_r)
        if pre_exec is not None:
            step = "pre-exec"
            pre_exec()
        step = "exec"
        _exec_search(argv, env)
    except StepFailed as exc:
        _report(status_w, exc.errno, exc.step)
    except OSError as exc:
        _report(status_w, exc.errno or 0, step)
    except BaseException:
        _report(status_w, 0, step)
    finally:
        os._exit(127)


def _exec_search(argv: list[str], env: dict[str, str]) -> None:
    """execvpe(3) with the process's own PATH, in plain C calls: after a chroot
    into a container no Python module can be imported any more (os.execvpe
    imports `warnings`)."""
    name = argv[0]
    if "/" in name:
        os.execve(name, argv, env)
    denied = None
    missing = None
    for directory in env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        try:
            os.execve(f"{directory or '.'}/{name}", argv, env)
        except PermissionError as exc:
            denied = exc
        except (FileNotFoundError, NotADirectoryError) as exc:
            missing = exc
    raise denied or missing or FileNotFoundError(2, "No such file or directory")


def _report(fd: int, errno: int, step: str) -> None:
    try:
        os.write(fd, f"E{errno}:{step}".encode())
    except OSError:
        pass
