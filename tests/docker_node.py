"""A private Docker daemon for end-to-end tests (Debian's docker.io 20.10).

Everything it has is its own: data root, exec root, API socket, pid file, the
containerd it starts and manages, and a network namespace the node makes, in
which dockerd runs. dockerd's docker0 bridge, its iptables rules, docker-proxy
and every container veth libnetwork makes live in that namespace only, so the
host's network is never touched. The daemon's configuration file is
contrib/docker/daemon.json as shipped (the runtime registration users merge
into /etc/docker/daemon.json); everything else is given as flags, since
dockerd refuses an option given both ways.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.oci_helpers import owned_container

REPO = Path(__file__).resolve().parent.parent
DAEMON_JSON = REPO / "contrib" / "docker" / "daemon.json"
DOCKERD = "/usr/sbin/dockerd"
# Not `docker` from PATH: /usr/local/bin/docker on these machines is an
# unrelated newer client; Debian's matches the daemon's API version.
DOCKER = "/usr/bin/docker"
IMAGE = "localhost/busybox:kata-py-test"
# What dockerd makes at fixed paths whatever its flags say (its identity key
# has no flag, only a daemon.json key, and daemon.json is the shipped snippet):
# removed again when this node made them, a directory only when left empty.
FIXED_PATHS = (Path("/etc/docker/key.json"), Path("/etc/docker"), Path("/run/docker/plugins"), Path("/run/docker"))

_COUNTER = itertools.count()


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # The kernel escapes space, tab, newline and backslash as \ooo.
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]))
    return points


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


class KataLogCatcher(threading.Thread):
    """Copies each container's kata-py log (`--log <bundle>/log.json`, as
    containerd's runc shim passes it) while the bundle exists: a failed create
    removes the bundle at once, and the error in it is the one place kata-py's
    own reason is written down."""

    def __init__(self, task_dir: Path, into: Path) -> None:
        super().__init__(daemon=True)
        self.task_dir = task_dir
        self.into = into
        into.mkdir()
        self.logs: dict[str, str] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sweep()

    def sweep(self) -> None:
        for log in self.task_dir.glob("*/*/log.json"):
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue  # the bundle went meanwhile
            container_id = log.parent.name
            if container_id.startswith("."):
                continue  # containerd renames a bundle it deletes to .<id>: the same log
            with self.lock:
                if len(text) > len(self.logs.get(container_id, "")):
                    self.logs[container_id] = text
                    (self.into / f"{container_id}.log").write_text(text)

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        self.sweep()

    def errors(self) -> list[str]:
        with self.lock:
            return [f"{cid[:12]}: {line}" for cid, text in self.logs.items() for line in text.splitlines()
                    if '"level": "error"' in line or '"level":"error"' in line or "level=error" in line]


class DockerNode:
    def __init__(self) -> None:
        # Short: unix socket paths under it (containerd's among them) must fit in 108 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="kpd-"))
        self.data_root = self.directory / "data"
        self.exec_root = self.directory / "exec"
        self.socket = self.directory / "docker.sock"
        self.log_path = self.directory / "dockerd.log"
        self.netns = f"kpt-docker-{os.getpid()}-{next(_COUNTER)}"
        self.netns_path = f"/run/netns/{self.netns}"
        self.made_fixed_paths = [p for p in FIXED_PATHS if not p.exists()]
        # For the check that the daemon's bridge is not made on the host.
        self.host_had_docker0 = Path("/sys/class/net/docker0").exists()
        self.proc: subprocess.Popen | None = None
        self.catcher: KataLogCatcher | None = None
        self.log_offset = 0
        self.errors_before: set[str] = set()
        self.env = dict(os.environ, DOCKER_CONFIG=str(self.directory / "client"))
        # The daemon finds containerd, its shim, docker-proxy and iptables on PATH.
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from pyroute2 import IPRoute, netns

        netns.create(self.netns)
        with IPRoute(netns=self.netns, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        self.catcher = KataLogCatcher(
            self.exec_root / "containerd" / "daemon" / "io.containerd.runtime.v2.task", self.directory / "kata-logs")
        self.catcher.start()
        log = open(self.log_path, "wb")
        # nsenter --net only: `ip netns exec` would also remount /sys, and the
        # daemon would not see the host's cgroup hierarchies it puts containers in.
        # The environment goes down to containerd, its shims and kata-py, whose
        # KATA_PY_RUN_DIR marks this test session's monitors and VMs.
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.netns_path}", DOCKERD,
             "--config-file", str(DAEMON_JSON),
             "--data-root", str(self.data_root),
             "--exec-root", str(self.exec_root),
             "--host", f"unix://{self.socket}",
             "--pidfile", str(self.directory / "dockerd.pid"),
             "--exec-opt", "native.cgroupdriver=cgroupfs",
             "--shutdown-timeout", "5",
             "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self("version", timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not answer within 60 s:\n{self.log_tail()}")
            time.sleep(0.2)

    # -- driving it ---------------------------------------------------------------------------

    def argv(self, *args) -> list[str]:
        return [DOCKER, "--host", f"unix://{self.socket}", *map(str, args)]

    def __call__(self, *args, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        if "input" not in kwargs:
            kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(*args), env=self.env, timeout=timeout, **kwargs)

    def in_netns(self, *argv, timeout: float = 180) -> subprocess.CompletedProcess:
        """A command on the node: inside its network namespace, nothing else changed."""
        return subprocess.run(["nsenter", f"--net={self.netns_path}", *map(str, argv)], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def import_image(self, tar: Path, reference: str = IMAGE) -> None:
        result = self("import", tar, reference)
        assert result.returncode == 0, result.stderr.decode()

    # -- what the daemon made -----------------------------------------------------------------

    def monitors(self, container_id: str | None = None) -> dict[int, list[str]]:
        """kata-py monitors this daemon's shims started (their --root is under
        its exec root), by pid: argv."""
        found = {}
        for pid in _pids():
            argv = _argv(pid)
            owned = owned_container(argv)
            if owned is None:
                continue
            root, owned_id = owned
            if root.startswith(f"{self.exec_root}/") and container_id in (None, owned_id):
                found[pid] = argv
        return found

    def runtime_root(self, container_id: str) -> Path:
        """The --root Docker gave kata-py for this running container (its
        state directory's parent), read from the container's monitor."""
        monitors = self.monitors(container_id)
        assert len(monitors) == 1, monitors
        return Path(owned_container(next(iter(monitors.values())))[0])

    def own_processes(self) -> dict[int, list[str]]:
        """Every process whose command line names this node's directory
        (containerd, shims, monitors), dockerd aside."""
        me = str(self.directory)
        found = {}
        for pid in _pids():
            if pid == os.getpid() or (self.proc is not None and pid == self.proc.pid):
                continue
            argv = _argv(pid)
            if any(me in arg for arg in argv):
                found[pid] = argv
        return found

    def mounts(self) -> list[str]:
        return [p for p in _mountpoints() if p == str(self.directory) or p.startswith(f"{self.directory}/")]

    def kill_monitors(self, container_id: str | None = None) -> list[str]:
        """SIGKILL this daemon's kata-py monitors: the way out when a container
        hangs in create (a shim waits on it); QEMU dies with its monitor."""
        killed = []
        for pid, argv in self.monitors(container_id).items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{pid}: {' '.join(argv)[:160]}")
            except ProcessLookupError:
                pass
        return killed

    # -- diagnostics --------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dockerd log)"

    def mark(self) -> None:
        """Start of a test: explain() reports what came after."""
        try:
            self.log_offset = self.log_path.stat().st_size
        except OSError:
            self.log_offset = 0
        if self.catcher is not None:
            self.catcher.sweep()
            self.errors_before = set(self.catcher.errors())

    def explain(self, result: subprocess.CompletedProcess | None = None) -> str:
        """The docker command's result with kata-py's errors and the daemon's
        (dockerd's and its containerd's) warnings and errors since mark()."""
        parts = []
        if result is not None:
            parts.append(f"docker exited {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}")
        if self.catcher is not None:
            self.catcher.sweep()
            new = [e for e in self.catcher.errors() if e not in self.errors_before]
            parts.append("kata-py log errors:\n" + ("\n".join(new) or "(none)"))
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            text = ""
        bad = [line[:600] for line in text.splitlines() if "level=error" in line or "level=warning" in line]
        parts.append("dockerd/containerd warnings and errors:\n" + ("\n".join(bad[-30:]) or "(none)"))
        return "\n".join(parts)

    def keep_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():
            shutil.copy(self.log_path, dest / "dockerd.log")
        if self.catcher is not None and self.catcher.into.exists():
            shutil.copytree(self.catcher.into, dest / "kata-logs", dirs_exist_ok=True)

    # -- teardown -----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Remove all containers, stop dockerd and its containerd, unmount
        everything under the node's directory, delete the namespace and the
        directory. Returns what had to be forced (processes killed, mounts
        detached), for the caller to judge."""
        forced = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                listed = self("ps", "--all", "--quiet", "--no-trunc", timeout=60).stdout.decode().split()
            except subprocess.TimeoutExpired:
                listed = []
            for container_id in listed:
                try:
                    removed = self("rm", "--force", container_id, timeout=90)
                except subprocess.TimeoutExpired:
                    removed = None
                if removed is None or removed.returncode != 0:
                    forced += self.kill_monitors(container_id)
                    self("rm", "--force", container_id, timeout=90)
            # dockerd stops the containerd it started before it exits.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                forced.append(f"dockerd {self.proc.pid} (SIGKILL)")
                self.proc.kill()
                self.proc.wait()
        if self.catcher is not None:
            self.catcher.stop()
        # Anything of this node's still running (containerd, a shim, a monitor)
        # would hold mounts and VMs: killed, and reported.
        for pid, argv in self.own_processes().items():
            try:
                os.kill(pid, signal.SIGKILL)
                forced.append(f"{pid}: {' '.join(argv)[:160]}")
            except ProcessLookupError:
                pass
        for point in sorted(self.mounts(), key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", point], capture_output=True)
            forced.append(f"mount {point}")
        from pyroute2 import netns

        if self.netns in netns.listnetns():
            netns.remove(self.netns)
        shutil.rmtree(self.directory, ignore_errors=True)
        for made in self.made_fixed_paths:
            try:
                made.rmdir() if made.is_dir() else made.unlink()
            except OSError:
                pass  # gone, or not empty: another daemon uses it now
        return forced
