"""Is this the node we mean? The host key a node presents, checked against
known_hosts (OpenSSH's format, hashed names included).

- a key known_hosts has for the node: go on;
- a node known_hosts does not name: refused, unless the user said
  `--accept-new-host-key`, which appends the key (trust on first use, as
  `ssh -o StrictHostKeyChecking=accept-new` does);
- a node known_hosts names with another key (or only with keys of other
  types): always refused, whatever the flags: that is what an attacker in
  the middle looks like.

The file is only ever appended to, never rewritten: comments, markers and
entries this module does not understand stay as the user wrote them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

import paramiko

from ..errors import KataError


class RemoteError(KataError):
    """A remote run could not reach, trust, log in to or use a node."""


class HostKeyUnknown(RemoteError):
    """The node is not in known_hosts."""


class HostKeyChanged(RemoteError):
    """known_hosts has another key for the node."""


def default_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def fingerprint(key: paramiko.PKey | bytes) -> str:
    """SHA256:..., as ssh-keygen -l prints it."""
    blob = key if isinstance(key, bytes) else key.asbytes()
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Entry:
    patterns: tuple[str, ...]
    key_type: str
    blob: bytes
    marker: str = ""  # "" or "@revoked" (@cert-authority lines are not used: no certificates here)

    def names(self, name: str) -> bool:
        """Does this entry's host field name `name`? Plain names, hashed
        names (|1|salt|hash) and patterns (`*`, `?`, a leading `!` negates)."""
        matched = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            pattern = pattern[1:] if negated else pattern
            if pattern.startswith("|1|"):
                hit = hmac.compare_digest(paramiko.HostKeys.hash_host(name, pattern), pattern)
            else:
                hit = _glob(pattern).fullmatch(name.lower()) is not None
            if hit and negated:
                return False
            matched = matched or hit
        return matched


def _glob(pattern: str) -> re.Pattern:
    """OpenSSH's host patterns: `*` and `?` only (the brackets of `[node]:port` are literal)."""
    return re.compile(re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", "."))


def parse_known_hosts(text: str) -> list[Entry]:
    """The lines understood; others (comments, @cert-authority, keys of
    unknown types, garbage) are passed over, never fatal."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = ""
        if fields[0].startswith("@"):
            marker, fields = fields[0], fields[1:]
            if marker != "@revoked":
                continue
        if len(fields) < 3:
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except (binascii.Error, ValueError):
            continue
        entries.append(Entry(tuple(fields[0].split(",")), fields[1], blob, marker))
    return entries


@dataclass
class KnownHosts:
    path: Path
    accept_new: bool = False

    def _entries(self) -> list[Entry]:
        try:
            return parse_known_hosts(self.path.read_text(errors="replace")) if self.path.exists() else []
        except OSError as exc:
            raise RemoteError(f"known_hosts {self.path}: {exc}") from None

    def _for(self, name: str) -> tuple[dict[str, bytes], set[bytes]]:
        known: dict[str, bytes] = {}
        revoked: set[bytes] = set()
        for entry in self._entries():
            if entry.marker == "@revoked":
                revoked.add(entry.blob)  # revoked for every host, as OpenSSH reads it
            elif entry.names(name):
                known.setdefault(entry.key_type, entry.blob)
        return known, revoked

    def key_types(self, name: str) -> list[str]:
        """The key types known_hosts has for `name`, for the client to ask
        the node for first (so that a node with several keys shows the one
        we can check)."""
        return list(self._for(name)[0])

    def verify(self, name: str, key: paramiko.PKey) -> str:
        """"known" or "added" (with accept_new); raises when refused."""
        known, revoked = self._for(name)
        if key.asbytes() in revoked:
            raise HostKeyChanged(f"{name}: the node's {key.get_name()} key {fingerprint(key)} is marked @revoked "
                                 f"in {self.path}; refused")
        if known:
            ours = known.get(key.get_name())
            if ours == key.asbytes():
                return "known"
            if ours is not None:
                raise HostKeyChanged(
                    f"{name}: HOST KEY CHANGED: the node shows {key.get_name()} {fingerprint(key)}, "
                    f"{self.path} has {fingerprint(ours)}; refused (remove the old entry only if the "
                    "change is expected)")
            raise HostKeyChanged(
                f"{name}: the node shows a {key.get_name()} key ({fingerprint(key)}) but {self.path} has "
                f"only {', '.join(known)} for it; refused")
        if not self.accept_new:
            raise HostKeyUnknown(
                f"{name}: host key {key.get_name()} {fingerprint(key)} is not in {self.path}; refused "
                "(check the fingerprint, then add it there or run again with --accept-new-host-key)")
        self.append(name, key)
        return "added"

    def append(self, name: str, key: paramiko.PKey) -> None:
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as out:
            if out.tell() and not self.path.read_bytes().endswith(b"\n"):
                out.write("\n")
            out.write(line)


def preferred_key_types(known: list[str], offered: list[str]) -> list[str]:
    """paramiko's host key algorithms with those we can check first. An RSA
    entry (`ssh-rsa`) is checked through the SHA-2 signature algorithms."""
    first: list[str] = []
    for key_type in known:
        first += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key_type == "ssh-rsa" else [key_type]
    first = [t for t in first if t in offered]
    return first + [t for t in offered if t not in first]
