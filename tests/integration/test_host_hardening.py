"""Host hardening on a real VM: QEMU runs under its seccomp sandbox, and the run
directory, the sockets and the logs QEMU and the vsock back end create are private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kata_py.vmm.cmdline import SANDBOX

pytestmark = pytest.mark.vm


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_qemu_is_sandboxed_and_its_files_are_private(vms, loop_thread):
    old = os.umask(0o002)        # a careless caller's umask must not loosen anything
    try:
        sandbox = vms.start(qmp_socket=True)
    finally:
        os.umask(old)
    pid = sandbox.machine.pid
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    assert status["Seccomp"].strip() == "2", "QEMU is not under a seccomp filter"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-sandbox") + 1].decode() == SANDBOX
    run_dir = sandbox.run_dir
    assert mode(run_dir) == 0o700 and mode(run_dir.parent) == 0o700
    sockets = {p.name: mode(p) for p in run_dir.iterdir() if stat.S_ISSOCK(os.lstat(p).st_mode)}
    assert {"qmp.sock", "vhost-vsock.sock", "vsock.sock"} <= set(sockets), sockets
    assert set(sockets.values()) == {0o600}, sockets
    assert mode(run_dir / "console.log") == 0o600
    # Still a working VM under the filter: the agent answers.
    assert loop_thread.run(sandbox.agent.request("ping"))["protocol"] >= 1
