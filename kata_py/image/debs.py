"""Debian packages for the guest: resolve candidate versions, download, unpack.

Only apt's ordinary clients are used (apt-cache, apt-get download, dpkg -x), so
the guest gets exactly the builds, security fixes included, that the host's
apt sources offer. Nothing is installed on the host.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError

KERNEL_META = "linux-image-amd64"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str      # basename of the pool file, used as the cache name
    sha256: str
    depends: str

    def as_manifest(self) -> dict:
        return {"version": self.version, "file": self.filename, "sha256": self.sha256}


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise ImageError(f"{what}: {argv[0]} is not installed (the image is built "
                         "from Debian packages and needs apt and dpkg)") from e


def _parse_records(text: str) -> dict[str, Package]:
    out = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Version" in fields:
            name = fields["Package"]
            out.setdefault(name, Package(
                name, fields["Version"], os.path.basename(fields.get("Filename", "")),
                fields.get("SHA256", ""), fields.get("Depends", "")))
    return out


def _candidates_once(names: list[str]) -> tuple[dict[str, Package], list[str]]:
    found: dict[str, Package] = {}
    missing = []
    # All at once is one process; but apt-cache fails the whole call on a
    # single unknown name, so then ask one at a time to learn which it was.
    proc = _run(["apt-cache", "show", "--no-all-versions", *names], "resolving packages")
    if proc.returncode == 0:
        found = _parse_records(proc.stdout)
    for n in names:
        if n not in found:
            one = _run(["apt-cache", "show", "--no-all-versions", n], "resolving packages")
            recs = _parse_records(one.stdout) if one.returncode == 0 else {}
            if n in recs and recs[n].filename:
                found[n] = recs[n]
            else:
                missing.append(n)
    return found, missing


def resolve(names: list[str], allow_update: bool = True) -> dict[str, Package]:
    """Candidate version of each package; runs ``apt-get update`` once, and only
    when apt knows no candidate for some package."""
    found, missing = _candidates_once(names)
    if missing and allow_update:
        upd = _run(["apt-get", "update", "-q"], "apt-get update")
        if upd.returncode != 0:
            raise ImageError(f"apt-get update failed while looking for {', '.join(missing)}:\n"
                             + upd.stderr.strip()[-2000:])
        more, missing = _candidates_once(missing)
        found.update(more)
    if missing:
        raise ImageError("apt has no candidate for: " + ", ".join(missing)
                         + " (check the host's apt sources)")
    return found


def kernel_package(meta: Package) -> str:
    """The versioned ``linux-image-<abi>-amd64`` the metapackage depends on."""
    for alt in meta.depends.split(","):
        name = alt.split("|")[0].strip().split(" ")[0]
        if re.fullmatch(r"linux-image-\d.*-amd64(-unsigned)?", name):
            return name
    raise ImageError(f"cannot find the kernel image in {meta.name}'s dependencies: {meta.depends!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(pkgs: list[Package], cache: Path) -> dict[str, Path]:
    """Make sure each package's .deb is in ``cache``; returns name -> path.

    Files land in the cache only after their SHA256 matched apt's record, so a
    killed download never leaves a truncated .deb that later builds trust.
    """
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    fetch = []
    for p in pkgs:
        target = cache / p.filename
        if target.exists():
            out[p.name] = target
        else:
            fetch.append(p)
    if not fetch:
        return out
    with tempfile.TemporaryDirectory(dir=cache, prefix=".dl-") as tmp:
        proc = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
             *[f"{p.name}={p.version}" for p in fetch]],
            cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError("apt-get download failed:\n" + proc.stderr.strip()[-2000:])
        got = {f.name.split("_", 1)[0]: f for f in Path(tmp).glob("*.deb")}
        for p in fetch:
            f = got.get(p.name)
            if f is None:
                raise ImageError(f"apt-get download did not produce {p.name} {p.version}")
            if p.sha256 and _sha256(f) != p.sha256:
                raise ImageError(f"{f.name}: SHA256 does not match apt's record")
            os.replace(f, cache / p.filename)
            out[p.name] = cache / p.filename
    return out


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc = _run(["dpkg", "-x", str(deb), str(dest)], "unpacking packages")
    if proc.returncode != 0:
        raise ImageError(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
