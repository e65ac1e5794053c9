"""podman (Debian's 4.3, with conmon) drives kata-py unchanged, as `--runtime`."""

import os
import time

import pytest

from tests.engines import IMAGE, Podman, image_tar, kata_binary, leftover_processes
from tests.terminal import drive_tty

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    directory = tmp_path_factory.mktemp("podman")
    engine = Podman(directory)
    engine.import_image(image_tar(directory))
    yield engine
    engine.cleanup()
    assert leftover_processes() == []


def test_run_rm_prints_the_guest_kernel(podman, image):
    result = podman("run", "--rm", "--runtime", "kata-py", "--network", "none", IMAGE, "uname", "-r")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == image.kernel_release != os.uname().release


def test_exit_code_propagates_through_full_runtime_path(podman):
    result = podman("run", "--rm", "--runtime", kata_binary(), "--network", "none", IMAGE, "sh", "-c", "exit 5")
    assert result.returncode == 5, result.stderr
    assert podman("ps", "-a", "-q").stdout.strip() == b""
    assert leftover_processes() == []


def test_detached_logs_exec_stop_rm(podman):
    name = "kp-detached"
    result = podman("run", "-d", "--name", name, "--runtime", "kata-py", "--network", "none", IMAGE,
                    "sh", "-c", "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 1; done")
    assert result.returncode == 0, result.stderr
    try:
        deadline = time.monotonic() + 60
        while b"started" not in podman("logs", name).stdout:
            assert time.monotonic() < deadline, "no log output"
            time.sleep(0.5)
        ps = podman("ps", "--format", "{{.Names}} {{.Status}}").stdout.decode()
        assert name in ps and "Up" in ps
        inspect = podman("inspect", "--format", "{{.State.Running}} {{.OCIRuntime}}", name).stdout.decode()
        assert inspect.split() == ["true", "kata-py"]
        execed = podman("exec", name, "sh", "-c", "echo from-exec; exit 4")
        assert (execed.returncode, execed.stdout) == (4, b"from-exec\n")
        started = time.monotonic()
        stop = podman("stop", "-t", "10", name)
        assert stop.returncode == 0, stop.stderr
        assert time.monotonic() - started < 10, "TERM was not delivered (stop waited for KILL)"
        assert b"bye" in podman("logs", name).stdout
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == b"0"
    finally:
        podman("rm", "-f", name)
    assert leftover_processes() == []


def test_stop_falls_back_to_kill(podman):
    name = "kp-stubborn"
    # PID 1 of the container ignores TERM (no handler): stop must KILL after the timeout.
    assert podman("run", "-d", "--name", name, "--runtime", "kata-py", "--network", "none", IMAGE,
                  "sh", "-c", "trap '' TERM; while :; do sleep 1; done").returncode == 0
    try:
        assert podman("stop", "-t", "2", name).returncode == 0
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == b"137"
    finally:
        podman("rm", "-f", name)


def test_kill(podman):
    name = "kp-kill"
    assert podman("run", "-d", "--name", name, "--runtime", "kata-py", "--network", "none", IMAGE,
                  "sleep", "1000").returncode == 0
    try:
        assert podman("kill", "--signal", "KILL", name).returncode == 0
        assert podman("wait", name).stdout.strip() == b"137"
    finally:
        podman("rm", "-f", name)


def test_run_interactive_tty(podman):
    status, seen = drive_tty(podman.base + ["run", "--rm", "-it", "--runtime", "kata-py", "--network", "none",
                                            IMAGE, "sh"],
                             [(b"", b"#"), (b"tty\r", b"/dev/pts/"), (b"echo tty-$((6*7))\r", b"tty-42"),
                              (b"exit 3\r", b"exit 3")], env=podman.env, timeout=120)
    assert status == 3


def test_exec_interactive_tty(podman):
    name = "kp-exec-tty"
    assert podman("run", "-d", "--name", name, "--runtime", "kata-py", "--network", "none", IMAGE,
                  "sleep", "1000").returncode == 0
    try:
        status, seen = drive_tty(podman.base + ["exec", "-it", name, "sh"],
                                 [(b"", b"#"), (b"echo in-exec-$((2+3))\r", b"in-exec-5"), (b"exit 2\r", b"exit 2")],
                                 env=podman.env, timeout=120)
        assert status == 2
    finally:
        podman("rm", "-f", "-t", "0", name)
    assert leftover_processes() == []


def test_resource_flags_reach_the_guest_cgroup(podman):
    result = podman("run", "--rm", "--runtime", "kata-py", "--network", "none", "--memory", "64m",
                    "--cpus", "0.5", "--pids-limit", "50", IMAGE,
                    "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/pids.max")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\n")[:3] == [str(64 << 20), "50000 100000", "50"]
