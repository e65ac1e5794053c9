"""A runc-compatible runtime driven through its command line, with a state
root of its own: kata-py itself, runc, crun, or any executable that takes
runc's commands."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError, KataError
from ..hostsys import crun_preexec

KNOWN = {"runc": "runc", "crun": "crun", "runsc": "runsc"}  # name -> executable on PATH (Debian packages)
# Global flags a runtime needs on a host like the test machines: gVisor's
# ptrace platform (no KVM), and no network of its own (its netstack wants a
# network namespace set up for it, which the harness's spec does not make).
FLAGS = {"runsc": ["--network=none", "--platform=ptrace"]}
# runsc's sandbox process builds its root on a tmpfs it mounts, in a mount
# namespace of its own, over $TMPDIR (/tmp when unset), after it has dropped
# the capabilities that let root pass any directory: a TMPDIR below one that
# others cannot search (pytest's /tmp/pytest-of-root is 0700) fails it, and
# runsc reports only "waiting for sandbox to start: EOF". The first of these
# that it can reach is its TMPDIR; nothing is written there.
SANDBOX_TMPDIRS = ("TMPDIR", "/tmp", "/var/tmp")
# runsc's sandbox lives in the container's host cgroup, where its sentry's
# threads and, on the ptrace platform, a stub process per guest address space
# count against the spec's pids limit: at the harness's 128 the sentry
# panics once the probes have run a few processes ("error initializing first
# thread: resource temporarily unavailable") and the container is gone.
PIDS_FLOOR = {"runsc": 1024}


class HarnessError(KataError):
    """The harness could not run its battery (the runtime failed to create the container, ...)."""


class Runtime:
    def __init__(self, name: str, argv: list[str], root: Path) -> None:
        self.name = name
        self.argv = argv
        self.root = root
        # crun 1.8 refuses hybrid cgroups: each of its calls runs where the v2 mount is hidden.
        self.preexec = crun_preexec(name)
        self.env = runsc_env() if name == "runsc" else None
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def resolve(cls, spec: str, root: Path) -> "Runtime":
        if spec == "kata-py":
            return cls("kata-py", [sys.executable, "-m", "kata_py.cli.main"], root)
        if spec in KNOWN:
            path = shutil.which(KNOWN[spec])
            if path is None:
                raise ConfigError(f"--runtime {spec}: {KNOWN[spec]} is not installed (Debian package {spec})")
            return cls(spec, [path, *FLAGS.get(spec, [])], root)
        if os.sep in spec and os.access(spec, os.X_OK) and os.path.isfile(spec):
            return cls(os.path.basename(spec), [os.path.abspath(spec)], root)
        raise ConfigError(f"--runtime {spec}: expected kata-py, runc, crun, runsc or the path of an executable")

    def command(self, *args: str) -> list[str]:
        return [*self.argv, "--root", str(self.root), *args]

    def fit_limits(self, config: dict) -> str | None:
        """Raise a pids limit this runtime's own host processes would exhaust;
        the note that says so, or None."""
        floor = PIDS_FLOOR.get(self.name)
        pids = ((config.get("linux") or {}).get("resources") or {}).get("pids") or {}
        if floor is None or not pids.get("limit") or pids["limit"] >= floor:
            return None
        pids["limit"] = floor
        return (f"pids limit raised to {floor} for {self.name}: its sandbox's own threads and ptrace stubs "
                "count against it on the host")

    def version(self) -> str:
        try:
            result = subprocess.run([*self.argv, "--version"], capture_output=True, text=True, timeout=30,
                                    preexec_fn=self.preexec, env=self.env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        return (result.stdout.strip().splitlines() or ["unknown"])[0]

    def start(self, bundle: Path, container_id: str, log: Path) -> None:
        """`run --detach`. The container's init inherits its stdio, so it gets
        a file (`log`), never a pipe that would stay open as long as it runs."""
        with open(log, "wb") as out:
            result = subprocess.run(self.command("run", "--detach", "--bundle", str(bundle), container_id),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=900,
                                    preexec_fn=self.preexec, env=self.env)
        if result.returncode != 0:
            raise HarnessError(f"{self.name} could not run the harness container: "
                               f"{log.read_text(errors='replace').strip()[-500:]}")

    def exec(self, container_id: str, argv: list[str], timeout: float,
             leak_dir: Path | None = None) -> tuple[int, str]:
        """`exec`; with `leak_dir`, the process gets an fd on that host
        directory as its fd 3 (`--preserve-fds 1`): the leaked-fd control."""
        extra: list[str] = []
        preexec = self.preexec
        if leak_dir is not None:
            extra = ["--preserve-fds", "1"]
            preexec = _fd3_on(leak_dir, self.preexec)
        try:
            result = subprocess.run(self.command("exec", *extra, container_id, *argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                                    preexec_fn=preexec, close_fds=leak_dir is None, env=self.env)
        except subprocess.TimeoutExpired as exc:
            return -1, (exc.output or b"").decode(errors="replace") + f"\n(the exec ran past {timeout:.0f} s)"
        return result.returncode, result.stdout.decode(errors="replace")

    def exec_interactive(self, container_id: str, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(self.command("exec", container_id, *argv), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=self.preexec, env=self.env)

    def delete(self, container_id: str) -> str | None:
        """`delete --force`; the error, if it failed."""
        result = subprocess.run(self.command("delete", "--force", container_id), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=120, preexec_fn=self.preexec, env=self.env)
        if result.returncode != 0:
            return result.stderr.decode(errors="replace").strip()[-500:]
        return None


def runsc_env(candidates: tuple[str, ...] = SANDBOX_TMPDIRS) -> dict[str, str]:
    """runsc's environment: TMPDIR a directory its sandbox process can reach."""
    refused = []
    for candidate in candidates:
        path = tempfile.gettempdir() if candidate == "TMPDIR" else candidate
        blocker = unsearchable_above(path)
        if blocker is None:
            return dict(os.environ, TMPDIR=path)
        refused.append(f"{path} ({blocker})")
    raise HarnessError("runsc builds its sandbox's root over TMPDIR, which its sandbox process (unprivileged) "
                       "must reach through directories others can search: " + "; ".join(refused))


def unsearchable_above(path: str) -> str | None:
    """Why a process that cannot override permissions cannot reach `path`, or None."""
    real = Path(os.path.realpath(path))
    if not real.is_dir():
        return "not a directory"
    for parent in real.parents:
        try:
            mode = parent.stat().st_mode
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not mode & stat.S_IXOTH:
            return f"{parent} is mode {stat.S_IMODE(mode):04o}, not searchable by others"
    return None


def _fd3_on(directory: Path, then):
    """A preexec that opens `directory` as fd 3 (inherited across exec)."""
    def preexec() -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        if fd != 3:
            os.dup2(fd, 3)
            os.close(fd)
        os.set_inheritable(3, True)
        if then is not None:
            then()
    return preexec
