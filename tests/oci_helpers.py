"""Helpers shared by the OCI CLI test modules."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import KATA, RUN_DIR, qemu_processes_under

OWNER = "kata_py.sandbox.owner"


def owned_container(argv: Sequence[str | bytes]) -> tuple[str, str] | None:
    """(state root, container id) of a kata-py container's sandbox owner,
    from its argv (its --container file lives in <root>/<id>/), else None."""
    # An owner forked from the CLI shows its command line as one string (setproctitle).
    argv = [word for a in argv for word in (a.decode(errors="replace") if isinstance(a, bytes) else a).split()]
    if OWNER not in argv or "--container" not in argv[:-1]:
        return None
    launch = Path(argv[argv.index("--container") + 1])
    return str(launch.parent.parent), launch.parent.name


def cli(root: Path | None, *args, input: bytes | None = None, stdin=None, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, io: Path | None = None, netns: str | None = None, log: Path | None = None,
        runtime: Sequence[str] = KATA, env: dict | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """`kata-py [--root ROOT] ARGS...`, run as a user would: the one way the
    tests run the CLI. stdin is /dev/null unless given.

    io: a directory whose files `stdout` and `stderr` take the output (appended
      to), for a create or a detached run or exec: those hand their stdio to the
      container's monitor, so give them files, not pipes we would wait on. The
      result holds what this call wrote to them.
    netns: run it inside the network namespace /run/netns/NETNS (nsenter --net=).
    log: `--log LOG --log-format json`.
    runtime: the runtime's own argv (another runtime, such as runc, to compare)."""
    argv = list(runtime)
    if root is not None:
        argv += ["--root", str(root)]
    if log is not None:
        argv += ["--log", str(log), "--log-format", "json"]
    argv += map(str, args)
    if netns is not None:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    if io is None:
        return subprocess.run(argv, input=input, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                              timeout=timeout)
    io.mkdir(parents=True, exist_ok=True)
    with open(io / "stdout", "ab") as out, open(io / "stderr", "ab") as err:
        start = out.tell(), err.tell()
        result = subprocess.run(argv, input=input, stdin=stdin, stdout=out, stderr=err, env=env, cwd=cwd,
                                timeout=timeout)
    with open(io / "stdout", "rb") as out, open(io / "stderr", "rb") as err:
        out.seek(start[0])
        err.seek(start[1])
        result.stdout, result.stderr = out.read(), err.read()
    return result


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def monitors_under(root: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            owned = owned_container(cmdline(int(proc.name)).split(b"\0"))
            if owned is not None and owned[0] == str(root):
                found.append(int(proc.name))
    return found


def assert_nothing_left(root: Path) -> None:
    """Nothing of the containers under `root` is left. A running VM factory's
    own directory and pooled VMs (kept under it) do not count.

    A foreground `run` returns its container's status as soon as the
    container has exited; the owner then tears the VM down and `run`'s
    deleter removes the container once the owner is gone: that is waited
    for (bounded), then nothing may be left."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (monitors_under(root) or (root.exists() and any(root.iterdir()))):
        time.sleep(0.1)
    entries = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert entries == [], f"left under --root: {entries}"
    assert monitors_under(root) == []
    factory = str(RUN_DIR / "factory").encode()
    assert [pid for pid in qemu_processes_under(RUN_DIR) if factory not in cmdline(pid)] == []
    sandboxes = sorted(p.name for p in RUN_DIR.iterdir() if p.name != "factory") if RUN_DIR.exists() else []
    assert sandboxes == [], f"left in the run directory: {sandboxes}"


def reap(pid: int, timeout: float = 30) -> int:
    """The exit status of a process re-parented to us (we are a subreaper)."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == os.getpid(), f"{pid} is not our child (parent {parent}): not re-parented to the subreaper"
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < deadline, f"process {pid} did not exit within {timeout} s"
        time.sleep(0.05)
