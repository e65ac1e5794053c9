"""One QEMU process: launch, QMP, and a soft-to-hard shutdown ladder.

Used as an async context manager; leaving the block always ends QEMU and
closes everything it opened, whatever happened inside.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import signal
import socket
from pathlib import Path

from qemu.qmp import QMPClient

from .. import hostsys, timing
from ..errors import VMLaunchError
from ..timing import mark
from . import jail
from .cmdline import VMConfig, build_argv
from .host_cgroup import HostCgroup, HostLimits

log = logging.getLogger(__name__)

QMP_GREETING_TIMEOUT = 30.0


class VMState(enum.Enum):
    NEW = "new"
    LAUNCHING = "launching"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting-down"
    STOPPED = "stopped"


def tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# The agent's console lines carry the guest's uptime: kata-agent[12.345]: ...
AGENT_CONSOLE_LINE = re.compile(rb"kata-agent\[(\d+\.\d+)\]: (started|listening)")


def guest_milestones(console_log: Path) -> dict:
    """Guest uptimes at which the agent started and began to listen, from the
    console log (for timing records; the guest is untrusted, so only numbers
    are taken, from the first 64 KiB)."""
    try:
        with open(console_log, "rb") as f:
            head = f.read(65536)
    except OSError:
        return {}
    found: dict = {}
    for match in AGENT_CONSOLE_LINE.finditer(head):
        found.setdefault(match.group(2).decode(), float(match.group(1)))
    return found


class QemuMachine:
    def __init__(self, config: VMConfig, run_dir: Path, host_cgroup: str | None = None,
                 host_limits: HostLimits | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        # The cgroup the runtime was given (OCI linux.cgroupsPath), with the
        # sandbox's limits; None: a cgroup of the VM's own (host_cgroup.py).
        self.host_cgroup = host_cgroup
        self.host_limits = host_limits
        self.state = VMState.NEW
        self.process: asyncio.subprocess.Process | jail.JailedProcess | None = None
        # QEMU runs jailed (kata_py/vmm/jail.py) unless $KATA_PY_JAIL=off.
        self.jailed = jail.enabled()
        self.jail: jail.Prepared | None = None
        self.qmp: QMPClient | None = None
        self.argv: list[str] = []
        self.stderr_log = run_dir / "qemu.log"
        self.exit_code: int | None = None
        self.cgroup: HostCgroup | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def __aenter__(self) -> "QemuMachine":
        await self.launch()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    async def launch(self) -> None:
        assert self.state is VMState.NEW, self.state
        self.state = VMState.LAUNCHING
        self.cgroup = HostCgroup(self.run_dir.name, self.config.memory_mib, self.config.accel,
                                 path=self.host_cgroup, limits=self.host_limits)
        self.cgroup.create()  # HostCgroupError: QEMU never runs without its limits
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def preexec() -> None:
            hostsys.die_with_parent()   # a guest never runs on with nobody to stop it
            self.cgroup.join()

        try:
            self.argv = build_argv(self.config, theirs.fileno())
            with open(self.stderr_log, "wb") as err:
                if self.jailed:
                    self.process = await self._spawn_jailed(theirs.fileno(), err, preexec)
                else:
                    self.process = await asyncio.create_subprocess_exec(
                        *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err,
                        pass_fds=[theirs.fileno(), *self.config.pass_fds], preexec_fn=preexec,
                        # What QEMU creates (the QMP socket, the console log) is 0600: its owner's
                        # alone. (9p passthrough sets the modes the guest asks for itself.)
                        start_new_session=True, umask=0o177)
            theirs.close()
            mark("qemu_spawned", qemu_pid=self.process.pid)
            self.qmp = QMPClient(self.config.name)
            connect = asyncio.ensure_future(self.qmp.connect(ours))
            exited = asyncio.ensure_future(self.process.wait())
            done, _ = await asyncio.wait({connect, exited}, timeout=QMP_GREETING_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            if connect not in done or connect.exception() is not None:
                connect.cancel()
                await asyncio.gather(connect, return_exceptions=True)
                # A QEMU that dies at start-up closes QMP first; give it a moment
                # to exit so the error carries its status and its last words.
                await asyncio.wait({exited}, timeout=5)
                reason = "QEMU exited during start-up" if exited.done() else "QEMU did not answer on QMP"
                raise self._launch_error(reason)
            exited.cancel()
            mark("qmp_ready")
            self.state = VMState.RUNNING
        except BaseException:
            ours.close()
            theirs.close()
            await self.shutdown()
            raise

    async def _spawn_jailed(self, qmp_fd: int, err, preexec) -> jail.JailedProcess:
        """Start QEMU through the jail's launcher; QEMU becomes our child."""
        root = self.run_dir / jail.ROOT_NAME
        root.mkdir(mode=0o700, exist_ok=True)
        try:
            self.jail = jail.prepare(self.argv, root, self.config.accel, hostname=self.config.name[:64])
        except (jail.JailError, OSError) as exc:
            raise VMLaunchError(f"cannot jail QEMU: {exc}", argv=self.argv) from exc
        spec_r, spec_w = os.pipe()
        report_r, report_w = os.pipe()
        try:
            os.write(spec_w, jail.encode_spec(self.jail.spec))  # a few KiB: within the pipe's buffer
            os.close(spec_w)
            spec_w = -1
            pass_fds = [qmp_fd, *self.config.pass_fds, *self.jail.pass_fds]
            if hostsys.fork_enabled():
                launcher = jail.JailedProcess(jail.fork_launcher(spec_r, report_w, pass_fds, err.fileno(), preexec))
            else:
                argv, env = jail.launcher_argv(spec_r, report_w)
                launcher = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                    pass_fds=[spec_r, report_w, *pass_fds], preexec_fn=preexec, start_new_session=True,
                    umask=0o177)
            os.close(report_w)
            report_w = -1
            code = await launcher.wait()
            report = os.read(report_r, 64).strip()
        finally:
            for fd in (spec_r, spec_w, report_r, report_w):
                if fd >= 0:
                    os.close(fd)
        if code != 0 or not report.isdigit():
            raise self._launch_error(f"the jail's launcher failed (status {code})")
        process = jail.JailedProcess(int(report))
        self.jail.close()               # QEMU holds its own copies
        for helper in self.jail.helpers:
            helper.close_ours()
            if self.cgroup is not None and helper.pid is not None:
                self.cgroup.adopt(helper.pid)
        return process

    def _launch_error(self, reason: str) -> VMLaunchError:
        code = self.process.returncode if self.process else None
        console = tail(self.config.console_log, 2000)
        stderr = tail(self.stderr_log, 2000).strip()
        if stderr:
            reason += f": {stderr.splitlines()[-1]}"
        return VMLaunchError(reason, argv=self.argv, exit_code=code,
                             console_tail=(stderr + "\n" + console).strip())

    async def query_status(self) -> str:
        reply = await self.qmp.execute("query-status")
        return reply["status"]

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit; None if it is still running after `timeout`."""
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    async def shutdown(self, soft_timeout: float = 0.0, quit_timeout: float = 3.0,
                       term_timeout: float = 2.0) -> None:
        """End QEMU: wait for the guest to power off, then QMP quit, SIGTERM, SIGKILL.

        Idempotent, and always closes the QMP connection.
        """
        if self.state is VMState.STOPPED:
            return
        self.state = VMState.SHUTTING_DOWN
        try:
            if self.alive() and soft_timeout:
                await self.wait(soft_timeout)
            if self.alive() and self.qmp is not None and self.qmp.runstate.name == "RUNNING":
                try:
                    await asyncio.wait_for(self.qmp.execute("quit"), quit_timeout)
                except Exception as exc:  # QEMU may close the socket mid-reply; that's fine
                    log.debug("qmp quit: %r", exc)
                await self.wait(quit_timeout)
            if self.alive():
                self.process.send_signal(signal.SIGTERM)
                if await self.wait(term_timeout) is None:
                    self.process.kill()
                    await self.process.wait()
        finally:
            if self.qmp is not None:
                try:
                    await asyncio.wait_for(self.qmp.disconnect(), 2.0)
                except Exception as exc:
                    log.debug("qmp disconnect: %r", exc)
            if self.process is not None:
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()
                self.exit_code = self.process.returncode
                if timing.log.isEnabledFor(logging.INFO):
                    mark("qemu_exited", guest=guest_milestones(self.config.console_log))
            if self.jail is not None:
                jail.release(self.jail)
                self.jail = None
            if self.cgroup is not None:
                self.cgroup.remove()
            self.state = VMState.STOPPED
