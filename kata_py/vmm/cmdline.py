"""Build QEMU's command line from a VM description.

Direct kernel boot of an uncompressed vmlinux (QEMU loads it through PVH) and
nothing QEMU would add by default: `-nodefaults -no-user-config`. Guest RAM is
a shared memfd because a vhost-user backend must map it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .host import QEMU_BINARY, tsc_khz

MACHINES = ("microvm", "q35")
# QEMU's seccomp filter: QEMU may not fork or exec, change its uid/gid or
# capabilities, change scheduling or affinity, or make syscalls QEMU itself
# declares obsolete. A guest that takes over QEMU keeps only what a running VMM
# needs.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass
class VMConfig:
    kernel: Path
    initrd: Path
    console_log: Path
    memory_mib: int = 128
    cpus: int = 1
    accel: str = "tcg"          # "tcg" or "kvm", from the probe
    machine: str = "microvm"
    kernel_args: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)   # devices from other layers (vsock, net, fs)
    pass_fds: list[int] = field(default_factory=list)     # fds QEMU inherits, named in extra_args (taps)
    name: str = "kata-py"
    # virtio-balloon with free page reporting: the guest hands back the memory
    # it frees (the initramfs image, init memory), so an idle VM shrinks on the
    # host. Measured, idle 128 MiB sandbox: guest RAM touched 111 -> 103 MiB,
    # PSS 227 -> 220 MiB. (The agent lowers the reporting order; see pid1.py.)
    free_page_reporting: bool = True
    # TCG's translated-code cache. QEMU's default (1 GiB, touched as code is
    # translated) grew to ~70 MiB of anonymous memory per idle guest; measured
    # here, idle sandbox QEMU Pss_Anon / `run -d` / exec: default 97.5 MiB /
    # 6.0-6.3 s / 0.41 s; 32 MiB: 54.7 MiB / 6.3-6.7 s / 0.30-0.41 s; 16 MiB:
    # 34.8 MiB / 8.6 s / 0.98 s (the cache then flushes and retranslates).
    tb_size_mib: int = 32
    # The guest's root filesystem as a read-only disk image (erofs) instead of
    # the initramfs: one file whose pages the host's page cache shares between
    # VMs, read by each guest only as far as it uses it.
    rootfs: Path | None = None

    @property
    def bus(self) -> str:
        return "mmio" if self.machine == "microvm" else "pci"


def kernel_command_line(config: VMConfig) -> str:
    args = [
        "console=ttyS0",
        "quiet",
        # On a panic, reboot at once; with -no-reboot that ends QEMU, so a dead
        # guest becomes an exited process instead of a hung one.
        "panic=-1",
        "reboot=t",
        # Self-tests of the crypto API cost ~0.4 s under TCG and test nothing of ours.
        "cryptomgr.notests",
        # -cpu max has RDRAND; trusting it seeds the CRNG at once so Python
        # (which needs random bytes to start) never waits for entropy.
        "random.trust_cpu=on",
        "8250.nr_uarts=1",
    ]
    khz = tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
        # Under TCG on a busy host the guest's timer interrupts come late, so the
        # clocksource watchdog reads the (correct) TSC as skewed and falls back to
        # jiffies: a clock that loses time under load and, not being continuous,
        # rules out tickless idle (a 250 Hz tick in every idle guest). The TSC
        # here is QEMU's, derived from the host clock: trust it.
        args.append("tsc=reliable")
    if config.rootfs is not None:
        # The disk is the only virtio-blk device, so it is vda; rootwait covers
        # the virtio-mmio probe finishing after the kernel looks for its root.
        args += ["root=/dev/vda", "rootfstype=erofs", "ro", "rootwait", "init=/init"]
    return " ".join(args + list(config.kernel_args))


def build_argv(config: VMConfig, qmp_fd: int | None) -> list[str]:
    """QEMU's argv; with qmp_fd None there is no monitor (a boot-and-exit probe)."""
    if config.machine not in MACHINES:
        raise ValueError(f"unknown machine type {config.machine!r}; use one of {MACHINES}")
    machine = config.machine
    if machine == "microvm":
        machine += ",x-option-roms=off,isa-serial=on"
    machine += ",memory-backend=mem"
    accel = config.accel
    if accel == "tcg":
        accel += f",tb-size={config.tb_size_mib}"
    argv = [
        QEMU_BINARY,
        "-name", f"{config.name},debug-threads=on",
        "-machine", machine,
        "-accel", accel,
        "-cpu", "host" if config.accel == "kvm" else "max",
        "-m", f"{config.memory_mib}M",
        "-smp", str(config.cpus),
        "-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", SANDBOX,
        "-kernel", str(config.kernel),
        *(["-initrd", str(config.initrd)] if config.rootfs is None else []),
        "-append", kernel_command_line(config),
        "-chardev", f"file,id=console,path={config.console_log}",
        "-serial", "chardev:console",
    ]
    if qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if config.machine == "microvm":
        # Modern virtio-mmio (virtio 1.x): the guest driver negotiates VERSION_1,
        # which the vhost-user backend requires.
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    if config.rootfs is not None:
        disk = "virtio-blk-device" if config.bus == "mmio" else "virtio-blk-pci"
        argv += ["-drive", f"file={config.rootfs},if=none,id=rootfs,format=raw,readonly=on",
                 "-device", f"{disk},drive=rootfs"]
    if config.free_page_reporting:
        device = "virtio-balloon-device" if config.bus == "mmio" else "virtio-balloon-pci"
        argv += ["-device", f"{device},free-page-reporting=on"]
    return argv + list(config.extra_args)
