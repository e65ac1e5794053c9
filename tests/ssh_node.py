"""A real OpenSSH server (Debian's openssh-server) for the remote harness
tests: a node reached over SSH, inside a network namespace of its own.

The server listens on 127.0.0.1 inside a private network namespace the
helper creates; the client (kata-py) is started inside the same namespace
with `nsenter --net`, so the host's network is never touched. Both ends run
on this machine, which is the "node": runc and kata-py are there.

Host key and user key are made for the run by ssh-keygen; root logs in with
that key only. `close()` removes the server, its session processes, the
namespace, the keys and the directory (and /run/sshd when it made it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"          # absolute: sshd re-executes itself
PRIVSEP_DIR = Path("/run/sshd")  # sshd's privilege separation directory (made by its service normally)
PORT = 2222


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def processes_mentioning(word: str) -> list[int]:
    """Processes whose argv contains `word` (leftover harness processes on the node)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != os.getpid() and \
                    word.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


class SshNode:
    def __init__(self, base: Path, session_env: dict[str, str] | None = None) -> None:
        self.base = base
        self.netns = f"kata-py-ssh-{secrets.token_hex(4)}"
        self.port = PORT
        self.session_env = session_env or {}
        self.proc: subprocess.Popen | None = None
        self.made_privsep = False
        self.host_key = base / "ssh_host_ed25519_key"
        self.user_key = base / "id_ed25519"
        self.config = base / "sshd_config"
        self.log = base / "sshd.log"

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def known_hosts_line(self) -> str:
        key_type, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {key_type} {blob}\n"

    def start(self) -> "SshNode":
        """Keys and config (once), the namespace, then the server."""
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)
        for key, comment in ((self.host_key, "host"), (self.user_key, "user")):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kata-py-test-{comment}",
                            "-f", str(key)], check=True)
        authorized = self.base / "authorized_keys"
        authorized.write_text(self.user_key.with_suffix(".pub").read_text())
        os.chmod(authorized, 0o600)
        env = " ".join(f"{k}={v}" for k, v in self.session_env.items())
        self.config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            "PidFile none",
            f"AuthorizedKeysFile {authorized}",
            "AllowUsers root",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",        # the keys live under /tmp (mode 1777)
            "UseDNS no",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            *([f"SetEnv {env}"] if env else []),
        ]) + "\n")
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            self.made_privsep = True
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        subprocess.run([SSHD, "-t", "-f", str(self.config)], check=True)
        return self.start_server()

    def start_server(self) -> "SshNode":
        mark = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns}", SSHD, "-D", "-e",
                                          "-f", str(self.config)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        deadline = time.monotonic() + 30
        while b"Server listening on" not in self.log.read_bytes()[mark:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        return self

    def stop_server(self) -> None:
        """The server and every connection to it gone (the node "down")."""
        if self.proc is None:
            return
        sessions = self.sessions()
        self.proc.kill()
        self.proc.wait()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def client(self, *args: str, env: dict | None = None, timeout: float = 900,
               popen: bool = False):
        """`kata-py ARGS` inside the node's network namespace."""
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-m", "kata_py.cli.main", *args]
        if popen:
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)

    def in_netns(self, argv: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *argv], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)

    def sessions(self) -> list[int]:
        """sshd's per-connection processes (the privileged monitor of each)."""
        return children_of(self.proc.pid) if self.proc else []

    def close(self) -> None:
        self.stop_server()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        if self.made_privsep:
            try:
                PRIVSEP_DIR.rmdir()
            except OSError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
