"""Sandbox = one VM + its vsock host end + its agent connection.

`async with Sandbox(...) as sb:` boots the VM and returns once the agent has
answered a ping; leaving the block shuts the guest down (agent, then the QEMU
ladder), stops the vsock backend and removes the run directory, whatever
happened inside.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config as kata_config
from .. import paths
from ..errors import AgentError, KataError, VMLaunchError, VsockError
from ..protocol.messages import PREFORK_PARAM
from ..vmm import jail
from ..vmm.cmdline import VMConfig
from ..vmm.host_cgroup import HostLimits
from ..vmm.machine import QemuMachine, tail
from ..vmm.probe import choose_accel
from ..vmm.virtiofsd import STOP_TIMEOUT as FS_STOP_TIMEOUT
from ..vmm.virtiofsd import VirtioFsDaemon
from ..vsock.transport import VsockTransport, choose_transport
from . import vsock_jail
from .agent_client import AgentClient

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 60.0     # TCG on a loaded 2-core host can be slow; a hung boot still ends
SHUTDOWN_TIMEOUT = 3.0


@dataclass(frozen=True)
class Share:
    """A host directory exported into the guest, over virtio-fs (a virtiofsd
    of its own) or virtio-9p (QEMU serves it); `fs` None: the configured one
    (kata_py.config.shared_fs)."""

    tag: str
    path: Path
    readonly: bool = False
    fs: str | None = None

    def chosen_fs(self) -> str:
        # virtiofsd has no read-only export: a read-only share stays on 9p.
        return "9p" if self.readonly else (self.fs or kata_config.shared_fs())

    def qemu_args(self, bus: str) -> list[str]:
        # passthrough: the guest's root may chown/chmod for real, as a container's
        # root expects; the export is confined to `path` by QEMU.
        # QEMU option values escape a comma by doubling it; a bundle path may hold one.
        path = str(self.path).replace(",", ",,")
        # multidevs=remap: the export spans several host mounts (a container's
        # share binds its rootfs and bind sources), whose inode numbers must not
        # collide in the guest.
        fsdev = f"local,id=fs-{self.tag},path={path},security_model=passthrough,multidevs=remap"
        if self.readonly:
            fsdev += ",readonly=on"
        device = "virtio-9p-device" if bus == "mmio" else "virtio-9p-pci"
        return ["-fsdev", fsdev, "-device", f"{device},fsdev=fs-{self.tag},mount_tag={self.tag}"]


@dataclass
class BootTimes:
    """Seconds from the start of `start()` to each milestone."""

    launched: float = 0.0       # QEMU answered QMP
    agent_ready: float = 0.0    # the agent answered a ping


class Sandbox:
    def __init__(self, image, memory_mib: int = 128, cpus: int = 1, machine: str = "microvm",
                 accel: str | None = None, name: str | None = None, shares: list[Share] = (),
                 qmp_socket: bool = False, nics: list = (), kernel_args: list[str] = (),
                 run_dir: Path | None = None, host_cgroup: str | None = None,
                 host_limits: HostLimits | None = None) -> None:
        self.image = image
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.machine_type = machine
        self.accel = accel
        self.name = name
        self.shares = list(shares)
        self.nics = list(nics)      # kata_py.network.GuestNic: a tap fd each, which QEMU inherits
        self.kernel_args = list(kernel_args)    # appended to the guest kernel's command line
        if os.environ.get("KATA_PY_GUEST_PREFORK", "on") == "off":
            self.kernel_args.append(f"{PREFORK_PARAM}=off")
        if any(not arg or any(c.isspace() for c in arg) for arg in self.kernel_args):
            raise ValueError(f"kernel arguments must be single words: {self.kernel_args!r}")
        self.qmp_socket = qmp_socket
        # The cgroup the runtime was given (OCI linux.cgroupsPath, a pod's
        # cgroup), with the sandbox's limits: its host processes live there,
        # as Kata's sandbox_cgroup_only. None: QEMU gets a cgroup of its own.
        self.host_cgroup = host_cgroup
        self.host_limits = host_limits
        # A run directory of the caller's choosing (made afresh), so that it can
        # be found and removed without this object; else a new one under paths.run_dir().
        self.chosen_run_dir = Path(run_dir) if run_dir is not None else None
        self.run_dir: Path | None = None
        self.transport: VsockTransport | None = None
        self.machine: QemuMachine | None = None
        self.agent: AgentClient | None = None
        self.agent_info: dict = {}
        self.times = BootTimes()
        self.fs_daemons: list[VirtioFsDaemon] = []

    async def __aenter__(self) -> "Sandbox":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def console_log(self) -> Path | None:
        return self.run_dir / "console.log" if self.run_dir else None

    async def start(self) -> None:
        started = time.monotonic()
        try:
            base = paths.ensure_private_dir(paths.run_dir())
            if self.chosen_run_dir is not None:
                shutil.rmtree(self.chosen_run_dir, ignore_errors=True)  # an earlier VM's, killed
                self.chosen_run_dir.mkdir(mode=0o700)
                self.run_dir = self.chosen_run_dir
            else:
                self.run_dir = Path(tempfile.mkdtemp(prefix="vm-", dir=base))
            accel = self.accel or choose_accel(self.image.kernel, self.image.floor_initrd, paths.state_dir()).accel
            self.transport = choose_transport(self.run_dir)
            self.transport.start(launch=vsock_jail.launch if jail.enabled() else None)
            config = VMConfig(kernel=self.image.kernel, initrd=self.image.initrd, rootfs=self.image.rootfs,
                              console_log=self.run_dir / "console.log", memory_mib=self.memory_mib,
                              cpus=self.cpus, accel=accel, machine=self.machine_type,
                              name=self.name or f"kata-py-{self.run_dir.name}", kernel_args=self.kernel_args)
            config.extra_args += self.transport.qemu_args(config.bus)
            for share in self.shares:
                if share.chosen_fs() == "virtio-fs":
                    daemon = VirtioFsDaemon(share.path, share.tag, self.run_dir)
                    self.fs_daemons.append(daemon)
                    await daemon.start()
                    config.extra_args += daemon.qemu_args(config.bus)
                else:
                    config.extra_args += share.qemu_args(config.bus)
            for nic in self.nics:
                config.extra_args += nic.qemu_args(config.bus)
                config.pass_fds.append(nic.fd)
            if self.qmp_socket:
                # A second QMP monitor for other processes (pause/resume from the CLI).
                config.extra_args += ["-qmp", f"unix:{self.run_dir / 'qmp.sock'},server=on,wait=off"]
            self.machine = QemuMachine(config, self.run_dir, host_cgroup=self.host_cgroup,
                                       host_limits=self.host_limits)
            await self.machine.launch()
            backend = self.transport.backend_pid()
            if backend is not None:
                self.adopt_host_process(backend)
            for daemon in self.fs_daemons:
                for pid in daemon.pids():
                    self.adopt_host_process(pid)
            self.times.launched = time.monotonic() - started
            await self._wait_for_agent(started + BOOT_TIMEOUT)
            self.times.agent_ready = time.monotonic() - started
        except BaseException:
            await self.stop()
            raise

    def adopt_host_process(self, pid: int) -> bool:
        """Account one more of the sandbox's host processes (its vsock back
        end, its owner, a shim) in the cgroup the runtime was given, until the
        VM ends. False (nothing moved) without such a cgroup, or if the move
        failed (logged): QEMU, the one that runs the guest, is there anyway."""
        if self.host_cgroup is None or self.machine is None or self.machine.cgroup is None:
            return False
        return self.machine.cgroup.adopt(pid)

    async def _wait_for_agent(self, deadline: float) -> None:
        """Connect until the agent listens: before that the guest answers RST."""
        delay = 0.01
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.machine.alive():
                raise self._dead("the VM exited before its agent was ready")
            if not self.transport.alive():
                # The back end also ends when QEMU does: then QEMU's exit is the news.
                if await self.machine.wait(1.0) is not None:
                    raise self._dead("the VM exited before its agent was ready")
                # QEMU runs on without its vhost-user back end; the agent is unreachable.
                raise self._dead("the vsock back end exited before the agent was ready")
            try:
                self.agent = await AgentClient.connect(self.transport, timeout=max(0.1, deadline - time.monotonic()))
                self.agent_info = await self.agent.request("ping", timeout=max(0.1, deadline - time.monotonic()))
                return
            except (VsockError, AgentError, OSError) as exc:
                last = exc
                if self.agent is not None:
                    await self.agent.close()
                    self.agent = None
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)
        raise self._dead(f"the agent did not answer within {BOOT_TIMEOUT:.0f} s (last error: {last})")

    def _dead(self, reason: str) -> VMLaunchError:
        code = self.machine.process.returncode if self.machine and self.machine.process else None
        return VMLaunchError(reason, argv=self.machine.argv if self.machine else [], exit_code=code,
                             console_tail=tail(self.console_log, 3000) if self.console_log else "")

    async def stop(self) -> None:
        """Shut everything down and remove the run directory. Idempotent."""
        try:
            if self.agent is not None:
                try:
                    if self.machine is not None and self.machine.alive():
                        await self.agent.request("shutdown", timeout=SHUTDOWN_TIMEOUT)
                except KataError as exc:
                    log.debug("agent shutdown: %s", exc)
                await self.agent.close()
                self.agent = None
            if self.machine is not None:
                await self.machine.shutdown(soft_timeout=SHUTDOWN_TIMEOUT)
        finally:
            # Each virtiofsd exits once QEMU has closed its connection; one
            # that QEMU never reached is killed at once.
            reached = self.machine is not None and self.machine.process is not None
            for daemon in self.fs_daemons:
                daemon.stop(grace=FS_STOP_TIMEOUT if reached else 0)
            self.fs_daemons = []
            if self.transport is not None:
                self.transport.close()
                self.transport = None
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
