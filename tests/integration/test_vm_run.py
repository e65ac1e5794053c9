"""`kata-py vm run` end to end: a fresh VM per command, under TCG here."""

import hashlib
import os
from functools import partial

import pytest

from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import cli

pytestmark = pytest.mark.vm

# `kata-py ARGS...` without --root: `vm run` boots a VM per command.
kata = partial(cli, None, timeout=300)


def assert_nothing_left():
    # The CLI exits only after QEMU and the vsock backend are reaped and the
    # run directory is removed.
    assert qemu_processes_under(RUN_DIR) == []
    leftovers = list(RUN_DIR.iterdir()) if RUN_DIR.exists() else []
    assert leftovers == []


def test_uname_is_the_guest_kernel(image):
    result = kata("vm", "run", "--", "uname", "-r")
    assert result.returncode == 0, result.stderr
    release = result.stdout.decode().strip()
    assert release == image.kernel_release
    assert release != os.uname().release
    assert_nothing_left()


@pytest.mark.parametrize("script,status", [("exit 7", 7), ("kill -9 $$", 137), ("kill -TERM $$", 143), ("true", 0)])
def test_exit_status(script, status):
    result = kata("vm", "run", "--", "sh", "-c", script)
    assert result.returncode == status, result.stderr
    assert_nothing_left()


def test_64mib_stdin_digest():
    data = os.urandom(64 << 20)
    result = kata("vm", "run", "--memory", "256", "--", "sha256sum", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert_nothing_left()


def test_64mib_stdout_count():
    result = kata("vm", "run", "--", "head", "-c", "67108864", "/dev/zero", stdin=open(os.devnull, "rb"))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 67108864
    assert result.stdout.count(0) == 67108864
    assert_nothing_left()


def test_stdout_and_stderr_stay_apart():
    result = kata("vm", "run", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"to-out\n", b"to-err\n")


def test_missing_command_is_a_clear_error():
    result = kata("vm", "run", "--", "/no/such/program")
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "no/such/program" in lines[0], lines
    assert_nothing_left()


def test_bad_flags_leave_nothing():
    result = kata("vm", "run", "--memory", "1", "--", "true")
    assert result.returncode == 1 and b"--memory" in result.stderr
    result = kata("vm", "run")
    assert result.returncode == 1 and b"needs a command" in result.stderr


def test_check_reports_the_accelerator():
    result = kata("check")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    accel_line = next(line for line in text.splitlines() if line.startswith("accelerator"))
    if os.path.exists("/sys/module/kvm_pvm") or not os.path.exists("/dev/kvm"):
        # On these hosts KVM cannot boot a stock guest: TCG, with the reason.
        assert "TCG" in accel_line
        assert ("kvm_pvm" in accel_line or "no /dev/kvm" in accel_line or "did not boot" in accel_line)
    assert "vsock" in text
    lines = {line.strip().split("  ", 1)[0]: line for line in text.splitlines()}
    assert "virtio-fs, one virtiofsd per VM" in lines["shared fs"]
    assert lines["qemu jail"].split()[2] == "on:"
    assert "rootfs.erofs" in lines["root disk"] and "sandbox)" in lines["kernel"]
    nine = kata("check", env=dict(os.environ, KATA_PY_SHARED_FS="9p")).stdout.decode()
    assert "virtio-9p" in next(line for line in nine.splitlines() if line.startswith("shared fs"))


def test_loopback_is_up_and_nothing_else():
    result = kata("vm", "run", "--", "sh", "-c", "ls /sys/class/net; ping -c 1 -W 5 127.0.0.1 >/dev/null && echo ping-ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["lo", "ping-ok"]
