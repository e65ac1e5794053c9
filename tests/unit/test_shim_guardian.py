"""The shim daemon's guardian: however the daemon ends, SIGKILL included,
what its pod left on the host (socket, log, pod directory) is removed and
the guardian is gone. The real `start` action and daemon, no containerd:
the daemon serves without one until a task is created."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kata_py.shim import leftovers, main as shim


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {predicate.__doc__ or predicate}")


def processes(needle: bytes, first: bytes = b"") -> list[int]:
    """Pids whose command line holds `needle` (and whose argv[0] starts with `first`)."""
    found = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
            except OSError:
                continue
            if needle in cmdline and cmdline.startswith(first):
                found.append(int(proc))
    return found


@pytest.fixture
def daemon(tmp_path):
    """A shim daemon of a pod of its own, started as containerd starts it;
    yields (pid, pod key, guardian's pid)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
    container_id = f"guarded-{os.getpid()}-{time.monotonic_ns()}"
    key = shim.pod_key("guardian-test", container_id)
    started = subprocess.run([sys.executable, "-m", "kata_py.shim.main", "-namespace", "guardian-test",
                              "-address", str(tmp_path / "none.sock"), "-publish-binary", "/bin/true",
                              "-id", container_id, "start"], cwd=bundle, capture_output=True, timeout=60)
    assert started.returncode == 0, started.stderr
    assert started.stdout.decode() == f"unix://{leftovers.socket_path(key)}"
    [pid] = wait_for(lambda: processes(f"-id\0{key}\0".encode()))
    [guardian] = wait_for(lambda: processes(f"\0{key}\0".encode(), first=leftovers.TITLE.encode()))
    wait_for(lambda: leftovers.pod_dir(key).is_dir() and leftovers.serving(leftovers.socket_path(key)))
    try:
        yield pid, key, guardian
    finally:
        for each in (pid, guardian):
            try:
                os.kill(each, signal.SIGKILL)
            except ProcessLookupError:
                pass


def left_of(key: str) -> list[str]:
    return [path.name for path in (leftovers.pod_dir(key), leftovers.socket_path(key),
                                   leftovers.shim_dir() / f"{key}.log") if path.exists()]


def handles_sigterm(pid: int) -> bool:
    """(the daemon's event loop is running)"""
    caught = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie of this test's own (the shim daemon is not our child: `start` left it).
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_of_the_pod_is_left_however_the_shim_ends(daemon, signum):
    pid, key, guardian = daemon
    assert len(left_of(key)) == 3
    wait_for(lambda: handles_sigterm(pid))     # its own orderly end, when it is ready for one
    os.kill(pid, signum)
    wait_for(lambda: gone(pid) and gone(guardian))
    assert left_of(key) == []


def test_the_guardian_waits_as_a_shell(daemon):
    """Python only once the daemon is gone: ~1 MiB while it waits."""
    _, _, guardian = daemon
    assert os.path.basename(os.readlink(f"/proc/{guardian}/exe")) in ("dash", "bash", "sh", "busybox")
    rss_kib = int(next(line for line in open(f"/proc/{guardian}/status") if line.startswith("VmRSS:")).split()[1])
    assert rss_kib < 4096, rss_kib


def test_the_guardian_holds_nothing_of_the_daemon(daemon):
    """Not its listening socket (else a dead shim would still read as
    serving), nor its mount namespace (it cleans as `delete` does)."""
    pid, key, guardian = daemon
    listener = os.readlink(f"/proc/{pid}/fd/{shim.SOCKET_FD}")
    held = {os.readlink(f"/proc/{guardian}/fd/{fd}") for fd in os.listdir(f"/proc/{guardian}/fd")}
    assert listener.startswith("socket:") and listener not in held
    assert os.readlink(f"/proc/{guardian}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
