"""kata-py's configuration file (TOML), for what no command-line flag carries.

    # /etc/kata-py/config.toml (or $KATA_PY_CONFIG)
    [factory]
    size = 2            # idle VMs `kata-py factory start` keeps booted
    memory_mib = 256    # their size: containers that need more boot their own
    cpus = 1

    [vm]
    shared_fs = "virtio-fs"     # or "9p": how container files reach the guest

A missing file means the defaults. $KATA_PY_SHARED_FS overrides [vm] shared_fs.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

DEFAULT_PATH = "/etc/kata-py/config.toml"


@dataclass(frozen=True)
class FactoryConfig:
    size: int = 2
    memory_mib: int = 256
    cpus: int = 1


def config_path() -> Path:
    return Path(os.environ.get("KATA_PY_CONFIG", DEFAULT_PATH))


def _read_config() -> tuple[Path, dict]:
    """(the file, its tables); a missing file has none."""
    path = config_path()
    try:
        return path, tomllib.loads(path.read_text())
    except FileNotFoundError:
        return path, {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_factory_config() -> FactoryConfig:
    path, data = _read_config()
    section = data.get("factory", {})
    unknown = set(section) - set(FactoryConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: unknown [factory] keys {sorted(unknown)}")
    values = {}
    for key, (low, high) in {"size": (0, 64), "memory_mib": (128, 16384), "cpus": (1, 64)}.items():
        if key in section:
            value = section[key]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{path}: [factory] {key} must be an integer in {low}..{high}")
            values[key] = value
    return FactoryConfig(**values)


SHARED_FILESYSTEMS = ("virtio-fs", "9p")
DEFAULT_SHARED_FS = "virtio-fs"


def shared_fs() -> str:
    """How a VM's export of container files reaches its guest: virtio-fs
    (a virtiofsd per VM) or virtio-9p (QEMU itself)."""
    value = os.environ.get("KATA_PY_SHARED_FS")
    where = "$KATA_PY_SHARED_FS"
    if not value:
        path, data = _read_config()
        value = data.get("vm", {}).get("shared_fs", DEFAULT_SHARED_FS)
        where = f"{path}: [vm] shared_fs"
    if value not in SHARED_FILESYSTEMS:
        raise ConfigError(f"{where} must be one of {', '.join(SHARED_FILESYSTEMS)}, not {value!r}")
    return value
