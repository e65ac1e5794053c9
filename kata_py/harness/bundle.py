"""The container the probes run in: the harness's own bundle (a busybox
rootfs and the spec `kata-py spec` writes, unprivileged, with limits), or a
user's bundle or rootfs with the harness's process and, where the spec sets
none, its limits.

The bundle handed to the runtime is always a directory of the harness's
own (a config.json naming the rootfs by its absolute path), so a user's
bundle is never rewritten."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..oci.busybox import DEFAULT_MOUNTS, make_busybox_rootfs

# Limits the bombs need to be contained by (and the host kept safe by): the
# harness sets them where a spec has none.
PIDS_LIMIT = 128
MEMORY_LIMIT = 64 << 20
CPU = {"quota": 100000, "period": 100000}  # one CPU: a runaway probe leaves the host the rest

# The container's init: waits, and reaps whatever the bombs leave re-parented to it.
INIT = "echo harness-ready; while :; do sleep 3600 & wait; done"


@dataclass
class ContainerSetup:
    bundle: Path
    rootfs: Path
    config: dict
    notes: list[str] = field(default_factory=list)  # what the harness set in the spec

    def write(self, bin_dir: str) -> None:
        """config.json with the harness's init, using the harness's busybox at `bin_dir` (container path)."""
        process = self.config.setdefault("process", {})
        process.update(terminal=False, args=[f"{bin_dir}/sh", "-c", INIT], cwd="/",
                       env=[f"PATH={bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        process.setdefault("user", {"uid": 0, "gid": 0})
        process.pop("consoleSize", None)
        (self.bundle / "config.json").write_text(json.dumps(self.config, indent=1))


def harness_spec(rootfs: Path) -> dict:
    from ..oci.spec import default_spec

    spec = default_spec()
    # A writable root: a write that fails then fails at the boundary, not at a read-only mount.
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["hostname"] = "kata-py-harness"
    spec["mounts"] = copy.deepcopy(DEFAULT_MOUNTS)
    spec["linux"]["resources"] = {"pids": {"limit": PIDS_LIMIT}, "memory": {"limit": MEMORY_LIMIT},
                                  "cpu": dict(CPU)}
    return spec


def prepare(work: Path, bundle: str | None = None, rootfs: str | None = None) -> ContainerSetup:
    directory = work / "bundle"
    directory.mkdir()
    if bundle is not None:
        return _from_bundle(directory, Path(bundle))
    if rootfs is not None:
        path = Path(rootfs).resolve()
        if not path.is_dir():
            raise ConfigError(f"--rootfs {rootfs}: not a directory")
        return ContainerSetup(directory, path, harness_spec(path))
    path = make_busybox_rootfs(directory / "rootfs")
    return ContainerSetup(directory, path, harness_spec(path))


def _from_bundle(directory: Path, bundle: Path) -> ContainerSetup:
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--bundle {bundle}: cannot read its config.json: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("root"), dict) or not config["root"].get("path"):
        raise ConfigError(f"--bundle {bundle}: config.json has no root.path")
    rootfs = (bundle / config["root"]["path"]).resolve()
    if not rootfs.is_dir():
        raise ConfigError(f"--bundle {bundle}: its rootfs {rootfs} is not a directory")
    config["root"]["path"] = str(rootfs)
    for mount in config.get("mounts") or []:
        source = mount.get("source")
        is_bind = mount.get("type") == "bind" or {"bind", "rbind"} & set(mount.get("options") or [])
        if is_bind and isinstance(source, str) and source and not os.path.isabs(source):
            mount["source"] = str((bundle / source).resolve())  # bundle-relative, as runc reads it
    notes = []
    resources = config.setdefault("linux", {}).setdefault("resources", {})
    if not (resources.get("pids") or {}).get("limit"):
        resources["pids"] = {"limit": PIDS_LIMIT}
        notes.append(f"pids limit {PIDS_LIMIT} set by the harness (the spec has none)")
    if not (resources.get("memory") or {}).get("limit"):
        resources.setdefault("memory", {})["limit"] = MEMORY_LIMIT
        notes.append(f"memory limit {MEMORY_LIMIT >> 20} MiB set by the harness (the spec has none)")
    return ContainerSetup(directory, rootfs, config, notes)
