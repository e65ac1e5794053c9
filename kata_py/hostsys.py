"""The few host system calls kata-py needs that `os` lacks (mount namespace work)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
EINVAL = 22

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str = "", flags: int = 0, data: str = "") -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() or None), f"mount {source} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def set_parent_death_signal(signum: int) -> None:
    """The signal this process gets when its parent dies (0: none). Cannot
    fail for a valid signal; called between fork and exec, it raises nothing."""
    _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def die_with_parent() -> None:
    """For a child before exec (a preexec_fn): if whoever started it dies, so
    does it, rather than run on with nobody to stop it."""
    set_parent_death_signal(signal.SIGKILL)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def listen_private(path: str, backlog: int) -> socket.socket:
    """A Unix socket listening at ``path`` (an old one replaced), mode 0600:
    nobody can connect before listen(), so tightening the mode after bind is
    early enough. Raises OSError."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


HYBRID_CGROUP2 = "/sys/fs/cgroup/unified"


def hide_hybrid_cgroup2() -> None:
    """For crun's child before exec (a preexec_fn): crun 1.8 refuses a host
    with hybrid cgroups (v1 controllers plus the v2 hierarchy mounted at
    /sys/fs/cgroup/unified). In a mount namespace of its own that mount is
    gone and crun runs on the v1 controllers; the host keeps its mounts."""
    unshare(CLONE_NEWNS)
    mount("none", "/", "", MS_REC | MS_SLAVE)
    try:
        umount(HYBRID_CGROUP2, MNT_DETACH)
    except OSError:
        pass  # not a hybrid host: nothing to hide


def crun_preexec(name: str):
    """The preexec_fn to run runtime `name` with on this host (crun only, and
    only where the hybrid v2 mount exists), else None."""
    return hide_hybrid_cgroup2 if name == "crun" and os.path.ismount(HYBRID_CGROUP2) else None


# -- a child forked from an imported process, standing in for a new interpreter

# Objects whose fds a forked child replaced with /dev/null stay referenced
# there, so no finalizer of theirs ever runs in the child (one closing a
# number the child has since reused would close the child's own file).
_kept_in_child: list = []


def replace_fds_except(keep: set[int]) -> None:
    """In a forked child: every fd but `keep` (what the parent had open:
    locks, ends of pipes, listeners) becomes /dev/null, closed to the child
    with its number still taken, whoever still refers to it."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != null:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass    # the listing's own fd, closed by now
    _kept_in_child.append(null)


def keep_alive_in_child(*objects) -> None:
    _kept_in_child.extend(objects)


def fork_helper() -> int:
    """os.fork() for a child that stands in for a new process: this
    process's buffered stdout and stderr are flushed first, else a child
    that flushes (or drops) its copy of them writes them again."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return os.fork()


def settle_forked_child(keep=(), inherited=(), stdout: int | None = None, stderr: int | None = None) -> None:
    """In a child from fork_helper(): with `stderr`, stdin on /dev/null,
    stdout on `stdout` (else /dev/null) and stderr on `stderr`; every fd but
    stdio, `keep` and `inherited` closed to it (replace_fds_except);
    `inherited` left inheritable, for what it execs or clones; and the
    signal state a new interpreter starts with."""
    if stderr is not None:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null if stdout is None else stdout, 1)
        os.dup2(stderr, 2)
    replace_fds_except({0, 1, 2, *keep, *inherited})
    for fd in inherited:
        os.set_inheritable(fd, True)
    default_signals()


def default_signals() -> None:
    """In a forked child: the signal state a new interpreter starts with (no
    handler of the parent's, nothing blocked, no wakeup fd into the parent's
    event loop)."""
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler) and signum != signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def fork_enabled() -> bool:
    """Whether helper processes (a sandbox owner, an exec relay, the jail's
    launcher) are forked from the process that has their code imported
    already; KATA_PY_FORK=off starts each as a new interpreter instead."""
    return os.environ.get("KATA_PY_FORK", "on") != "off"


class ForkedChild:
    """The part of subprocess.Popen its callers use (pid, returncode, poll,
    wait, send_signal, kill), for a child of ours that Popen did not start:
    a forked helper, or one cloned into its jail with CLONE_PARENT."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reaped(self, status: int) -> int:
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self._reaped(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status; subprocess.TimeoutExpired if it runs past `timeout`."""
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is None:
                try:
                    self._reaped(os.waitpid(self.pid, 0)[1])
                except InterruptedError:
                    continue
                except ChildProcessError:
                    self.returncode = 0     # reaped by someone else: its status is lost
                break
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
