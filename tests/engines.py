"""Real container engines for end-to-end tests: podman and containerd from
Debian, each with private storage, state and sockets under a test directory,
and a busybox image built locally (no registry is reachable)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.bundles import make_rootfs

IMAGE = "localhost/busybox:kata-py-test"


def kata_binary() -> str:
    """The kata-py entry point of the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "kata-py"
    return str(candidate) if candidate.exists() else shutil.which("kata-py")


def image_tar(directory: Path) -> Path:
    rootfs = make_rootfs(directory / "rootfs")
    tar = directory / "rootfs.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(rootfs, arcname=".")
    return tar


class Podman:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.conf = directory / "containers.conf"
        self.conf.write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'[engine.runtimes]\nkata-py = ["{kata_binary()}"]\n'
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n')
        # podman refuses a runroot path longer than 50 characters.
        self.runroot = Path(tempfile.mkdtemp(prefix="kp-podman-"))
        self.base = ["podman", "--root", str(directory / "storage"), "--runroot", str(self.runroot),
                     "--tmpdir", str(directory / "tmp")]
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.conf))

    def __call__(self, *args, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        if "input" not in kwargs:
            kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.base + [str(a) for a in args], env=self.env, timeout=timeout, **kwargs)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.base + [str(a) for a in args], env=self.env, **kwargs)

    def import_image(self, tar: Path) -> None:
        result = self("import", tar, IMAGE)
        assert result.returncode == 0, result.stderr

    def cleanup(self) -> None:
        self("rm", "--all", "--force", "--time", "0", timeout=120)
        # Podman's overlay storage leaves mounts behind unless told to go.
        self("system", "reset", "--force", timeout=120)
        shutil.rmtree(self.runroot, ignore_errors=True)


class Containerd:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.socket = directory / "containerd.sock"
        config = directory / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{directory / "root"}"\nstate = "{directory / "state"}"\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            '[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n')
        self.log = open(directory / "containerd.log", "wb")
        self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.proc.poll() is None, (directory / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)

    def ctr(self, *args, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(["ctr", "-a", str(self.socket), *map(str, args)], timeout=timeout, **kwargs)

    def stop(self) -> None:
        # Tasks first, so no shim (and no VM) outlives the daemon.
        for line in self.ctr("tasks", "ls", "-q", timeout=60).stdout.decode().split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", line, timeout=60)
            self.ctr("tasks", "delete", "-f", line, timeout=60)
        for line in self.ctr("containers", "ls", "-q", timeout=60).stdout.decode().split():
            self.ctr("containers", "rm", line, timeout=60)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        subprocess.run(["umount", "-R", str(self.directory / "root")], capture_output=True)
        subprocess.run(["umount", "-R", str(self.directory / "state")], capture_output=True)


def leftover_processes() -> list[str]:
    """kata-py monitors, vsock backends or QEMUs of containers still running,
    started by this test session (they carry its KATA_PY_RUN_DIR: engines pass
    their environment down to the runtime), so that other kata-py users of the
    machine do not count."""
    run_dir = os.environ["KATA_PY_RUN_DIR"].encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"KATA_PY_RUN_DIR=" + run_dir not in environ:
            continue
        if "kata_py.sandbox.owner" in cmdline or "kata_py.sandbox.relay" in cmdline or ("qemu-system" in cmdline and "kata-py-" in cmdline
                                                 and "kata-py-vm-" not in cmdline):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found
