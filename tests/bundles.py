"""Test bundles built locally from Debian's busybox-static (no registry needed)."""

from __future__ import annotations

import json
from pathlib import Path

from kata_py.oci.busybox import BUSYBOX, DEFAULT_MOUNTS, make_busybox_rootfs  # noqa: F401 (re-exported)

make_rootfs = make_busybox_rootfs


def make_bundle(directory: Path, args: list[str], terminal: bool = False, readonly: bool = False,
                **extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    make_rootfs(directory / "rootfs")
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": "kata-test",
        "mounts": DEFAULT_MOUNTS,
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]},
    }
    config.update(extra)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
