"""Where an OCI container's sandbox lives, by (state root, container id).

Each OCI container is a sandbox of its own (kata_py.sandbox.single): its
owner's id is a digest of (state root, id), which names the owner's run
directory (record, socket, 9p export) and the VM's run directory (sockets,
logs; its host cgroups take its name), so that `delete` finds them even when
the owner was killed before it reported anything.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..sandbox import record
from ..sandbox.single import ROOTFS_ENTRY  # noqa: F401  (the guest spec's rootfs_path)


def sandbox_id_for(root: str, container_id: str) -> str:
    """The container's sandbox id: fixed by (state root, id), at most 32 characters."""
    return hashlib.sha256(f"{os.path.abspath(root)}\0{container_id}".encode()).hexdigest()[:20]


def owner_dir_for(root: str, container_id: str) -> Path:
    """The run directory of the container's sandbox owner."""
    return record.sandbox_dir(sandbox_id_for(root, container_id))


def sandbox_dir_for(root: str, container_id: str) -> Path:
    """The run directory of the container's VM."""
    return record.vm_dir(sandbox_id_for(root, container_id))
