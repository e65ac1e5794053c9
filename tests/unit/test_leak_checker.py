"""The leak checker (tests/leaks.py) sees each kind of leak it is for, only
within its scope, and nothing once the leak is gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.leaks import LeakChecker


@pytest.fixture
def scope(tmp_path):
    run_dir, root, temp = tmp_path / "run", tmp_path / "root", tmp_path / "tmp"
    for directory in (run_dir, root, temp):
        directory.mkdir()
    return run_dir, root, temp, LeakChecker(roots=[root], run_dir=run_dir, temp_dir=temp,
                                            tokens=["c-test", f"vm-leak{os.getpid()}"])


def test_processes_files_sockets_and_dirs(scope):
    run_dir, root, temp, checker = scope
    before = checker.snapshot()
    # Scoped by environment (as a QEMU's back end is); after exec its child
    # becomes a zombie that the `sleep` never reaps.
    by_env = subprocess.Popen(["sh", "-c", "sleep 0 & exec sleep 60"],
                              env=dict(os.environ, KATA_PY_RUN_DIR=str(run_dir)))
    # Scoped by command line (as a monitor's --root is).
    by_cmdline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(root)])
    # Not ours: neither names the scope.
    other = subprocess.Popen(["sleep", "60"])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run_dir / "vsock.sock"))
    (root / "c1").mkdir()
    (temp / "kata-leftover").mkdir()
    try:
        deadline = time.monotonic() + 10
        while True:  # until the `sleep 0` has exited, unreaped
            found = checker.leaks(before)
            processes = "\n".join(found.get("processes", []))
            if "zombie" in processes or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert str(by_env.pid) in processes and str(by_cmdline.pid) in processes
        assert str(other.pid) not in processes
        assert "zombie child of" in processes
        assert found["sockets"] == [str(run_dir / "vsock.sock")]
        assert found["files"] == [str(run_dir / "vsock.sock")]
        assert found["state_dirs"] == [str(root / "c1")]
        assert found["temp_entries"] == [str(temp / "kata-leftover")]
    finally:
        for proc in (by_env, by_cmdline, other):
            proc.kill()
            proc.wait()
        listener.close()
    (run_dir / "vsock.sock").unlink()
    (root / "c1").rmdir()
    (temp / "kata-leftover").rmdir()
    assert checker.wait_clean(before, timeout=5) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_mounts_and_cgroups(scope, tmp_path):
    run_dir, root, temp, checker = scope
    before = checker.snapshot()
    target = root / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    # One named after a container, one as kata-py names a VM's; and another
    # session's VM cgroup, which is not ours to count.
    cgroups = [f"/sys/fs/cgroup/pids/kata-py-c-test-{os.getpid()}",
               f"/sys/fs/cgroup/pids/kata-py/vm-leak{os.getpid()}",
               f"/sys/fs/cgroup/pids/kata-py/vm-other{os.getpid()}"]
    made = []
    for cgroup in cgroups:
        try:
            os.makedirs(cgroup)
            made.append(cgroup)
        except OSError:
            pass  # no writable pids hierarchy here: the mount is checked alone
    try:
        found = checker.leaks(before)
        assert [entry.split(" ")[0] for entry in found["mounts"]] == [str(target)]
        assert found.get("cgroups", []) == sorted(c for c in made if "other" not in c)
    finally:
        subprocess.run(["umount", str(target)], check=True)
        for cgroup in made:
            os.rmdir(cgroup)
    target.rmdir()
    assert checker.leaks(before) == {}


def test_a_process_of_before_that_changed_state_is_no_leak(scope):
    """Running when the snapshot was taken, sleeping now: the same process."""
    run_dir, _, _, checker = scope
    busy = subprocess.Popen(["sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; exec sleep 60"],
                            env=dict(os.environ, KATA_PY_RUN_DIR=str(run_dir)))
    try:
        deadline = time.monotonic() + 10
        while True:
            before = checker.snapshot()
            [proc] = [p for p in before.processes if p.pid == busy.pid]
            if proc.state == "R" or time.monotonic() > deadline:
                break
        assert proc.state == "R"
        while open(f"/proc/{busy.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "S":
            time.sleep(0.05)
        assert checker.leaks(before) == {}
    finally:
        busy.kill()
        busy.wait()
