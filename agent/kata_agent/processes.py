"""The agent's process table: create, attach stdio streams, start, signal, wait.

Every process is created first (its stdio pipes or pty made, nothing run yet),
the host then attaches one vsock connection per stdio stream, and only `start`
forks it. So no output is produced before someone is there to read it.

As PID 1 the agent reaps every child in one reaper thread (waitpid(-1)); the
table maps pids to processes under one lock, taken around fork as well, so a
child that exits at once is never reaped before its pid is recorded.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import threading

from .credentials import finalize
from .pid1 import log
from .spawn import HandoverFailed, SpawnError, spawn

ATTACH_STREAMS = ("stdin", "stdout", "stderr")
RELAY_CHUNK = 256 * 1024


class ProcessError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class Process:
    def __init__(self, process_id: str, argv, env, cwd, tty: bool, streams, rows: int, cols: int) -> None:
        self.id = process_id
        self.argv = list(argv)
        self.env = list(env)
        self.cwd = cwd
        self.tty = tty
        self.wanted = set(streams)
        self.rows, self.cols = rows, cols
        self.attached: dict[str, object] = {}
        self.pid: int | None = None
        self.status: tuple[int | None, int | None] | None = None  # (exit_code, signal)
        self.exited = threading.Event()
        self.out_relays: list[threading.Thread] = []
        self.master_fd: int | None = None
        self.child = None                      # a spawn.Child held at the barrier
        self.container_id: str | None = None
        self.init = False
        self.user: dict | None = None          # {"uid", "gid", "additional_gids"}
        self.security: dict | None = None      # credentials.py's other keys: umask, rlimits, capabilities, ...
        self.seccomp = None                    # a seccomp.Filter: its container's


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    if rows and cols:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _pump_out(src_fd: int, sock, what: str) -> None:
    """Guest pipe/pty -> host connection, then half-close so the host sees EOF."""
    try:
        while True:
            try:
                data = os.read(src_fd, RELAY_CHUNK)
            except OSError:  # EIO on a pty whose last slave closed: that is EOF
                data = b""
            if not data:
                break
            sock.sendall(data)
    except OSError as exc:
        log(f"{what}: {exc}")
    finally:
        try:
            sock.shutdown(1)  # SHUT_WR: the host reads EOF, its own writes still land
        except OSError:
            pass
        sock.close()


def _pump_in(sock, dst_fd: int, what: str, is_pipe: bool) -> None:
    """Host connection -> guest pipe/pty; host EOF closes the process's stdin."""
    try:
        while True:
            data = sock.recv(RELAY_CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(dst_fd, view):]
    except OSError as exc:
        if exc.errno != 32:  # EPIPE: the process stopped reading, which is its right
            log(f"{what}: {exc}")
    finally:
        if not is_pipe:
            # A tty has no half-close: send the terminal's EOF character instead.
            try:
                os.write(dst_fd, b"\x04")
            except OSError:
                pass
        os.close(dst_fd)
        sock.close()


class ProcessTable:
    MAX_PROCESSES = 1024

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: dict[str, Process] = {}
        self.by_pid: dict[int, Process] = {}
        self.children = threading.Condition(self.lock)
        self.spawned = 0

    # -- lookup -----------------------------------------------------------------
    def get(self, process_id: str) -> Process:
        with self.lock:
            proc = self.by_id.get(process_id)
        if proc is None:
            raise ProcessError("not_found", f"no process {process_id!r}")
        return proc

    def pidfd(self, proc: Process) -> int | None:
        """A pidfd of `proc` while it has not been reaped, else None.

        Its pid is checked and the pidfd opened under the lock the reaper
        records exits under: a pid once reaped may be another process's, but
        one still in by_pid is this process's, and the pidfd then stays
        this process's (setns through it fails with ESRCH once it has exited).
        """
        with self.lock:
            if proc.pid is None or self.by_pid.get(proc.pid) is not proc:
                return None
            try:
                return os.pidfd_open(proc.pid)
            except ProcessLookupError:  # reaped a moment ago, not yet recorded
                return None

    # -- lifecycle --------------------------------------------------------------
    def create(self, process_id, argv, env, cwd, tty, streams, rows=0, cols=0) -> Process:
        with self.lock:
            if process_id in self.by_id:
                raise ProcessError("exists", f"process {process_id!r} already exists")
            if len(self.by_id) >= self.MAX_PROCESSES:
                raise ProcessError("failed", "too many processes")
            proc = Process(process_id, argv, env, cwd, tty, streams, rows, cols)
            self.by_id[process_id] = proc
        return proc

    def attach(self, process_id: str, stream: str, sock) -> None:
        proc = self.get(process_id)
        with self.lock:
            if proc.pid is not None:
                raise ProcessError("state", f"process {process_id!r} already started")
            if stream not in proc.wanted:
                raise ProcessError("invalid", f"process {process_id!r} did not ask for {stream}")
            if proc.tty and stream == "stderr":
                raise ProcessError("invalid", "a tty process has no separate stderr")
            if stream in proc.attached:
                raise ProcessError("exists", f"{stream} of {process_id!r} is already attached")
            proc.attached[stream] = sock

    def prepare(self, process_id: str, setup=None, cleanup=None, **fork_options) -> int:
        """Fork the process up to the barrier: set up, waiting for `start`.

        fork_options: `around_fork` (called in this thread right before fork,
        returns the undo, called right after: a pid namespace for the child)
        and `write_id_maps` (see spawn.spawn).
        """
        proc = self._check_startable(process_id)
        return self._launch(proc, hold=True, setup=setup, cleanup=cleanup, **fork_options)

    def start(self, process_id: str, setup=None, cleanup=None, **fork_options) -> int:
        proc = self.get(process_id)
        if proc.child is not None:
            child, proc.child = proc.child, None
            try:
                child.release()
            except SpawnError as exc:
                raise ProcessError("failed", f"cannot run {proc.argv[0]!r}: {exc.strerror}") from None
            return proc.pid
        proc = self._check_startable(process_id)
        return self._launch(proc, hold=False, setup=setup, cleanup=cleanup, **fork_options)

    def _check_startable(self, process_id: str) -> Process:
        proc = self.get(process_id)
        missing = proc.wanted - set(proc.attached) - ({"stderr"} if proc.tty else set())
        if missing:
            raise ProcessError("state", f"streams {sorted(missing)} of {process_id!r} are not attached")
        if proc.pid is not None:
            raise ProcessError("state", f"process {process_id!r} already started")
        return proc

    def _launch(self, proc: Process, hold: bool, setup, cleanup, around_fork=None, write_id_maps=None,
                handover=None) -> int:
        """Make the stdio plumbing, fork, and start the relays."""
        child_fds, parent_ends = [], {}
        try:
            if proc.tty:
                master, slave = os.openpty()
                os.set_inheritable(master, False)
                os.set_inheritable(slave, False)
                child_fds = [slave]
                _set_winsize(master, proc.rows, proc.cols)
                parent_ends["tty"] = master
                stdio = (slave, slave, slave)
            else:
                for stream in ATTACH_STREAMS:
                    if stream not in proc.attached:
                        child_fds.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
                        continue
                    r, w = os.pipe2(os.O_CLOEXEC)
                    ours, theirs = (w, r) if stream == "stdin" else (r, w)
                    child_fds.append(theirs)
                    parent_ends[stream] = ours
                stdio = tuple(child_fds)
            proc.child = self._fork(proc, stdio, hold, setup, around_fork, write_id_maps, handover)
        except Exception:
            for fd in parent_ends.values():
                os.close(fd)
            raise
        finally:
            for fd in set(child_fds):
                os.close(fd)
            if cleanup is not None:
                cleanup()
        if not hold:
            proc.child = None
        if proc.tty:
            master = parent_ends["tty"]
            proc.master_fd = master
            if "stdout" in proc.attached:
                self._relay(proc, _pump_out, (master, proc.attached["stdout"], f"{proc.id} tty"), out=True)
            if "stdin" in proc.attached:
                # Its own descriptor, so closing the master after exit cannot pull it
                # out from under (or redirect) a relay that is still writing.
                self._relay(proc, _pump_in, (proc.attached["stdin"], os.dup(master), f"{proc.id} tty-in", False),
                            out=False)
        else:
            for stream, fd in parent_ends.items():
                sock = proc.attached[stream]
                if stream == "stdin":
                    self._relay(proc, _pump_in, (sock, fd, f"{proc.id} stdin", True), out=False)
                else:
                    self._relay(proc, _pump_out_closing, (fd, sock, f"{proc.id} {stream}"), out=True)
        return proc.pid

    def _fork(self, proc: Process, stdio, hold: bool, setup, around_fork=None, write_id_maps=None,
              handover=None):
        """`handover()`: a zygote.Handover to run the child instead of a new
        fork, or None; one that is gone falls back to the fork."""
        def record(pid: int) -> None:
            # Recorded before the child's report is read: the reaper may see the
            # child exit (even a failed exec exits) before spawn() returns.
            with self.lock:
                proc.pid = pid
                self.by_pid[pid] = proc
                self.spawned += 1
                self.children.notify_all()

        via = handover() if handover is not None else None
        if via is not None:
            try:
                return self._spawn(proc, stdio, hold, record, via=via)
            except HandoverFailed as exc:
                log(f"{proc.id}: {exc.strerror}; forking instead")
                with self.lock:
                    self.by_pid.pop(via.pid, None)
                    proc.pid = None
        finish = _finalizer(proc)
        undo = around_fork() if around_fork is not None else None
        try:
            return self._spawn(proc, stdio, hold, _undo_then(undo, record), setup=_then(setup, finish),
                               pre_exec=finish.pre_exec, write_id_maps=write_id_maps)
        except BaseException:
            _run_undo(undo)
            raise

    def _spawn(self, proc: Process, stdio, hold: bool, on_fork, **options):
        try:
            return spawn(proc.argv, _env_dict(proc.env), proc.cwd, stdio, new_session=proc.tty,
                         controlling_tty=proc.tty, hold=hold, on_fork=on_fork, **options)
        except SpawnError as exc:
            with self.lock:
                self.by_id.pop(proc.id, None)
            raise ProcessError("failed", f"cannot run {proc.argv[0]!r}: {exc.strerror}") from None

    def _relay(self, proc: Process, target, args, out: bool) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        if out:
            proc.out_relays.append(thread)
        thread.start()

    def signal(self, process_id: str, signum: int) -> None:
        proc = self.get(process_id)
        if proc.pid is None:
            raise ProcessError("state", f"process {process_id!r} is not started")
        if proc.exited.is_set():
            raise ProcessError("state", f"process {process_id!r} has exited")
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            raise ProcessError("state", f"process {process_id!r} has exited") from None

    def resize(self, process_id: str, rows: int, cols: int) -> None:
        proc = self.get(process_id)
        if proc.master_fd is None:
            raise ProcessError("state", f"process {process_id!r} has no terminal")
        _set_winsize(proc.master_fd, rows, cols)

    def wait(self, process_id: str) -> tuple[int | None, int | None]:
        proc = self.get(process_id)
        if proc.pid is None:
            raise ProcessError("state", f"process {process_id!r} is not started")
        proc.exited.wait()
        # All output reaches the host before the exit status does.
        for relay in proc.out_relays:
            relay.join()
        with self.lock:
            if self.by_id.get(process_id) is proc:
                del self.by_id[process_id]
                if proc.master_fd is not None:
                    os.close(proc.master_fd)
                    proc.master_fd = None
        return proc.status

    # -- reaping ------------------------------------------------------------------
    def reap_forever(self) -> None:
        while True:
            with self.lock:
                seen = self.spawned
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self.lock:
                    if self.spawned == seen:
                        self.children.wait()
                continue
            except InterruptedError:
                continue
            with self.lock:
                proc = self.by_pid.pop(pid, None)
            if proc is None:
                continue  # an orphan re-parented to PID 1: reaped, nothing to report
            if os.WIFSIGNALED(status):
                proc.status = (None, os.WTERMSIG(status))
            else:
                proc.status = (os.WEXITSTATUS(status), None)
            proc.exited.set()


def _undo_then(undo, record):
    """on_fork for spawn: undo the pre-fork switch at once (this thread's later
    children must not land in the container's pid namespace), then record."""
    if undo is None:
        return record

    def on_fork(pid: int) -> None:
        _run_undo(undo)
        record(pid)
    return on_fork


def _run_undo(undo) -> None:
    """Undo a pre-fork switch; harmless when it was undone already (the
    thread's pid namespace for children is its own again either way)."""
    if undo is not None:
        undo()


def _pump_out_closing(fd: int, sock, what: str) -> None:
    try:
        _pump_out(fd, sock, what)
    finally:
        os.close(fd)


def _finalizer(proc: Process):
    """The process's credentials, limits and seccomp filter, prepared before fork."""
    security = dict(proc.security or {})
    if proc.user is not None:
        security["user"] = proc.user
    try:
        return finalize(security, proc.seccomp)
    except ValueError as exc:  # checked at create_process already: only a bug gets here
        raise ProcessError("invalid", str(exc)) from None


def _then(setup, finish):
    """Compose the container set-up with the process's finalisation (credentials.py)."""
    def run() -> None:
        finish.early()
        if setup is not None:
            setup()
        finish()
    return run


def _env_dict(env: list[str]) -> dict[str, str]:
    result = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key:
            result[key] = value
    return result

