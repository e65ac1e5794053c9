"""Each VM's QEMU in a host cgroup with memory and task limits: made, joined
by a forked child, and removed. Real cgroups on this host (root), under a
name of the test's own; a cgroup that cannot be made is an error, shown with
a fake cgroup root."""

import asyncio
import os
from pathlib import Path

import pytest

from kata_py.errors import HostCgroupError
from kata_py.vmm import cmdline, host_cgroup
from kata_py.vmm.cmdline import VMConfig
from kata_py.vmm.machine import QemuMachine

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


@needs_root
def test_limits_join_and_removal():
    cg = host_cgroup.HostCgroup(f"test-{os.getpid()}", guest_mib=128, accel="tcg")
    cg.create()
    assert cg.paths, "no cgroup hierarchy was writable"
    try:
        memory_files = [p / f for p in cg.paths for f in ("memory.max", "memory.limit_in_bytes") if (p / f).exists()]
        assert memory_files and int(memory_files[0].read_text()) == (128 + 1024) << 20
        pids_files = [p / "pids.max" for p in cg.paths if (p / "pids.max").exists()]
        assert pids_files and pids_files[0].read_text().strip() == str(host_cgroup.PIDS_MAX)
        assert f"/kata-py/{cg.name}" in cgroups_of_a_joined_child(cg)
    finally:
        cg.remove()
    assert not any(p.exists() for p in cg.paths) and all(not p.exists() for p, _ in host_cgroup._directories(cg.name))


@needs_root
def test_stale_empty_cgroups_are_swept_fresh_ones_kept():
    stale = host_cgroup.HostCgroup(f"vm-stale-{os.getpid()}", guest_mib=128, accel="tcg")
    fresh = host_cgroup.HostCgroup(f"vm-fresh-{os.getpid()}", guest_mib=128, accel="tcg")
    stale.create()
    fresh.create()
    try:
        old = host_cgroup.time.time() - 2 * host_cgroup.STALE_AFTER
        for path in stale.paths:
            os.utime(path, (old, old))
        host_cgroup.sweep_stale()
        assert not any(p.exists() for p in stale.paths)
        assert all(p.exists() for p in fresh.paths)
    finally:
        stale.remove()
        fresh.remove()


def fake_v1_root(root: Path, controllers=("memory", "pids")) -> Path:
    for controller in controllers:
        (root / controller).mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    return root


def test_an_unwritable_hierarchy_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    root = fake_v1_root(tmp_path / "cgroup")
    (root / "pids" / host_cgroup.PARENT).write_text("")  # not a directory: no cgroup can be made under it
    monkeypatch.setattr(host_cgroup, "ROOT", root)
    removed = []
    monkeypatch.setattr(host_cgroup, "remove_host_cgroups", removed.append)  # a fake root's rmdir cannot work
    cg = host_cgroup.HostCgroup("vm-test", guest_mib=128, accel="tcg")
    with pytest.raises(HostCgroupError, match=r"host cgroup cannot be made: .*/pids/kata-py/vm-test: ") as info:
        cg.create()
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, OSError)  # kept for --debug
    # The memory cgroup was made (with its limit) before the failure, and is removed again.
    assert (root / "memory" / host_cgroup.PARENT / "vm-test" / "memory.limit_in_bytes").read_text() == \
        str((128 + 1024) << 20)
    assert removed == ["vm-test"] and cg.paths == []


def test_a_missing_hierarchy_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(host_cgroup, "ROOT", fake_v1_root(tmp_path / "cgroup", controllers=("memory",)))
    with pytest.raises(HostCgroupError, match="no pids cgroup hierarchy"):
        host_cgroup.HostCgroup("vm-test", guest_mib=128, accel="tcg").create()
    monkeypatch.setattr(host_cgroup, "ROOT", tmp_path / "none")
    with pytest.raises(HostCgroupError, match="no memory or pids cgroup hierarchy"):
        host_cgroup.HostCgroup("vm-test", guest_mib=128, accel="tcg").create()


def test_an_unwritable_v2_hierarchy_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory pids\n")
    (root / host_cgroup.PARENT).write_text("")
    monkeypatch.setattr(host_cgroup, "ROOT", root)
    with pytest.raises(HostCgroupError, match="host cgroup cannot be made"):
        host_cgroup.HostCgroup("vm-test", guest_mib=128, accel="tcg").create()


def test_qemu_is_not_started_without_its_cgroup(tmp_path, monkeypatch):
    root = fake_v1_root(tmp_path / "cgroup")
    (root / "memory" / host_cgroup.PARENT).write_text("")
    monkeypatch.setattr(host_cgroup, "ROOT", root)
    started = tmp_path / "qemu-started"
    fake = tmp_path / "fake-qemu"
    fake.write_text(f"#!/bin/sh\ntouch {started}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cmdline, "QEMU_BINARY", str(fake))
    run_dir = tmp_path / "vm-run"
    run_dir.mkdir()
    config = VMConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", console_log=tmp_path / "console.log")

    async def go():
        machine = QemuMachine(config, run_dir)
        try:
            with pytest.raises(HostCgroupError):
                await machine.launch()
        finally:
            await machine.shutdown()
        return machine

    machine = asyncio.run(go())
    assert machine.process is None and not started.exists()


def cgroups_of_a_joined_child(cg) -> str:
    """/proc/self/cgroup of a forked child that joined `cg` (as QEMU does at fork)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        cg.join()
        os.write(w, Path("/proc/self/cgroup").read_bytes())
        os._exit(0)
    os.close(w)
    seen = os.read(r, 65536).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return seen
