"""Where kata-py keeps things on the host.

The state directory holds the guest image cache and probe results; it survives
reboots. The run directory holds per-VM sockets and logs and is tmpfs-backed.
Both can be moved with environment variables so tests and users can isolate runs.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    return Path(os.environ.get("KATA_PY_STATE_DIR", "/var/lib/kata-py"))


def run_dir() -> Path:
    return Path(os.environ.get("KATA_PY_RUN_DIR", "/run/kata-py-sandboxes"))


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
