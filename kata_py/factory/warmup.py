"""Warm a pooled VM up before it is handed out.

Under TCG a guest runs a code path slowly the first time (QEMU translates it)
and quickly after; Python in the agent likewise pays once for what it does
first. Measured on an idle pooled VM, the first container's create and
start each took 0.2-0.45 s in the guest, a repeat under 0.05 s. So a standby,
once its VM is up, runs one throwaway container through the same requests a
real one makes (create_container, an init held at the barrier and started,
an exec, a kill, wait) and deletes it. Nothing of it stays: the agent kills
what is left in its cgroup, removes the cgroup and unmounts its share, and
its root filesystem (busybox, in the standby's own share directory) is
removed here before the VM is offered.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from ..oci.busybox import DEFAULT_MOUNTS, make_busybox_rootfs
from ..oci.guest_spec import create_container_args
from ..sandbox.handle import SandboxHandle
from ..sandbox.process import ProcessSession

CONTAINER_ID = "kata-py-warmup"
ENTRY = "warmup"          # its rootfs, beside the (empty) `rootfs` entry of the share
SPEC = {
    "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
              "maskedPaths": ["/proc/kcore", "/proc/keys"], "readonlyPaths": ["/proc/sys"]},
    "mounts": DEFAULT_MOUNTS,
    "hostname": "warmup",
}


async def warm_up(sandbox: SandboxHandle, share_dir: Path) -> None:
    """Run and delete one container in `sandbox`; raises what the agent raises."""
    rootfs = share_dir / ENTRY
    make_busybox_rootfs(rootfs)
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        args = create_container_args(CONTAINER_ID, SPEC, str(share_dir), None)
        args["rootfs_path"] = ENTRY
        await sandbox.agent.request("create_container", args)
        try:
            io = {"stdin_fd": None, "stdout_fd": devnull, "stderr_fd": devnull, "container_id": CONTAINER_ID}
            init = ProcessSession(sandbox, ["sleep", "600"], init=True, process_id="warmup-init", **io)
            await init.create()
            await init.prepare()
            await init.start()
            probe = ProcessSession(sandbox, ["true"], process_id="warmup-exec", **io)
            await probe.create()
            await probe.start()
            await probe.relay_and_wait()
            await init.signal(signal.SIGKILL)
            await init.relay_and_wait()
        finally:
            await sandbox.agent.request("delete_container", {"container_id": CONTAINER_ID})
    finally:
        os.close(devnull)
        # Our own plain directory: nothing is ever mounted in it on the host.
        shutil.rmtree(rootfs, ignore_errors=True)
