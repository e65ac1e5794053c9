"""kata_py.vmm.virtiofsd without a VM: QEMU's arguments, the daemon's start
(ready, then killed since no QEMU connects) and its start-up errors; and the
shared-filesystem selection (kata_py.config.shared_fs)."""

from __future__ import annotations

import asyncio
import os

import pytest

from kata_py import config
from kata_py.errors import ConfigError
from kata_py.vmm.virtiofsd import BINARY, VirtioFsDaemon, VirtioFsError


def test_qemu_args_name_the_socket_and_tag(tmp_path):
    daemon = VirtioFsDaemon(tmp_path, "rootfs", tmp_path / "a,b")
    chardev, device = daemon.qemu_args("mmio")[1], daemon.qemu_args("mmio")[3]
    assert chardev == f"socket,id=char-fs-rootfs,path={tmp_path}/a,,b/fs-rootfs.sock"
    assert device.startswith("vhost-user-fs-device,chardev=char-fs-rootfs,tag=rootfs")
    assert daemon.qemu_args("pci")[3].startswith("vhost-user-fs-pci,")


def test_source_option_escapes_commas(tmp_path):
    argv = VirtioFsDaemon(tmp_path / "x,y", "t", tmp_path).argv(7)
    assert argv[:4] == [BINARY, "--fd=7", "-o", f"source={tmp_path}/x\\,y"]
    assert "sandbox=namespace" in argv[5]


def test_a_missing_export_is_a_clear_error(tmp_path):
    with pytest.raises(VirtioFsError, match="not a directory"):
        asyncio.run(VirtioFsDaemon(tmp_path / "gone", "t", tmp_path).start())
    assert not (tmp_path / "fs-t.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(BINARY, os.X_OK), reason="virtiofsd sandboxes itself as root")
def test_start_waits_for_ready_and_stop_leaves_nothing(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    daemon = VirtioFsDaemon(export, "t", tmp_path)
    asyncio.run(daemon.start())
    pids = daemon.pids()
    assert daemon.alive() and (tmp_path / "fs-t.sock").exists() and pids
    daemon.stop(grace=0)
    assert not daemon.alive() and not (tmp_path / "fs-t.sock").exists()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_shared_fs_selection(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("KATA_PY_SHARED_FS", raising=False)
    assert config.shared_fs() == "virtio-fs"
    (tmp_path / "config.toml").write_text('[vm]\nshared_fs = "9p"\n')
    assert config.shared_fs() == "9p"
    monkeypatch.setenv("KATA_PY_SHARED_FS", "virtio-fs")
    assert config.shared_fs() == "virtio-fs"
    monkeypatch.setenv("KATA_PY_SHARED_FS", "nfs")
    with pytest.raises(ConfigError, match="KATA_PY_SHARED_FS must be one of virtio-fs, 9p"):
        config.shared_fs()
