"""The vsock back end in a jail of its own, started from the VM's owner.

After QEMU, the back end is the host process a hostile guest reaches
first: it maps the guest's RAM and parses the virtqueues the guest writes.
So it is jailed as QEMU is (kata_py/vmm/jail.py): a launcher forked from
the owner clones it with CLONE_PARENT (the owner's own child, so its pid,
exit status and signals are the owner's as before) into new pid, mount,
ipc, uts and network namespaces; it pivots into an empty read-only tmpfs
on the run directory's `vsock-root`, takes uid and gid `UID_BASE + its
host pid` with no capability and `no_new_privs`, dies with the owner,
loads a seccomp filter (kata_py/vmm/syscall_filter.py: no namespaces, no
exec, no mounts, no tracing, no modules, BPF or perf events), and only
then runs the back end.

It needs nothing by name: its two listening sockets are fds, and the
guest's memory and eventfds come as fds over the vhost-user connection. A
guest's connection to a host service (`<hybrid socket>_<port>`) is made
for it by a broker in the owner, which gets the port and answers with the
connected socket or nothing. No code can be imported from an empty root, so
the back end is imported here, in the owner, before the fork; being a fork,
it starts without a Python interpreter's start-up either.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from setproctitle import setproctitle

from .. import hostsys
from ..errors import VsockError
from ..vmm import jail, syscall_filter
from ..vsock import __main__ as backend
from ..vsock import hybrid


ROOT_NAME = "vsock-root"
NAMESPACES = jail.JAIL_NAMESPACES | jail.CLONE_NEWNET     # no network: it speaks only over the fds it holds
HOSTNAME = "kata-py-vsock"


class JailedBackend(hostsys.ForkedChild):
    """The back end's handle: a child of ours, and its broker."""

    def __init__(self, pid: int, broker: "Broker") -> None:
        super().__init__(pid)
        self.broker = broker

    def release(self) -> None:
        self.broker.close()


class Broker:
    """Outside the jail, in the owner: connects the back end to the host
    service sockets (`<hybrid socket>_<port>`) it names by port, and hands
    it the connection; the port is all it can choose."""

    def __init__(self, sock: socket.socket, uds_path: str) -> None:
        self.sock = sock
        self.uds_path = uds_path
        self.loop: asyncio.AbstractEventLoop | None = None
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            threading.Thread(target=self._serve, name="vsock-broker", daemon=True).start()
        else:
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._serve)

    def _serve(self) -> None:
        """Answer the requests there are (on the event loop), or all of them,
        blocking, until the back end is gone (on the broker's thread)."""
        while self.sock.fileno() >= 0:
            try:
                request = self.sock.recv(hybrid.BROKER_REQUEST.size)
            except BlockingIOError:
                return
            except OSError:
                request = b""
            if not request:
                self.close()    # the back end is gone
                return
            self._answer(request)

    def _answer(self, request: bytes) -> None:
        if len(request) != hybrid.BROKER_REQUEST.size:
            return
        conn = hybrid.connect_service(self.uds_path, hybrid.BROKER_REQUEST.unpack(request)[0])
        try:
            socket.send_fds(self.sock, [request], [conn.fileno()] if conn is not None else [])
        except OSError:
            pass        # the back end is gone, or not reading: it times out
        finally:
            if conn is not None:
                conn.close()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.sock.fileno())
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes a thread blocked in recv (close alone does not)
        except OSError:
            pass
        self.sock.close()


def launch(args: list[str], fds: tuple[int, ...], log_path: Path) -> JailedBackend:
    """Start the back end (`python -m kata_py.vsock ARGS`, holding `fds`) in
    its jail, with its broker; its handle. VsockError if it could not be
    started."""
    root = Path(log_path).parent / ROOT_NAME
    root.mkdir(mode=0o755, exist_ok=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    args = [*args, "--broker-fd", str(theirs.fileno())]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        launcher = hostsys.fork_helper()
        if launcher == 0:
            _launcher(args, (*fds, theirs.fileno()), log_fd, report_w, str(root))    # never returns
        os.close(report_w)
        report_w = -1
        hostsys.ForkedChild(launcher).wait()
        report = os.read(report_r, 32).strip()
    finally:
        theirs.close()
        for fd in (log_fd, report_r, report_w):
            if fd >= 0:
                os.close(fd)
    if not report.isdigit():
        ours.close()
        raise VsockError(f"cannot start the vsock back end in its jail: {_last_line(log_path)}")
    return JailedBackend(int(report), Broker(ours, args[args.index("--uds-path") + 1]))


def _launcher(args, fds, log_fd: int, report_w: int, root: str) -> None:
    """The forked launcher: clone the back end, report its pid, exit."""
    code = 1
    try:
        hostsys.settle_forked_child({report_w, *fds}, stderr=log_fd)
        owner = os.pidfd_open(os.getppid())
        pid = jail.clone_parent(NAMESPACES)
        if pid == 0:
            _backend(args, root, owner, report_w)     # never returns
        os.write(report_w, f"{pid}\n".encode())
        code = 0
    except BaseException as exc:
        _say(f"kata-py vsock jail: {exc}")
    finally:
        os._exit(code)


def _backend(args, root: str, owner: int, report_w: int) -> None:
    """The clone: into the jail, then the back end's own main loop."""
    code = 1
    try:
        os.close(report_w)
        # The command line a new interpreter would show (ps, and whoever looks for owners by theirs).
        setproctitle(" ".join([sys.executable, "-m", "kata_py.vsock", *args]))
        jail.enter_jail(jail.JailSpec(root=root, binary="", argv=[], hostname=HOSTNAME), jail.Syscalls(owner))
        os.close(owner)
        syscall_filter.install()
        # Its own stderr stream: the owner's (and its lock) stayed with the owner.
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        code = backend.main(args)
    except BaseException as exc:
        _say(f"kata-py vsock jail: {exc}")
    finally:
        os._exit(code)


def _say(line: str) -> None:
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def _last_line(path: Path) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "it exited without a word"
