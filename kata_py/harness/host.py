"""The host side of one harness run: what it plants (a directory of its own
in the rootfs, canary files beside it, a marker process, TCP listeners) and
the evidence each leaves. `close()` takes everything away again."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from ..oci.busybox import install_busybox
from .host_state import Disk, HostFacts, host_disks

log = logging.getLogger("kata_py.harness")


class Canary:
    """A host file outside the rootfs holding a secret. Mode 0666 in a 0755
    directory: file permissions never stand in for the boundary."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.secret = "canary-" + secrets.token_hex(12)
        self.content = f"kata-py harness canary {self.secret}\n".encode()
        path.write_bytes(self.content)
        os.chmod(path, 0o666)
        self.links = 1

    def breaches(self, container_text: str) -> list[str]:
        """What the container did to it, as the host sees it; puts it back."""
        found = []
        if self.secret in container_text:
            where = next((line.split("=", 1)[1].split(": ", 1)[0] for line in container_text.splitlines()
                          if self.secret in line and "=" in line), "")
            found.append("read its secret" + (f" through {where}" if where else ""))
        try:
            st = os.stat(self.path)
            if self.path.read_bytes() != self.content:
                found.append("changed its content")
                self.path.write_bytes(self.content)
            if st.st_nlink > self.links:
                found.append(f"gave it {st.st_nlink - self.links} more hard link(s)")
        except FileNotFoundError:
            found.append("removed it")
        return found


class Marker:
    """A host process with a unique word in its argv and a secret in its
    environment, for the container to look for, read and signal."""

    def __init__(self, token: str) -> None:
        self.word = f"kata-py-harness-marker-{token}"
        self.secret = "environ-" + secrets.token_hex(12)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KATA_PY_HARNESS_SECRET": self.secret}
        # It ends by itself within a second of the harness's end, however the harness ends.
        code = "import os, sys, time\nwhile os.getppid() == int(sys.argv[2]): time.sleep(1)"
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", code, self.word, str(os.getpid())], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self._wait_visible()

    def _wait_visible(self, timeout: float = 5.0) -> None:
        """Until its argv shows in /proc: right after exec the kernel may still
        report an empty cmdline, and a probe that looked then would find no
        marker and call a leak held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.word.encode() in Path(f"/proc/{self.pid}/cmdline").read_bytes():
                    return
            except OSError:
                pass
            time.sleep(0.01)

    def state(self) -> str:
        """Its scheduler state letter (T: stopped by a signal, t: by a tracer)."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "gone"

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Listener:
    """A TCP listener on a host address; records what reaches it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[str, bytes]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"harness-listener-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(256)
                except OSError:
                    data = b""
                self.received.append((f"{peer[0]}:{peer[1]}", data))

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close()


class HostSide:
    """One run's host fixtures. The rootfs gets one directory of the
    harness's own (its busybox, planted links, scratch space); canaries go
    in a directory beside the rootfs, on the same filesystem."""

    def __init__(self, rootfs: Path) -> None:
        self.token = secrets.token_hex(6)
        self.rootfs = rootfs.resolve()
        self.facts = HostFacts.gather()
        self.during: dict[str, dict] = {}   # probe name -> what `during` measured
        self.fixtures: dict[str, object] = {}  # probe name -> what its setup made, for its check
        self._undo: list[Callable[[], None]] = []
        self.plant_name = f".kata-py-harness-{self.token}"
        self.plant_dir = self.rootfs / self.plant_name
        self.plant_dir.mkdir(mode=0o755)
        self._undo.append(lambda: shutil.rmtree(self.plant_dir, ignore_errors=True))
        (self.plant_dir / "scratch").mkdir()
        os.chmod(self.plant_dir / "scratch", 0o1777)
        self.canary_dir = Path(tempfile.mkdtemp(dir=self.rootfs.parent, prefix=".kata-py-harness-canaries-"))
        self._undo.append(lambda: shutil.rmtree(self.canary_dir, ignore_errors=True))
        os.chmod(self.canary_dir, 0o755)
        self._marker: Marker | None = None
        self._disks: list[Disk] | None = None

    # -- in the container's view

    @property
    def plant(self) -> str:
        """The harness's directory as the container sees it."""
        return "/" + self.plant_name

    def install_busybox(self) -> str:
        """The harness's own busybox and applet links, so the probes run the
        same tools in any rootfs; returns its bin directory in the container."""
        install_busybox(self.plant_dir / "bin")
        return f"{self.plant}/bin"

    def canary(self, name: str) -> Canary:
        return Canary(self.canary_dir / name)

    def plant_symlink(self, name: str, target: str) -> str:
        os.symlink(target, self.plant_dir / name)
        return f"{self.plant}/{name}"

    def plant_hardlink(self, name: str, canary: Canary) -> str:
        os.link(canary.path, self.plant_dir / name)
        canary.links += 1
        return f"{self.plant}/{name}"

    def relative_climb(self, target: Path, extra_levels: int) -> str:
        """`../../..` from the harness's directory up past the rootfs's own
        root, then down to `target` (a host path beside the rootfs)."""
        ups = len(self.plant_dir.relative_to(self.rootfs.parent).parts) + extra_levels
        return "../" * ups + str(target.relative_to(self.rootfs.parent))

    # -- host fixtures made on demand

    def marker(self) -> Marker:
        if self._marker is None:
            self._marker = Marker(self.token)
            self._undo.append(self._marker.close)
        return self._marker

    def listener(self, address: str) -> Listener:
        listener = Listener(address)
        self._undo.append(listener.close)
        return listener

    def disks(self) -> list[Disk]:
        if self._disks is None:
            self._disks = host_disks()
        return self._disks

    def on_close(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def close(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - every other undo must still run
                log.warning("harness cleanup step failed: %s", exc)


def host_address() -> str | None:
    """A global IPv4 address of this host's (not loopback), for the network probe."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for message in ipr.get_addr(family=socket.AF_INET):
            address = message.get_attr("IFA_ADDRESS")
            if message["scope"] == 0 and address and not address.startswith("127."):
                return address
    return None

