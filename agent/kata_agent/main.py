"""Agent entry point: PID 1 set-up, then serve the host over vsock."""

from __future__ import annotations

import os
import signal
import sys
import threading

from kata_py.protocol.messages import PREFORK_PARAM

from .cgroups import enable_controllers
from .container import Containers
from .handlers import Handlers
from .hostile import Hostile
from .pid1 import BASE_MOUNTS, Pid1, kernel_param, log
from .processes import ProcessTable
from .server import Server
from .zygote import Zygote

# Loading stops after the last of these to start listening: vsock and the
# virtio transports its device sits on. The rest (9p, net, blk) load in the
# background while the host connects.
BOOT_MODULES = ("vmw_vsock_virtio_transport.ko", "virtio_mmio.ko", "virtio_pci.ko")


def main() -> None:
    pid1 = Pid1()
    log("started")
    if os.getpid() == 1:
        try:
            pid1.make_root_a_mount()  # so that containers can pivot_root
        except OSError as exc:
            log(f"root bind: {exc}")
        pid1.mount_all(BASE_MOUNTS)
        enable_controllers()
        # The kernel already shields init from signals it has no handler for.
        # Python installs one for SIGINT, so replace it with a no-op (a handler,
        # not SIG_IGN, so that exec'd children get the default back).
        signal.signal(signal.SIGINT, lambda *_: None)
        try:
            pid1.loopback_up()  # before any process runs: loopback always exists in the sandbox
        except OSError as exc:
            log(f"loopback: {exc}")
    # The project's kernel has every driver built in and the image lists no
    # modules; an image with a modular kernel (Debian's, kept for comparison)
    # lists them in load order.
    modules = pid1.module_paths()
    split = max((i + 1 for i, path in enumerate(modules) if path.endswith(BOOT_MODULES)), default=len(modules))
    if modules:
        pid1.load_modules(modules[:split])
        log(f"loaded {split} boot modules")
    else:
        pid1.lower_reporting_order()  # the balloon is built in: no module load to follow

    hostile = Hostile.from_cmdline()    # None unless a test asked for it on the kernel command line
    if hostile is not None:
        hostile.at_boot()
    table = ProcessTable()
    modules_ready = threading.Event()
    containers = Containers(pid1.sys, modules_ready)
    zygote = Zygote(containers, enabled=kernel_param(PREFORK_PARAM) != "off")
    server = Server(table, Handlers(table, pid1.power_off, containers, zygote=zygote), hostile)
    listener = server.listen()
    log("listening on vsock port 1024")
    # While the host has not asked for anything yet (and all the while a
    # pooled VM waits): the first container's process, forked ahead.
    zygote.arm_in_background()

    def late_setup() -> None:
        pid1.load_modules(modules[split:])
        modules_ready.set()
        log(f"loaded {len(modules) - split} more modules")

    if modules[split:]:
        threading.Thread(target=late_setup, daemon=True).start()
    else:
        modules_ready.set()
    threading.Thread(target=table.reap_forever, daemon=True).start()
    try:
        server.serve_forever(listener)
    except BaseException as exc:  # PID 1 must never just exit: power off instead
        log(f"fatal: {exc!r}")
        if os.getpid() == 1:
            pid1.power_off()
        sys.exit(1)
