"""Load and validate a bundle's config.json; `default_spec` is the one `kata-py spec` writes.

Validation is the official runtime-spec JSON schemas (Debian's
golang-github-opencontainers-specs-dev), compiled to Python once per schema
version (config_schema), then the semantic checks a schema cannot express.
Every error names the JSON path.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from ..errors import ConfigError
from .config_schema import first_fault

SCHEMA_DIR = Path(os.environ.get("KATA_PY_OCI_SCHEMA_DIR",
                                 "/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema"))
MAX_CONFIG_BYTES = 4 << 20  # runc has no limit; a 4 MiB config is already absurd
# A real config nests about 7 levels (linux.seccomp.syscalls[].args[]); anything far
# deeper is hostile, and would take a recursive validator into RecursionError.
MAX_CONFIG_DEPTH = 64
SUPPORTED_MAJOR = 1


def json_path(parts) -> str:
    return "/" + "/".join(str(p) for p in parts) if parts else "/"


def check_plain_json(config, limit: int = MAX_CONFIG_DEPTH) -> None:
    """No nesting deeper than `limit`, and no NUL in any string: the kernel takes
    paths, arguments and names as C strings, so a NUL would cut them short (runc's
    Go refuses them at the first system call; we refuse them before anything starts)."""
    stack = [(config, [], 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > limit:
            raise ConfigError(f"config.json {json_path(where[:limit])}: nested more than {limit} levels deep")
        if isinstance(value, str):
            if "\0" in value:
                raise ConfigError(f"config.json {json_path(where)}: contains a NUL character")
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\0" in key:
                    raise ConfigError(f"config.json {json_path(where)}: a key contains a NUL character")
                stack.append((item, where + [key], depth + 1))
        elif isinstance(value, list):
            stack.extend((item, where + [index], depth + 1) for index, item in enumerate(value))


def validate_config(config) -> None:
    check_plain_json(config)
    fault = first_fault(config, SCHEMA_DIR)
    if fault is not None:
        path, message = fault
        raise ConfigError(f"config.json {json_path(path)}: {_short(message)}")
    _semantic_checks(config)


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def _semantic_checks(config: dict) -> None:
    version = config.get("ociVersion", "")
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) != SUPPORTED_MAJOR:
        raise ConfigError(f"config.json /ociVersion: unsupported version {version!r} (need {SUPPORTED_MAJOR}.x)")
    if "root" not in config:
        raise ConfigError("config.json /root: required on Linux")
    process = config.get("process")
    if process is not None:
        if not process.get("args"):
            raise ConfigError("config.json /process/args: must name a program")
        if not str(process.get("cwd", "")).startswith("/"):
            raise ConfigError("config.json /process/cwd: must be an absolute path")
    namespaces = config.get("linux", {}).get("namespaces", [])
    seen = set()
    for index, ns in enumerate(namespaces):
        if ns["type"] in seen:
            raise ConfigError(f"config.json /linux/namespaces/{index}: namespace {ns['type']!r} given twice")
        seen.add(ns["type"])
    for index, mount in enumerate(config.get("mounts", [])):
        if not mount.get("destination", "").startswith("/"):
            raise ConfigError(f"config.json /mounts/{index}/destination: must be an absolute path")
        if ".." in Path(mount["destination"]).parts:
            raise ConfigError(f"config.json /mounts/{index}/destination: must not contain '..'")


def _read_config(config_path: Path) -> bytes:
    # O_NONBLOCK: a config.json that is a FIFO (or a link to one) must not hang us
    # in open(); anything but a regular file is refused before a byte is read.
    try:
        fd = os.open(config_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: no such file (is --bundle right?)") from None
    except OSError as exc:
        raise ConfigError(f"{config_path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{config_path}: not a regular file")
        chunks, left = [], MAX_CONFIG_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{config_path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def load_bundle(bundle: str | os.PathLike, validate: bool = True) -> tuple[Path, dict, Path]:
    """(bundle dir, validated config, rootfs dir) or ConfigError.

    validate=False skips the schema check for a caller that knows `create` has checked this bundle."""
    bundle_dir = Path(bundle).resolve()
    config_path = bundle_dir / "config.json"
    raw = _read_config(config_path)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config_path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        # Decoded here, as UTF-8 (RFC 8259): handed bytes, json.loads would guess
        # UTF-16/32 and skip a BOM, taking files that runc refuses.
        config = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{config_path}: JSON nested too deeply") from None
    except ValueError as exc:
        # Not a JSONDecodeError: an integer of more digits than int() takes, NaN,
        # Infinity, or a number out of a double's range.
        raise ConfigError(f"{config_path}: invalid JSON: {_short(str(exc), 100)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config.json /: expected an object, got {type(config).__name__}")
    if validate:
        validate_config(config)
    rootfs = resolve_rootfs(bundle_dir, config["root"]["path"])
    check_bind_sources(bundle_dir, config)
    return bundle_dir, config, rootfs


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _confined(bundle_dir: Path, given: str, where: str) -> Path:
    """`given` (relative to the bundle, or absolute) with symlinks resolved. A path
    that names something inside the bundle must stay inside it once resolved, so a
    link planted in the bundle cannot reach out; an absolute path elsewhere is the
    caller's explicit choice (podman's rootfs, an engine's /etc/hosts bind)."""
    lexical = Path(os.path.normpath(bundle_dir / given))
    resolved = lexical.resolve()
    if not Path(given).is_absolute() and not _inside(lexical, bundle_dir):
        raise ConfigError(f"config.json {where}: {given!r} resolves outside the bundle ({lexical})")
    if _inside(lexical, bundle_dir) and not _inside(resolved, bundle_dir):
        raise ConfigError(f"config.json {where}: {given!r} resolves outside the bundle ({resolved})")
    return resolved


def resolve_rootfs(bundle_dir: Path, root_path: str) -> Path:
    """The rootfs directory: a path in the bundle may not resolve out of it."""
    resolved = _confined(bundle_dir, root_path, "/root/path")
    if not resolved.is_dir():
        raise ConfigError(f"config.json /root/path: {resolved} is not a directory")
    return resolved


def check_bind_sources(bundle_dir: Path, config: dict) -> None:
    """Bind sources in the bundle (relative ones, as runc resolves them against the
    bundle, or absolute ones under it) may not resolve out of it."""
    for index, mount in enumerate(config.get("mounts") or []):
        options = mount.get("options") or []
        if mount.get("type") == "bind" or "bind" in options or "rbind" in options:
            if mount.get("source"):
                _confined(bundle_dir, mount["source"], f"/mounts/{index}/source")


def default_spec() -> dict:
    """A starting config.json, as `runc spec` writes it (`kata-py spec`, the harness' bundles)."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {key: ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
                             for key in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "kata-py",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
