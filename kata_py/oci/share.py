"""An OCI container's 9p share: where it lives and what its entries are called.

QEMU exports one directory per container. The monitor fills it (with
kata_py.sandbox.share.ContainerShare, in a mount namespace of its own) with
bind mounts: the bundle's rootfs as `rootfs` and each bind-mount source of
the spec as `m<N>` (a directory or a single file). The share and VM run
directories are named after (state root, container id), so that `delete`
finds them even when the monitor died before reporting.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import paths

ROOTFS_ENTRY = "rootfs"     # the container's rootfs in its share (the guest spec's rootfs_path)


def _digest(root: str, container_id: str) -> str:
    return hashlib.sha256(f"{os.path.abspath(root)}\0{container_id}".encode()).hexdigest()[:20]


def share_dir_for(root: str, container_id: str) -> Path:
    """Where a container's share lives: fixed by (state root, id), so that
    `delete` finds it even when the monitor died before reporting."""
    return paths.run_dir() / f"share-{_digest(root, container_id)}"


def sandbox_dir_for(root: str, container_id: str) -> Path:
    """The run directory of a container's VM (sockets, logs; its host cgroups
    take its name), fixed the same way and for the same reason: a monitor
    killed while it boots has not reported it yet."""
    return paths.run_dir() / f"vm-{_digest(root, container_id)}"
