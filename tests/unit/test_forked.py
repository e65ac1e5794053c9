"""kata_py.oci.forked: an owner or relay forked from the CLI is the process
a new interpreter would have been (session, fds, signals, command line, exit
status), and a process with threads is never forked."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from kata_py.oci import forked

MODULE = "tests.unit.forked_target"


def start(tmp_path, status=0, pass_fds=()):
    out = tmp_path / "found.json"
    child = forked.start([sys.executable, "-m", MODULE, str(out), str(status)], pass_fds)
    return child, out


def test_the_child_is_what_a_new_interpreter_would_be(tmp_path, monkeypatch):
    monkeypatch.delenv("KATA_PY_FORK", raising=False)
    # The test process may hold threads of other tests; the rule on threads is tested below.
    monkeypatch.setattr(forked.threading, "active_count", lambda: 1)
    kept_read, kept_write = os.pipe2(os.O_CLOEXEC)
    leaked = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)     # the CLI's state lock, say
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        child, out = start(tmp_path, status=7, pass_fds=(kept_write,))
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
        os.close(leaked)
    try:
        assert isinstance(child, forked.ForkedChild)
        assert child.wait() == 7 and child.poll() == 7
        found = json.loads(out.read_text())
    finally:
        os.close(kept_read)
        os.close(kept_write)
    assert found["sid"] == found["pid"] == child.pid
    assert found["fds"][str(kept_write)].startswith("pipe:")
    others = {fd: target for fd, target in found["fds"].items() if int(fd) > 2 and int(fd) != kept_write}
    assert str(tmp_path) not in others.values()
    assert set(others.values()) <= {"/dev/null", f"/proc/{child.pid}/fd"}, others
    assert found["argv"] == [MODULE, str(out), "7"]
    assert found["cmdline"].rstrip("\0") == f"{sys.executable} -m {MODULE} {out} 7"
    assert found["sigterm_default"] and found["blocked"] == []


def test_a_signal_that_ends_the_child_reads_as_popen_reports_it(tmp_path):
    r, w = os.pipe()
    child = forked.start([sys.executable, "-m", "tests.unit.forked_wait", str(r)], (r,))
    os.close(r)
    try:
        child.kill()
        assert child.wait() == -signal.SIGKILL
        child.kill()    # reaped already: nothing to signal
    finally:
        os.close(w)


@pytest.mark.parametrize("why", ["exec", "thread"])
def test_a_new_interpreter_where_fork_is_not_wanted(tmp_path, monkeypatch, why):
    stop = threading.Event()
    if why == "exec":
        monkeypatch.setenv("KATA_PY_FORK", "off")
    else:
        thread = threading.Thread(target=stop.wait)
        thread.start()
    try:
        child, out = start(tmp_path, status=3)
    finally:
        stop.set()
    assert isinstance(child, subprocess.Popen)
    assert child.wait() == 3
    assert json.loads(out.read_text())["argv"][1:] == [str(out), "3"]
