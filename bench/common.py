"""What the benchmark sections share: statistics, timed runs, bundles, peers.

Every figure is the median of several runs with their min and max
(`summary`); peers are measured in the same invocation, interleaved, so a
slow spell of the host (other work on a 2-core machine) hits them alike.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kata_py.hostsys import crun_preexec

REPO = Path(__file__).resolve().parent.parent
KATA = REPO / ".venv" / "bin" / "kata-py"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
RUNTIMES = ("kata-py", "runc", "crun", "runsc")
# kata-py with the guest image of before the project built its own kernel:
# the same userland on Debian's generic kernel (modules, initramfs). Measured
# beside kata-py where the kernel is the lever (cold start, memory).
GENERIC = "kata-py-generic"
GENERIC_ENV = {"KATA_PY_GUEST_KERNEL": "debian"}
# kata-py with its helpers started as new interpreters (KATA_PY_FORK=off): the
# owner, the exec relay and the jail's launcher as before they were forked.
# Same image, root and log as kata-py, in the same rounds.
NOFORK = "kata-py-nofork"
NOFORK_ENV = {"KATA_PY_FORK": "off"}
# kata-py whose guest agent forks no process ahead for the first container's
# (KATA_PY_GUEST_PREFORK=off): it forks it at `create`, as before.
NOPREFORK = "kata-py-noprefork"
NOPREFORK_ENV = {"KATA_PY_GUEST_PREFORK": "off"}
# The kata-py variants above, each kata-py itself under an environment of its own.
VARIANT_ENV = {NOFORK: NOFORK_ENV, NOPREFORK: NOPREFORK_ENV}
# runsc on this host: ptrace is the platform that works without KVM, and its
# netstack needs CAP_NET_ADMIN setups we do not want: no network.
RUNSC_FLAGS = ["--network=none", "--platform=ptrace"]


def summary(samples: list[float], digits: int = 4) -> dict:
    if not samples:
        return {"runs": 0}
    return {"median": round(statistics.median(samples), digits), "min": round(min(samples), digits),
            "max": round(max(samples), digits), "runs": len(samples)}


@dataclass
class Timed:
    wall: float      # seconds from spawn to exit
    cpu: float       # user+system seconds of the process and every child it waited for
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""


def run_timed(argv: list, preexec_fn=None, env: dict | None = None, timeout: float = 300,
              stdin=subprocess.DEVNULL, capture: bool = True) -> Timed:
    """Run argv, timing it with wait4: wall time and the CPU time of its whole
    tree (children that were waited for add theirs to it). Output goes to
    temporary files, not pipes, so that nothing but wait4 reaps the process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sink_out, sink_err = (out, err) if capture else (subprocess.DEVNULL, subprocess.DEVNULL)
        started = time.monotonic()
        proc = subprocess.Popen([str(a) for a in argv], stdin=stdin, stdout=sink_out, stderr=sink_err,
                                preexec_fn=preexec_fn, env=env)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if wall >= timeout:
            raise subprocess.TimeoutExpired(argv, timeout)
        out.seek(0)
        err.seek(0)
        return Timed(wall, usage.ru_utime + usage.ru_stime, proc.returncode, out.read(), err.read())


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"bench: {message}")


# ------------------------------------------------------------------ bundles

def make_rootfs(rootfs: Path) -> Path:
    """A busybox rootfs (Debian's busybox-static; no registry here)."""
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    for name in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (rootfs / name).mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    return rootfs


def make_bundle(directory: Path, args: list[str], rootfs: Path) -> Path:
    """A bundle as `runc spec` would write it (minus the terminal), sharing one rootfs."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/"},
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                                 {"type": "network"}]},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


# -------------------------------------------------------------------- peers

class Peers:
    """The runtimes side by side: argv for run/exec/delete and their state roots."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.roots = {name: work / f"root-{name}" for name in RUNTIMES + (GENERIC,)}
        self.log = work / "kata-py.log"
        self.generic_log = work / "kata-py-generic.log"
        self.available: dict[str, str] = {}   # name -> "" when usable, else why not

    def binary(self, name: str) -> list[str]:
        if name == "kata-py":
            return [str(KATA), "--root", str(self.roots[name]), "--log", str(self.log)]
        if name == GENERIC:
            return [str(KATA), "--root", str(self.roots[name]), "--log", str(self.generic_log)]
        base = [shutil.which(name) or name, "--root", str(self.roots[name])]
        return base[:1] + RUNSC_FLAGS + base[1:] if name == "runsc" else base

    def preexec(self, name: str):
        return crun_preexec(name)

    def env(self, name: str) -> dict | None:
        return dict(os.environ, **GENERIC_ENV) if name == GENERIC else None

    def run(self, name: str, bundle: Path, container_id: str, **kwargs) -> Timed:
        kwargs.setdefault("env", self.env(name))
        return run_timed(self.binary(name) + ["run", "--bundle", bundle, container_id],
                         preexec_fn=self.preexec(name), **kwargs)

    def wait_deleted(self, name: str, container_id: str, timeout: float = 120) -> None:
        """kata-py's `run` returns at the container's exit and deletes it behind
        (the VM's teardown): wait for that, untimed, so each round starts on a
        quiet host and its timing records end with its own teardown."""
        state = self.roots[name] / container_id
        deadline = time.monotonic() + timeout
        while state.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def start_detached(self, name: str, bundle: Path, container_id: str) -> None:
        result = run_timed(self.binary(name) + ["run", "--detach", "--bundle", bundle, container_id],
                           preexec_fn=self.preexec(name), capture=False, timeout=180, env=self.env(name))
        if result.returncode != 0:
            raise RuntimeError(f"{name} run --detach {container_id} failed ({result.returncode})")

    def exec_argv(self, name: str, container_id: str, args: list[str]) -> list[str]:
        return self.binary(name) + ["exec", container_id] + args

    def delete(self, name: str, container_id: str) -> None:
        subprocess.run(self.binary(name) + ["delete", "--force", container_id], preexec_fn=self.preexec(name),
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def probe(self, bundle: Path) -> None:
        """Which peers run a container here; an unusable one is reported with
        its error, never given a number."""
        for name in RUNTIMES + (GENERIC,):
            if name in ("kata-py", GENERIC):
                # Not probed: a run costs a whole cold start here, and the
                # sections measure it anyway (a failure shows there).
                self.available[name] = "" if KATA.exists() else f"{KATA} is missing (make setup)"
                continue
            binary = shutil.which(name)
            if binary is None or not os.path.exists(binary):
                self.available[name] = f"{name} is not installed"
                continue
            try:
                result = self.run(name, bundle, f"probe-{name}-{os.getpid()}", timeout=180)
            except subprocess.TimeoutExpired:
                self.available[name] = f"{name} run did not finish within 180 s"
                continue
            if result.returncode == 0:
                self.available[name] = ""
            else:
                err = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
                self.available[name] = f"{name} run exited {result.returncode}: {err[-1][:300] if err else ''}"
            self.delete(name, f"probe-{name}-{os.getpid()}")

    def usable(self) -> list[str]:
        return [name for name in RUNTIMES if self.available.get(name) == ""]


def host_facts() -> dict:
    from kata_py.vmm.host import qemu_version

    load = os.getloadavg()
    versions = {}
    for name in ("runc", "crun", "runsc"):
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            versions[name] = out[0] if out else "?"
    return {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "kernel": os.uname().release, "qemu": qemu_version(), "loadavg_at_start": [round(x, 2) for x in load],
            "versions": versions}
