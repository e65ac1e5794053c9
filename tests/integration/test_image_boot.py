"""Boot the guest image itself under TCG: the floor initramfs, and the real
image's userland (Python, stdlib, libraries, modules) with a probe as /init.

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
for line in open("/etc/kata-agent/modules"):
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


def _boot(kernel: Path, initrd: Path, timeout: float = 120) -> tuple[str, float, int]:
    append = "console=ttyS0 reboot=t panic=-1 cryptomgr.notests random.trust_cpu=on quiet"
    if _tsc_khz():
        append += f" tsc_early_khz={_tsc_khz()}"
    argv = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-global", "virtio-mmio.force-legacy=false", "-accel", "tcg", "-cpu", "max",
            "-m", "128", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-serial", "stdio", "-append", append]
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
    modules = entries["etc/kata-agent/modules"].data.decode().split()
    assert modules and all(f"lib/modules/{image.kernel_release}/" in m for m in modules)
    assert all(m.lstrip("/") in entries for m in modules)
    assert "vsock" in modules[0]
    assert any(p.endswith("__pycache__/os.cpython-311.pyc") for p in entries)
