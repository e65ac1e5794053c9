"""Facts about the host that shape the QEMU command line."""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"


@lru_cache(maxsize=1)
def tsc_khz() -> int | None:
    """The host TSC frequency in kHz, for the guest's `tsc_early_khz`.

    Under TCG the guest reads the host's TSC, and on microvm (no PIT/HPET to
    calibrate against) a guest left to calibrate alone hangs now and then.
    """
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return round(float(match.group(1)) * 1000) if match else None


@lru_cache(maxsize=1)
def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return out.splitlines()[0] if out else "unknown"


def cgroup_version() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2 (unified)"
    if Path("/sys/fs/cgroup/unified/cgroup.controllers").exists():
        return "v1 (hybrid: v2 mounted at /sys/fs/cgroup/unified)"
    return "v1"


def kvm_module_facts() -> list[str]:
    facts = []
    for name in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if Path("/sys/module", name).exists():
            facts.append(name)
    return facts
