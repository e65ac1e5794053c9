"""fork + exec of a guest process, without the `subprocess` module.

`subprocess` costs the agent ~0.3 s of imports at boot under TCG, and the
container set-up to come (namespaces, mounts, credentials) has to run in the
child between fork and exec anyway. The child reports a failure before exec
through a close-on-exec pipe, so the caller gets "no such file" as an error
instead of a process that exits 127.
"""

from __future__ import annotations

import _signal
import fcntl
import os
import termios

# Python sets these to SIG_IGN for itself; an exec'd program must get them back
# at their defaults (SIGPIPE kills `yes | head`, as it should).
_RESET_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)
_STDIO_BASE = 1000  # where the child parks its stdio fds while shuffling them


class SpawnError(OSError):
    """The child failed before exec: errno and the step that failed."""


def spawn(argv: list[str], env: dict[str, str], cwd: str, stdio: tuple[int, int, int],
          new_session: bool = False, controlling_tty: bool = False, on_fork=None) -> int:
    """Start argv; return its pid once it has exec'd. Raises SpawnError.

    `on_fork(pid)` runs in the parent right after fork, so the caller can record
    the pid before anyone could reap the child.
    """
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: only this function's code runs from here to exec
        step = "setup"
        try:
            os.close(err_r)
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
            if controlling_tty:
                step = "controlling tty"
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            step = "cwd"
            os.chdir(cwd)
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 65536)
            step = "exec"
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(err_w, f"{exc.errno or 0}:{step}".encode())
        except BaseException:
            os.write(err_w, f"0:{step}".encode())
        finally:
            os._exit(127)
    os.close(err_w)
    if on_fork is not None:
        on_fork(pid)
    try:
        report = b""
        while chunk := os.read(err_r, 512):
            report += chunk
    finally:
        os.close(err_r)
    if report:
        errno_text, _, step = report.decode(errors="replace").partition(":")
        errno = int(errno_text) if errno_text.isdigit() else 0
        raise SpawnError(errno, f"{step}: {os.strerror(errno) if errno else 'failed'}")
    return pid
