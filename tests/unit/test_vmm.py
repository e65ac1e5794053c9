"""QEMU command line, accelerator choice and launch errors (no guest boots here)."""

import asyncio
import json
from pathlib import Path

import pytest

from kata_py.errors import VMLaunchError
from kata_py.vmm import probe
from kata_py.vmm.cmdline import VMConfig, build_argv, kernel_command_line
from kata_py.vmm.machine import QemuMachine, VMState


def config(tmp_path, **kw):
    return VMConfig(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", console_log=tmp_path / "console.log", **kw)


def test_microvm_command_line(tmp_path):
    argv = build_argv(config(tmp_path, memory_mib=96, cpus=2), qmp_fd=7)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert "memory-backend-memfd,id=mem,size=96M,share=on" in argv
    assert "microvm" in argv[argv.index("-machine") + 1] and "memory-backend=mem" in joined
    assert "virtio-mmio.force-legacy=false" in argv
    assert "socket,id=qmp,fd=7" in argv
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-cpu") + 1] == "max"
    # TCG with a bounded translation cache, not QEMU's 1 GiB default.
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=32"
    assert "socket,id=qmp" not in " ".join(build_argv(config(tmp_path), qmp_fd=None))


def test_kvm_uses_host_cpu_and_q35_has_no_mmio_global(tmp_path):
    argv = build_argv(config(tmp_path, accel="kvm", machine="q35"), qmp_fd=3)
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert "virtio-mmio.force-legacy=false" not in argv
    with pytest.raises(ValueError):
        build_argv(config(tmp_path, machine="isapc"), qmp_fd=3)


def test_kernel_command_line_has_the_boot_fixes(tmp_path):
    line = kernel_command_line(config(tmp_path, kernel_args=["extra=1"]))
    for word in ("cryptomgr.notests", "random.trust_cpu=on", "panic=-1", "reboot=t", "extra=1"):
        assert word in line.split()
    assert any(w.startswith("tsc_early_khz=") for w in line.split())


def test_accel_forced_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KATA_PY_ACCEL", "tcg")
    assert probe.choose_accel(tmp_path / "k", tmp_path / "i", tmp_path).accel == "tcg"


def test_accel_probe_result_is_cached(monkeypatch, tmp_path):
    if not Path("/dev/kvm").exists():
        pytest.skip("the caching path only runs where /dev/kvm exists")
    monkeypatch.delenv("KATA_PY_ACCEL", raising=False)
    monkeypatch.setattr(probe.os, "access", lambda *a: True)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    calls = []

    def fake_boot(k, i, accel, timeout, machine="microvm"):
        calls.append(accel)
        return False, 10.0, "no power-off within 10 s"

    monkeypatch.setattr(probe, "boot_floor", fake_boot)
    first = probe.choose_accel(kernel, tmp_path / "i", tmp_path)
    second = probe.choose_accel(kernel, tmp_path / "i", tmp_path)
    assert first.accel == second.accel == "tcg" and "did not boot under KVM" in first.reason
    assert calls == ["kvm"] and second.cached and not first.cached
    assert json.loads((tmp_path / "accel-probe.json").read_text())["choice"]["accel"] == "tcg"


def test_launch_error_carries_argv_exit_code_and_output(tmp_path):
    machine = QemuMachine(config(tmp_path), tmp_path)
    with pytest.raises(VMLaunchError) as info:
        asyncio.run(machine.launch())
    err = info.value
    assert err.argv[0] == "qemu-system-x86_64"
    assert err.qemu_exit_code not in (None, 0)
    assert "vmlinux" in str(err) or "vmlinux" in err.console_tail
    assert machine.state is VMState.STOPPED and not machine.alive()


def test_share_arguments_escape_commas_and_honour_readonly():
    from kata_py.sandbox.sandbox import Share

    args = Share("rootfs", Path("/bundles/a,b/rootfs"), readonly=True).qemu_args("mmio")
    assert args[1] == "local,id=fs-rootfs,path=/bundles/a,,b/rootfs,security_model=passthrough,multidevs=remap,readonly=on"
    assert args[3] == "virtio-9p-device,fsdev=fs-rootfs,mount_tag=rootfs"
    assert Share("r", Path("/x")).qemu_args("pci")[3].startswith("virtio-9p-pci,")
    assert "readonly" not in Share("r", Path("/x")).qemu_args("pci")[1]


def test_a_rootfs_disk_replaces_the_initrd(tmp_path):
    argv = build_argv(config(tmp_path, rootfs=tmp_path / "rootfs.erofs"), qmp_fd=3)
    assert "-initrd" not in argv
    drive = argv[argv.index("-drive") + 1]
    assert f"file={tmp_path / 'rootfs.erofs'}" in drive and "readonly=on" in drive
    assert "virtio-blk-device,drive=rootfs" in argv
    append = argv[argv.index("-append") + 1]
    assert "root=/dev/vda" in append and "rootfstype=erofs" in append and " ro " in f" {append} "
    plain = build_argv(config(tmp_path), qmp_fd=3)
    assert "-initrd" in plain and "-drive" not in plain
