"""One virtiofsd per shared directory: the host end of a VM's virtio-fs.

The daemon is Debian's C virtiofsd (QEMU 7.2, /usr/lib/qemu/virtiofsd). It
serves one directory, the export, to one VM:

- **Sandboxed to the export**: `sandbox=namespace` puts it in new mount, pid
  and net namespaces and pivot_roots it into the export, so that whatever
  the guest asks for, the daemon itself can reach no host file outside it;
  its capabilities are reduced to the few a file server needs, and seccomp
  filters its system calls. The export's mounts are the ones of the mount
  namespace it starts in (a sandbox owner's private one); mounts added there
  later reach it only if the export is a shared mount point
  (kata_py/sandbox/share.py makes it one).
- **Ready before QEMU starts**: the vhost-user socket is bound and listening
  here, in the VM's run directory, and handed over as `--fd`; `start` returns
  once the daemon says it waits for QEMU, or raises VirtioFsError with its
  last words if it exits first.
- **Ends with the VM**: it serves one connection and exits when QEMU closes
  it; it dies with the process that started it (PR_SET_PDEATHSIG) and its
  namespace child with it (the daemon sets the same); `stop` kills its
  whole process group if it is still there.
- `announce_submounts`: each bind in the export (a rootfs, a bind source)
  appears in the guest as a submount with a device number of its own, so
  inode numbers of different host filesystems never collide (9p's
  multidevs=remap does the same).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from .. import hostsys
from ..errors import KataError

BINARY = "/usr/lib/qemu/virtiofsd"
READY_LINE = b"Waiting for vhost-user socket connection"
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 2.0
# Caching of attributes and directory entries in the guest: `auto` keeps them
# for a second (files change on the host rarely while a container runs: its
# rootfs and binds are its own), `none` asks the host every time.
CACHE_MODES = ("auto", "always", "none")


def installed() -> bool:
    """Whether the virtiofsd kata-py runs (QEMU 7.2's, whose options it uses) is here."""
    return os.access(BINARY, os.X_OK)


class VirtioFsError(KataError):
    """virtiofsd could not be started for a VM."""


def _fuse_option(value: str) -> str:
    """virtiofsd splits `-o` on commas; a backslash escapes one."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


class VirtioFsDaemon:
    def __init__(self, source: Path, tag: str, run_dir: Path, cache: str = "auto") -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"virtiofsd cache mode {cache!r}: use one of {CACHE_MODES}")
        self.source = Path(source)
        self.tag = tag
        self.cache = cache
        self.socket_path = Path(run_dir) / f"fs-{tag}.sock"
        self.log_path = Path(run_dir) / f"virtiofsd-{tag}.log"
        self.proc: subprocess.Popen | None = None

    def argv(self, fd: int) -> list[str]:
        return [BINARY, f"--fd={fd}", "-o", "source=" + _fuse_option(os.fspath(self.source)),
                "-o", f"sandbox=namespace,cache={self.cache},xattr,announce_submounts"]

    async def start(self) -> None:
        """Listen on the socket, start the daemon, wait until it is ready."""
        if self.proc is not None:
            raise VirtioFsError("virtiofsd already started")
        if not installed():
            raise VirtioFsError(f"{BINARY} is missing: install Debian's qemu-system-common (virtio-fs), "
                                "or select 9p (KATA_PY_SHARED_FS=9p)")
        if not self.source.is_dir():
            raise VirtioFsError(f"virtio-fs export {self.source} is not a directory")
        listener = self._listen()
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.argv(listener.fileno()), pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, close_fds=True, preexec_fn=hostsys.die_with_parent,
                    start_new_session=True)
        except OSError as exc:
            self.socket_path.unlink(missing_ok=True)
            raise VirtioFsError(f"cannot start {BINARY}: {exc.strerror or exc}") from exc
        finally:
            # The daemon holds the listener now: if it dies, QEMU's connection
            # is refused rather than left waiting on a socket nobody serves.
            listener.close()
        try:
            await self._wait_ready()
        except BaseException:
            self.stop(grace=0)
            raise

    def _listen(self) -> socket.socket:
        path = os.fspath(self.socket_path)
        if len(os.fsencode(path)) >= 108:
            raise VirtioFsError(f"socket path too long for AF_UNIX: {path}")
        try:
            return hostsys.listen_private(path, 1)
        except OSError as exc:
            raise VirtioFsError(f"cannot listen on {path}: {exc.strerror or exc}") from exc

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        delay = 0.002
        while True:
            if READY_LINE in self._log():
                return
            code = self.proc.poll()
            if code is not None:
                raise VirtioFsError(f"virtiofsd for {self.source} exited at start-up (status {code}): "
                                    f"{self._last_words()}")
            if time.monotonic() > deadline:
                raise VirtioFsError(f"virtiofsd for {self.source} was not ready within {READY_TIMEOUT:.0f} s: "
                                    f"{self._last_words()}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _log(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                return f.read(65536)
        except OSError:
            return b""

    def _last_words(self) -> str:
        lines = [line for line in self._log().decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"

    def qemu_args(self, bus: str) -> list[str]:
        # QEMU option values escape a comma by doubling it.
        path = os.fspath(self.socket_path).replace(",", ",,")
        device = "vhost-user-fs-device" if bus == "mmio" else "vhost-user-fs-pci"
        chardev = f"char-fs-{self.tag}"
        return ["-chardev", f"socket,id={chardev},path={path}",
                "-device", f"{device},chardev={chardev},tag={self.tag},queue-size=1024"]

    def pids(self) -> list[int]:
        """The daemon and its namespace child (for the sandbox's host cgroup)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        found = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                found += [int(pid) for pid in f.read().split()]
        except OSError:
            pass
        return found

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """End the daemon and remove its socket. Idempotent. `grace`: how long
        it may take to exit by itself (it does once QEMU has closed the
        connection); a daemon that never got one is killed at once."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if grace > 0:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                # Still unreaped, so the group's id is still the daemon's own:
                # this reaches its namespace child too.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.socket_path.unlink(missing_ok=True)
