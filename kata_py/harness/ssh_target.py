"""Which nodes a remote run goes to: `ssh://user@node[:port]` URLs, from
`--host` or a `--hosts` file (one URL a line, optionally followed by the
runtime to check on that node)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError

DEFAULT_PORT = 22
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$")  # what useradd accepts, no leading dash


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = DEFAULT_PORT
    runtime: str | None = None  # from a --hosts line; None: the run's --runtime

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}" + (f":{self.port}" if self.port != DEFAULT_PORT else "")

    @property
    def known_hosts_name(self) -> str:
        """The host as known_hosts names it: `node`, or `[node]:port` off port 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    @property
    def record_name(self) -> str:
        """A file name for this node's records (see remote_record)."""
        return re.sub(r"[^A-Za-z0-9._@-]", "_", f"{self.user}@{self.host}_{self.port}")


def parse_url(text: str, runtime: str | None = None) -> SshTarget:
    """`ssh://user@node[:port]`; the user is required (no guessing whose
    account a security check logs in as); nothing else may be in it."""
    where = f"--host {text}"
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if parts.scheme != "ssh":
        raise ConfigError(f"{where}: expected ssh://USER@NODE[:PORT]")
    if parts.password is not None:
        raise ConfigError(f"{where}: a password in the URL is refused; log in with a key (an agent or --identity)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: expected ssh://USER@NODE[:PORT], nothing after the port")
    user = unquote(parts.username or "")
    if not user:
        raise ConfigError(f"{where}: the URL names no user (ssh://USER@NODE)")
    if not _USER.match(user):
        raise ConfigError(f"{where}: {user!r} is not a user name")
    host = parts.hostname or ""
    if not host or host.startswith("-") or not re.match(r"^[A-Za-z0-9._:-]+$", host):
        raise ConfigError(f"{where}: the URL names no usable node")
    if port == 0:
        raise ConfigError(f"{where}: port 0")
    return SshTarget(user=user, host=host, port=port or DEFAULT_PORT, runtime=runtime)


def parse_hosts_file(path: str) -> list[SshTarget]:
    """One `ssh://user@node[:port] [RUNTIME]` a line; `#` starts a comment."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--hosts {path}: {exc}") from None
    targets = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ConfigError(f"--hosts {path}:{number}: expected `ssh://USER@NODE[:PORT] [RUNTIME]`")
        try:
            targets.append(parse_url(words[0], words[1] if len(words) == 2 else None))
        except ConfigError as exc:
            raise ConfigError(f"--hosts {path}:{number}: {str(exc).split(': ', 1)[1]}") from None
    if not targets:
        raise ConfigError(f"--hosts {path}: names no host")
    return targets


def targets_from(hosts: list[str] | None, hosts_file: str | None) -> list[SshTarget]:
    targets = [parse_url(url) for url in hosts or []]
    if hosts_file:
        targets += parse_hosts_file(hosts_file)
    seen: set[tuple] = set()
    for target in targets:
        key = (target.user, target.host, target.port, target.runtime)
        if key in seen:
            raise ConfigError(f"{target.url} is named twice")
        seen.add(key)
    return targets
