"""The probe bundle a remote run copies to a node over SFTP: a zipapp of
kata_py (the harness and the modules it imports; stdlib-only apart from
pyroute2, which goes in too) run by the node's python3, and this host's
busybox-static, so the probes run the same tools on every node. Nothing
needs to be installed on a node but python3 and the runtime checked."""

from __future__ import annotations

import functools
import importlib.util
import io
import zipfile
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding kata_py/

MAIN = "import sys\nfrom kata_py.harness.remote_node import main\nsys.exit(main())\n"
# Pure-Python packages the harness imports beside the stdlib (host_address: pyroute2).
VENDORED = ("pyroute2",)


def _package_files(root: Path, package: str) -> list[tuple[Path, str]]:
    return [(path, path.relative_to(root).as_posix()) for path in sorted((root / package).rglob("*.py"))
            if "__pycache__" not in path.parts]


@functools.lru_cache(maxsize=1)
def zipapp() -> bytes:
    files = _package_files(PACKAGE_ROOT, "kata_py")
    for name in VENDORED:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue  # the node then needs its own (the probe that uses it says so)
        location = Path(list(spec.submodule_search_locations)[0])
        files += _package_files(location.parent, name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, name in files:
            archive.write(path, name)
        archive.writestr("__main__.py", MAIN)
    return buffer.getvalue()


def cleanup_source() -> bytes:
    """remote_cleanup.py's source: what runs on the node to remove a run."""
    return (Path(__file__).with_name("remote_cleanup.py")).read_bytes()


def busybox() -> Path:
    from ..oci.busybox import BUSYBOX

    return Path(BUSYBOX).resolve()
