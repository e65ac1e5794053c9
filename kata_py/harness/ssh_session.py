"""One SSH connection to a node, with paramiko: the node's host key checked
before anything is sent (ssh_trust), a key login (ssh-agent, --identity, or
the user's unencrypted default keys), commands whose output is read as it
comes, and SFTP.

Passwords are never asked for, taken or stored: a node that only offers
password or keyboard-interactive logins is refused with one line, and so is
an encrypted key file (load it into ssh-agent instead)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import paramiko

from .ssh_target import SshTarget
from .ssh_trust import KnownHosts, RemoteError, preferred_key_types

log = logging.getLogger("kata_py.harness")

CONNECT_TIMEOUT = 20
# A node that vanishes (power, network) is noticed within about a minute,
# not at the end of the battery's longest timeout.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 20, 10, 4
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


class AuthRefused(RemoteError):
    """No key of ours let us in (or the node wants a password)."""


class ConnectionLost(RemoteError):
    """The connection went away while a command ran."""


@dataclass
class LoginOptions:
    known_hosts: KnownHosts
    identity: str | None = None
    use_agent: bool = True
    default_keys_dir: Path = field(default_factory=lambda: Path.home() / ".ssh")


def _keys(options: LoginOptions) -> Iterator[tuple[str, paramiko.PKey]]:
    """(where it came from, key), in the order they are offered."""
    if options.identity:
        path = Path(options.identity)
        try:
            yield str(path), paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            raise AuthRefused(f"--identity {path}: the key is encrypted; load it into ssh-agent (ssh-add) - the "
                              "harness never asks for or keeps a passphrase") from None
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise AuthRefused(f"--identity {path}: cannot read the key: {exc}") from None
        return
    if options.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent = paramiko.Agent()
            for key in agent.get_keys():
                yield f"ssh-agent key {key.fingerprint}", key
        except paramiko.SSHException as exc:
            log.warning("ssh-agent: %s", exc)
    for name in DEFAULT_KEYS:
        path = options.default_keys_dir / name
        if not path.exists():
            continue
        try:
            yield str(path), paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            log.info("%s is encrypted and is skipped (load it into ssh-agent to use it)", path)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            log.info("%s: cannot read the key: %s", path, exc)


class Session:
    def __init__(self, target: SshTarget, transport: paramiko.Transport) -> None:
        self.target = target
        self.transport = transport
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def open(cls, target: SshTarget, options: LoginOptions) -> "Session":
        try:
            sock = socket.create_connection((target.host, target.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise RemoteError(f"{target.url}: cannot connect: {exc}") from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        transport = paramiko.Transport(sock)
        try:
            security = transport.get_security_options()
            security.key_types = preferred_key_types(options.known_hosts.key_types(target.known_hosts_name),
                                                     list(security.key_types))
            try:
                transport.start_client(timeout=CONNECT_TIMEOUT)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise RemoteError(f"{target.url}: SSH handshake failed: {exc}") from None
            status = options.known_hosts.verify(target.known_hosts_name, transport.get_remote_server_key())
            if status == "added":
                log.warning("%s: host key added to %s", target.url, options.known_hosts.path)
            _login(transport, target, options)
            transport.set_keepalive(KEEPALIVE_INTERVAL)
        except BaseException:
            transport.close()
            raise
        return cls(target, transport)

    # -- commands

    def run(self, command: str, stdin: bytes = b"", timeout: float = 120) -> tuple[int, str, str]:
        """A command to its end: (exit status, stdout, stderr)."""
        stream = self.stream(command, stdin, timeout)
        out = "".join(line + "\n" for line in stream.lines())
        return stream.status(timeout), out, stream.stderr.decode(errors="replace")

    def stream(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> "Stream":
        """A command whose stdout is read line by line as it comes."""
        try:
            channel = self.transport.open_session(timeout=CONNECT_TIMEOUT)
            channel.settimeout(timeout)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionLost(f"{self.target.url}: {exc or 'the connection closed'}") from None
        return Stream(self, channel)

    # -- files

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.transport.open_sftp_client()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise RemoteError(f"{self.target.url}: SFTP is not available: {exc}") from None
        return self._sftp

    def alive(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass
        self.transport.close()


class Stream:
    """A running command: its stdout lines as they come, stderr kept aside."""

    def __init__(self, session: Session, channel: paramiko.Channel) -> None:
        self.session = session
        self.channel = channel
        self.stderr = b""
        self._err = threading.Thread(target=self._read_stderr, name="ssh-stderr", daemon=True)
        self._err.start()

    def _read_stderr(self) -> None:
        try:
            while chunk := self.channel.recv_stderr(65536):
                self.stderr += chunk
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def lines(self) -> Iterator[str]:
        """stdout, a line at a time, until it ends (or the connection does)."""
        pending = b""
        while True:
            try:
                chunk = self.channel.recv(65536)
            except (OSError, EOFError, paramiko.SSHException):  # socket.timeout included
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")

    def status(self, timeout: float = 60) -> int:
        """The exit status; ConnectionLost when the connection ended first
        (or no status came within `timeout` s of the output's end)."""
        self._err.join(10)
        try:
            deadline = time.monotonic() + timeout
            while not self.channel.status_event.wait(0.5):
                if not self.session.transport.is_active() or time.monotonic() > deadline:
                    break
            ready = self.channel.exit_status_ready()
            if ready and self.channel.recv_exit_status() != -1:
                return self.channel.recv_exit_status()
            if not self.session.transport.is_active():
                raise ConnectionLost(f"{self.session.target.url}: the connection was lost")
            if not ready:
                raise RemoteError(f"{self.session.target.url}: no exit status within {timeout:.0f} s")
            return -1  # ended by a signal
        finally:
            self.channel.close()


def _login(transport: paramiko.Transport, target: SshTarget, options: LoginOptions) -> None:
    tried = []
    for source, key in _keys(options):
        try:
            transport.auth_publickey(target.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise AuthRefused(_no_keys_accepted(target, exc.allowed_types)) from None
        except paramiko.AuthenticationException:
            tried.append(source)
            continue
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteError(f"{target.url}: the login failed: {exc}") from None
        if transport.is_authenticated():
            return
        # A second factor was asked for (partial success): passwords are not ours to give.
        raise AuthRefused(f"{target.url}: the key was accepted but the node asks for a further login step; "
                          "the harness logs in with a key alone")
    if not tried:
        raise AuthRefused(f"{target.url}: no key to log in with: give --identity FILE or load a key into ssh-agent"
                          " (the harness never uses a password)")
    raise AuthRefused(f"{target.url}: the node accepted none of the keys offered ({', '.join(tried)})")


def _no_keys_accepted(target: SshTarget, allowed: list[str]) -> str:
    return (f"{target.url}: the node does not take key logins for {target.user} (it offers "
            f"{', '.join(allowed) or 'nothing'}); the harness logs in with keys only and never uses a password")
