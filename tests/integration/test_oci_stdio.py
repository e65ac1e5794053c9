"""A container's stdio through the OCI CLI: inherited pipes (1 MiB each way,
byte for byte) and a terminal handed over --console-socket (SCM_RIGHTS), with
window-size changes reaching the guest's pty."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import select
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.bundles import make_bundle
from tests.conftest import KATA
from tests.oci_helpers import assert_nothing_left, cli, reap

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]

MIB = 1 << 20


# -- inherited pipes


def test_run_cat_1mib_both_ways_at_once(tmp_path):
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "bundle", ["cat"])
    data = os.urandom(MIB)
    result = cli(root, "run", "--bundle", bundle, "cat1", input=data)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == MIB and result.stdout == data
    assert result.stderr == b""
    assert_nothing_left(root)


def test_run_digest_in_random_out(tmp_path):
    # stdin: 1 MiB digested in the guest; stdout: 1 MiB of the guest's random
    # bytes, also kept in the rootfs so the host can compare byte for byte.
    script = ("sha256sum >&2 && head -c 1048576 /dev/urandom > /tmp/out && cat /tmp/out && "
              "sha256sum /tmp/out >&2")
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "bundle", ["sh", "-c", script])
    data = os.urandom(MIB)
    result = cli(root, "run", "--bundle", bundle, "rnd1", input=data)
    assert result.returncode == 0, result.stderr
    digests = [line.split()[0] for line in result.stderr.decode().splitlines()]
    assert digests[0] == hashlib.sha256(data).hexdigest()
    kept = (bundle / "rootfs" / "tmp" / "out").read_bytes()
    assert len(result.stdout) == MIB and result.stdout == kept
    assert digests[1] == hashlib.sha256(kept).hexdigest()
    assert_nothing_left(root)


# -- --console-socket


class Terminal:
    """The master side of the container's pty, as conmon holds it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_until(self, needle: bytes, timeout: float = 20) -> bytes:
        return self.read_match(re.escape(needle), timeout).group(0)

    def read_match(self, pattern: bytes, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} never came; got {self.seen[-400:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the other side is gone
                    chunk = b""
                assert chunk, f"terminal closed before {pattern!r}; got {self.seen[-400:]!r}"
                self.seen += chunk
        match = re.search(pattern, self.seen)
        self.seen = self.seen[match.end():]
        return match

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ConsoleSocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(120)
        self.received: list = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        self.received = [message, fds]

    def terminal(self) -> tuple[bytes, Terminal]:
        self.thread.join(120)
        message, fds = self.received
        assert len(fds) == 1, fds
        self.sock.close()
        return message, Terminal(fds[0])


def test_console_socket(tmp_path):
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path / "bundle", ["sh"], terminal=True)
    listener = ConsoleSocket(tmp_path / "console.sock")
    pid_file = tmp_path / "pid"
    with open(tmp_path / "create.out", "wb") as out:
        result = cli(root, "create", "--bundle", bundle, "--console-socket", listener.path, "--pid-file", pid_file,
                     "tty1", stdout=out, stderr=subprocess.STDOUT)
    assert result.returncode == 0, (tmp_path / "create.out").read_bytes()
    message, term = listener.terminal()
    assert message  # runc sends the pty's name with the descriptor
    assert os.isatty(term.fd)
    pid = int(pid_file.read_text())
    try:
        term.resize(24, 80)
        assert cli(root, "start", "tty1").returncode == 0

        term.write(b"echo hello\n")
        term.read_until(b"\r\nhello\r\n")

        # The monitor sees SIGWINCH on its end of the host pty and resizes the
        # guest's; twice, so it is not just the size at start.
        for rows, cols in ((33, 111), (50, 132)):
            term.resize(rows, cols)
            deadline = time.monotonic() + 10
            while True:
                # The typed line is echoed back too: match only what the command prints.
                term.write(b"echo SIZE=$(stty size)=\n")
                answer = term.read_match(rb"SIZE=(\d+ \d+)=").group(1)
                if answer == f"{rows} {cols}".encode() or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert answer == f"{rows} {cols}".encode()

        # ^C reaches the guest's line discipline: the foreground job dies, the shell stays.
        term.write(b"sleep 100\n")
        time.sleep(1)
        term.write(b"\x03")
        term.write(b"echo after-$((40+2))\n")
        term.read_until(b"after-42")

        # exec with its own terminal, over a second console socket.
        exec_listener = ConsoleSocket(tmp_path / "exec.sock")
        with open(tmp_path / "exec.out", "wb") as out:
            proc = subprocess.Popen(KATA + ["--root", str(root), "exec", "--tty", "--console-socket",
                                            str(exec_listener.path), "tty1", "sh", "-c",
                                            "test -t 0 && test -t 1 && echo exec-has-a-tty; exit 3"],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _, exec_term = exec_listener.terminal()
        exec_term.read_until(b"exec-has-a-tty")
        assert proc.wait(60) == 3, (tmp_path / "exec.out").read_bytes()
        os.close(exec_term.fd)

        term.write(b"exit 6\n")
        deadline = time.monotonic() + 30
        while json.loads(cli(root, "state", "tty1").stdout)["status"] != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert reap(pid) == 6
    finally:
        os.close(term.fd)
        cli(root, "delete", "--force", "tty1")
    assert_nothing_left(root)
