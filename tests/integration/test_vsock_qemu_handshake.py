"""Real QEMU realizes vhost-user-vsock against the kata-py back end.

QEMU stays paused (-S), so no guest runs: this checks the vhost-user handshake,
including the GET_CONFIG QEMU does while realizing the device, and clean teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from kata_py.vsock.transport import HybridVsock

pytestmark = pytest.mark.vm

QEMU = shutil.which("qemu-system-x86_64")


class Qmp:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        greeting = json.loads(proc.stdout.readline())
        assert "QMP" in greeting
        assert "return" in self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> dict:
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("QEMU closed QMP: " + self.proc.stderr.read().decode())
            reply = json.loads(line)
            if "return" in reply or "error" in reply:
                return reply


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
@pytest.mark.parametrize("bus, machine", [("mmio", "microvm"), ("pci", "pc")])
def test_qemu_realizes_vhost_user_vsock(tmp_path, bus, machine):
    t = HybridVsock(tmp_path, guest_cid=42)
    t.start()
    argv = [QEMU, "-M", machine, "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-display", "none", "-S", "-m", "64",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
            "-machine", "memory-backend=mem", "-qmp", "stdio", *t.qemu_args(bus)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        qmp = Qmp(proc)
        assert qmp.cmd("query-status")["return"]["status"] == "prelaunch"
        if bus == "mmio":
            children = qmp.cmd("qom-list", path="/machine/peripheral-anon")["return"]
            assert {"name": "device[0]", "type": "child<vhost-user-vsock-device>"} in children
        else:
            devices = json.dumps(qmp.cmd("query-pci")["return"])
            assert "vhost-user-vsock-pci" in devices or '"vendor": 6900' in devices
        qmp.cmd("quit")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    # QEMU gone, so the back end ends its session and exits by itself.
    backend = t.proc
    deadline = time.monotonic() + 10
    while backend.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.poll() == 0
    t.close()
    log = (tmp_path / "vsock-backend.log").read_text()
    assert "GET_CONFIG offset=0 size=8 -> guest_cid=42" in log
    assert "front end closed the connection" in log
    assert not t.vhost_socket.exists() and not t.uds_path.exists()
    assert not list(tmp_path.glob("*.sock"))
