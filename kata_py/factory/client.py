"""Talking to the factory: from the CLI (start/status/stop) and from a
container monitor (claim a pooled VM)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import hostsys, paths
from ..errors import KataError
from .wire import WireError, call

START_TIMEOUT = 15.0
CLAIM_TIMEOUT = 5.0
RELEASE_TIMEOUT = 20.0


class FactoryError(KataError):
    pass


def factory_dir() -> Path:
    return paths.run_dir() / "factory"


def socket_path() -> Path:
    return factory_dir() / "factory.sock"


def request(message: dict, timeout: float = 5.0) -> dict | None:
    """One request to the running factory; None when none is running."""
    try:
        sock, reply = call(str(socket_path()), message, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except (OSError, WireError) as exc:
        raise FactoryError(f"the factory did not answer: {exc}") from None
    sock.close()
    return reply


def start(size: int, memory_mib: int, cpus: int) -> dict:
    if request({"op": "status"}) is not None:
        raise FactoryError("the factory is already running (kata-py factory stop first)")
    directory = paths.ensure_private_dir(factory_dir())
    socket_path().unlink(missing_ok=True)
    with open(directory / "factory.out", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kata_py.factory.daemon", "--dir", str(directory),
                                 "--size", str(size), "--memory", str(memory_mib), "--cpus", str(cpus)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    (directory / "factory.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        status = request({"op": "status"})
        if status is not None:
            return status
        if proc.poll() is not None:
            raise FactoryError(f"the factory exited at once (status {proc.returncode}); see {directory}/factory.out")
        time.sleep(0.05)
    proc.kill()
    raise FactoryError(f"the factory did not start within {START_TIMEOUT:.0f} s")


def wait_ready(timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = request({"op": "status"})
        if status is None:
            raise FactoryError("the factory is not running")
        if status["ready"] >= status["size"] or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def stop(timeout: float = 60.0) -> bool:
    """Stop the factory and its idle VMs; False when none was running."""
    pid_file = factory_dir() / "factory.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        pid = None
    if request({"op": "stop"}) is None:
        return False
    if pid is not None and not _wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5)
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to end."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@dataclass
class Claim:
    """A pooled VM held by this process: the standby ends it when `conn` closes."""

    conn: socket.socket
    pid: int            # the standby's
    run_dir: Path
    uds: Path
    share_dir: Path

    def enter_mount_namespace(self) -> None:
        """Join the standby's mount namespace (where QEMU's export lives), so
        the container's rootfs and bind sources can be bound into it. Only in
        a single-threaded process."""
        fd = os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            hostsys.setns(fd, hostsys.CLONE_NEWNS)
        finally:
            os.close(fd)

    def release(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """Let go: the standby ends the VM; wait for it, kill it if it hangs."""
        self.conn.close()
        if not _wait_gone(self.pid, timeout):
            try:
                os.kill(self.pid, signal.SIGKILL)  # its QEMU dies with it
            except ProcessLookupError:
                pass


def claim(memory_mib: int, cpus: int) -> Claim | None:
    """A pooled VM of at least this size, or None (no factory, no idle VM, too small)."""
    try:
        reply = request({"op": "claim", "memory_mib": memory_mib, "cpus": cpus}, timeout=CLAIM_TIMEOUT)
    except FactoryError:
        return None
    if not reply or not reply.get("ok"):
        return None
    try:
        conn, info = call(str(reply["socket"]), {"op": "claim", "owner": os.getpid()}, CLAIM_TIMEOUT)
    except (OSError, WireError, KeyError):
        return None
    if not info.get("ok"):
        conn.close()
        return None
    conn.settimeout(None)
    try:
        return Claim(conn=conn, pid=int(info["pid"]), run_dir=Path(info["run_dir"]), uds=Path(info["uds"]),
                     share_dir=Path(info["share_dir"]))
    except (KeyError, TypeError, ValueError):
        conn.close()
        return None

