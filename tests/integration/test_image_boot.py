"""Boot the guest image itself under TCG: the floor initramfs, and the real
image's userland (Python, stdlib, libraries, modules where the kernel has
them) with a probe as /init, from the initramfs and from the erofs root disk.

QEMU is started directly, not through kata_py.vmm, so a failure here points
at the image and nothing else.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from kata_py.image import builder

pytestmark = pytest.mark.vm

# Stand-in /init: what the agent needs from the image, checked one by one.
PROBE_INIT = b'''#!/usr/bin/python3.11 -SB
import ctypes, os, socket, sys, time
print("PROBE python", sys.version.split()[0], "%.3f" % time.clock_gettime(time.CLOCK_BOOTTIME), flush=True)
libc = ctypes.CDLL(None, use_errno=True)
listed = open("/etc/kata-agent/modules").read().split() if os.path.exists("/etc/kata-agent/modules") else []
print("PROBE modules", len(listed), flush=True)
for line in listed:
    fd = os.open(line.strip(), os.O_RDONLY)
    if libc.syscall(313, fd, b"", 0) != 0 and ctypes.get_errno() != 17:  # finit_module
        print("PROBE modfail", line.strip(), os.strerror(ctypes.get_errno()), flush=True)
    os.close(fd)
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, 1024))
s.listen()
ctypes.CDLL("libseccomp.so.2")
sys.path[0:0] = ["/opt/kata-agent"]  # as the real /init does
import kata_agent.main  # the real agent imports from the shipped stdlib alone
print("PROBE vsock-listening", "%.3f" % time.clock_gettime(time.CLOCK_BOOTTIME), flush=True)
libc.reboot(0x4321FEDC)  # RB_POWER_OFF
'''


def _tsc_khz() -> int | None:
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    return round(float(m.group(1)) * 1000) if m else None


def _boot(kernel: Path, initrd: Path | None, timeout: float = 120,
          disk: Path | None = None) -> tuple[str, float, int]:
    append = "console=ttyS0 reboot=t panic=-1 cryptomgr.notests random.trust_cpu=on quiet"
    if _tsc_khz():
        append += f" tsc_early_khz={_tsc_khz()}"
    argv = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-global", "virtio-mmio.force-legacy=false", "-accel", "tcg", "-cpu", "max",
            "-m", "128", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(kernel), "-serial", "stdio"]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    if disk is not None:
        argv += ["-drive", f"file={disk},if=none,id=root,format=raw,readonly=on",
                 "-device", "virtio-blk-device,drive=root"]
        append += " root=/dev/vda rootfstype=erofs ro rootwait init=/init"
    argv += ["-append", append]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=timeout)
    return proc.stdout.decode(errors="replace"), time.monotonic() - start, proc.returncode


def test_floor_initrd_exits_qemu(image):
    console, took, rc = _boot(image.kernel, image.floor_initrd)
    assert rc == 0, console
    assert "Kernel panic" not in console, console
    assert took < 60


def test_image_python_modules_and_vsock(image, tmp_path):
    initrd = builder.initrd_with_init(image.initrd, PROBE_INIT, tmp_path / "probe-initrd")
    console, took, rc = _boot(image.kernel, initrd)
    assert rc == 0, console
    assert "PROBE python 3.11" in console, console
    assert "PROBE modfail" not in console, console
    assert "PROBE vsock-listening" in console, console


def test_image_layout(image):
    entries = {e.path: e for e in builder.read_initrd(image.initrd)}
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["init"].mode & 0o111
    assert entries["opt/kata-agent/kata_py/__init__.py"].data == b""
    assert "lib64/ld-linux-x86-64.so.2" in entries
    assert any(p.endswith("__pycache__/os.cpython-311.pyc") for p in entries)
    # The project's kernel has everything built in: the image ships no module
    # and the agent loads none.
    assert image.manifest["kernel_variant"] == "sandbox"
    assert "etc/kata-agent/modules" not in entries
    assert not any(p.startswith("lib/modules/") for p in entries)
    assert image.rootfs is not None and image.rootfs.stat().st_size > 1 << 20


def test_sandbox_kernel_has_the_fragment_and_no_modules(image):
    from kata_py.image import kernel_build

    built = kernel_build.config_values((image.directory.parent.parent / "kernels"
                                        / image.manifest["kernel_build"]["hash"] / "config").read_text())
    wanted = kernel_build.fragment_options(
        (builder.Inputs.from_repo().guest_dir / "kernel.config").read_text())
    assert kernel_build.unmet(wanted, built) == []
    assert built.get("CONFIG_MODULES") == "n"
    assert image.kernel_release == image.manifest["kernel_build"]["release"]


def _unpack(entries, tree: Path) -> None:
    """An initramfs's entries as a directory tree (what the image's erofs is made from)."""
    import os
    import stat

    for e in entries:
        dest = tree / e.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if stat.S_ISDIR(e.mode):
            dest.mkdir(exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            os.symlink(e.data.decode(), dest)
        elif stat.S_ISREG(e.mode):
            dest.write_bytes(e.data)
        if not stat.S_ISLNK(e.mode) and dest.exists():
            os.chmod(dest, stat.S_IMODE(e.mode))


def test_image_boots_from_an_erofs_disk(image, tmp_path):
    # The image's userland as the erofs root disk the sandboxes boot from
    # (written by the builder's own function), with the probe as /init.
    tree = tmp_path / "tree"
    _unpack([e for e in builder.read_initrd(image.initrd)
             if e.path not in ("init", "dev/console")], tree)
    (tree / "init").write_bytes(PROBE_INIT)
    (tree / "init").chmod(0o755)
    disk = tmp_path / "root.erofs"
    builder.write_erofs(tree, disk)
    console, took, rc = _boot(image.kernel, None, disk=disk)
    assert rc == 0, console
    assert "PROBE python 3.11" in console, console
    assert "PROBE modules 0" in console, console
    assert "PROBE vsock-listening" in console, console
