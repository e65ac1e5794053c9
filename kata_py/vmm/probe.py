"""Choose the accelerator by booting a guest, never by the mere presence of /dev/kvm.

On a host that is itself a PVM guest, /dev/kvm exists (kvm_pvm) and QEMU starts
under -accel kvm, but a stock kernel hangs early. So KVM is chosen only when a
test guest (the floor image: its init powers off at once) boots and exits under
it in time. The verdict is cached per host kernel, QEMU and image.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cmdline import VMConfig, build_argv
from .host import kvm_module_facts, qemu_version

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str          # "kvm" or "tcg"
    reason: str
    probe_seconds: float | None = None
    cached: bool = False


def _probe_key(kernel: Path, initrd: Path) -> str:
    stat = os.stat("/dev/kvm")
    parts = [os.uname().release, qemu_version(), str(stat.st_rdev), str(kernel), str(initrd),
             str(kernel.stat().st_mtime_ns), ",".join(kvm_module_facts())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def boot_floor(kernel: Path, initrd: Path, accel: str, timeout: float,
               machine: str = "microvm") -> tuple[bool, float, str]:
    """Boot the floor image, the same way as a sandbox but with no devices;
    (exited cleanly in time, seconds, detail)."""
    argv = build_argv(VMConfig(kernel=kernel, initrd=initrd, console_log=Path(os.devnull), accel=accel,
                               machine=machine, name="kata-py-floor"), qmp_fd=None)
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start, f"no power-off within {timeout:.0f} s"
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        return False, elapsed, f"QEMU exited {proc.returncode}: {detail[-1] if detail else ''}"
    return True, elapsed, "booted"


def choose_accel(kernel: Path, initrd: Path, cache_dir: Path) -> AccelChoice:
    forced = os.environ.get("KATA_PY_ACCEL")
    if forced in ("tcg", "kvm"):
        return AccelChoice(forced, f"forced by KATA_PY_ACCEL={forced}")
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "no /dev/kvm on this host")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is not accessible to this user")
    cache = cache_dir / "accel-probe.json"
    key = _probe_key(kernel, initrd)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return AccelChoice(**saved["choice"], cached=True)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    ok, seconds, detail = boot_floor(kernel, initrd, "kvm", PROBE_TIMEOUT)
    modules = kvm_module_facts()
    if ok:
        choice = AccelChoice("kvm", f"a test guest booted under KVM in {seconds:.2f} s", round(seconds, 3))
    else:
        why = f"a test guest did not boot under KVM ({detail})"
        if "kvm_pvm" in modules:
            why += "; kvm_pvm is loaded: /dev/kvm is a nested PVM device, which stock guest kernels do not boot on"
        choice = AccelChoice("tcg", why, round(seconds, 3))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "choice": {k: v for k, v in asdict(choice).items() if k != "cached"}}))
    os.replace(tmp, cache)
    return choice
