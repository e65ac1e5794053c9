"""Host-side hardening that needs no guest: QEMU's seccomp sandbox on its command
line, the modes of the state directories and of every socket kata-py or its QEMU
creates. (tests/integration/test_host_hardening.py checks the same on a real VM.)"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from kata_py import paths
from kata_py.oci.state import StateStore
from kata_py.vmm import cmdline
from kata_py.vmm.cmdline import VMConfig, build_argv
from kata_py.vmm.machine import QemuMachine
from kata_py.vsock.transport import HybridVsock


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def loose_umask():
    """Run with a permissive umask, so modes come from the code, not from ours."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_qemu_runs_under_its_seccomp_sandbox(tmp_path):
    argv = build_argv(VMConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", console_log=tmp_path / "c"), 3)
    value = argv[argv.index("-sandbox") + 1]
    options = dict(item.partition("=")[::2] for item in value.split(",")[1:])
    assert value.split(",")[0] == "on"
    assert options == {"obsolete": "deny", "elevateprivileges": "deny", "spawn": "deny",
                       "resourcecontrol": "deny"}
    assert argv.count("-sandbox") == 1
    # The probe's boot-and-exit QEMU (no monitor) is sandboxed the same way.
    assert "-sandbox" in build_argv(VMConfig(kernel=tmp_path / "k", initrd=tmp_path / "i",
                                             console_log=tmp_path / "c"), None)


def test_state_root_is_private_when_created_and_when_found_loose(tmp_path, loose_umask):
    store = StateStore(tmp_path / "a" / "root")
    store.ensure_root()
    assert mode(store.root) == 0o700
    loose = StateStore(tmp_path / "loose")
    loose.root.mkdir(mode=0o755)
    os.chmod(loose.root, 0o755)
    loose.ensure_root()
    assert mode(loose.root) == 0o700
    with loose.lock("c1", create=True) as directory:
        assert mode(directory) == 0o700
        assert mode(directory / "lock") == 0o600


def test_state_and_run_dirs_are_private(tmp_path, monkeypatch, loose_umask):
    from kata_py import image

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)           # as an older kata-py left /var/lib/kata-py
    monkeypatch.setattr(image, "find_image", lambda state_dir=None, variant=None: None)
    monkeypatch.setattr(image, "build_image", lambda state_dir=None, progress=True, variant=None: "built")
    assert image.ensure_image(state) == "built"
    assert mode(state) == 0o700
    run = paths.ensure_private_dir(tmp_path / "run" / "sandboxes")
    assert mode(run) == 0o700


def test_hybrid_vsock_sockets_are_0600(tmp_path, loose_umask):
    transport = HybridVsock(tmp_path)
    transport.start()
    try:
        assert mode(transport.vhost_socket) == 0o600
        assert mode(transport.uds_path) == 0o600
    finally:
        transport.close()


FAKE_QEMU = r'''#!{python}
"""Stands in for QEMU: creates what QEMU would (the -qmp unix socket, the console
file) and answers QMP on the inherited fd until told to quit."""
import json, os, socket, sys
argv = sys.argv
fd = int(next(a for a in argv if a.startswith("socket,id=qmp,fd=")).rsplit("=", 1)[1])
qmp_path = next(a for a in argv if a.startswith("unix:"))[5:].split(",")[0]
console = next(a for a in argv if a.startswith("file,id=console,path=")).split("path=", 1)[1]
open(console, "a").close()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(qmp_path)
listener.listen(1)
with open(os.environ["FAKE_QEMU_UMASK"], "w") as f:
    f.write(oct(os.umask(0)))
chan = socket.socket(fileno=fd)
def send(obj):
    chan.sendall(json.dumps(obj).encode() + b"\n")
send({{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 2, "major": 7}}, "package": "fake"}},
                "capabilities": []}}}})
buf, decoder = "", json.JSONDecoder()
while True:
    data = chan.recv(4096)
    if not data:
        break
    buf += data.decode()
    while buf.strip():
        try:
            msg, end = decoder.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        reply = {{"return": {{}}}}
        if "id" in msg:
            reply["id"] = msg["id"]
        send(reply)
        if msg.get("execute") == "quit":
            sys.exit(0)
'''


def test_qemu_creates_its_files_and_sockets_0600(tmp_path, monkeypatch, loose_umask):
    fake = tmp_path / "fake-qemu"
    fake.write_text(FAKE_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setattr(cmdline, "QEMU_BINARY", str(fake))
    monkeypatch.setenv("FAKE_QEMU_UMASK", str(tmp_path / "umask"))
    # A script cannot run in the jail (no interpreter there): this is the
    # unjailed launch; test_jailer checks the jailed one on a real VM.
    monkeypatch.setenv("KATA_PY_JAIL", "off")
    config = VMConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", console_log=tmp_path / "console.log",
                      extra_args=["-qmp", f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"])

    async def go():
        machine = QemuMachine(config, tmp_path)
        await machine.launch()
        try:
            return mode(tmp_path / "qmp.sock"), mode(tmp_path / "console.log")
        finally:
            await machine.shutdown()

    assert asyncio.run(go()) == (0o600, 0o600)
    assert (tmp_path / "umask").read_text() == oct(0o177)
