"""Controlling the factory from the CLI: start, wait until ready, stop.
(Claiming a pooled VM is the pool client's, kata_py.sandbox.pool.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .. import paths
from ..sandbox.pool import FactoryError, factory_dir, request, socket_path, wait_gone

START_TIMEOUT = 15.0


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
    if pid is not None and not wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)
    return True
