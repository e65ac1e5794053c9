"""OCI `root`, `mounts` and `linux` -> the agent's create_container request.

Filesystem mounts (proc, tmpfs, ...) pass through for the agent to make
inside the guest. Bind mounts cannot: their sources are host paths, so each
one is added to the sandbox's export (planned here, bound by the sandbox
owner: kata_py.sandbox.single.PlannedShare) and the agent binds it from
there. Device binds take the guest's device of the same path.
"""

from __future__ import annotations

import os
import stat

from ..errors import ConfigError
from ..sandbox.single import ROOTFS_ENTRY, PlannedShare

# The guest namespaces a spec can ask for. `network` is the VM's own (see the
# network layer) and `time` is not made per container.
GUEST_NAMESPACES = ("pid", "mount", "ipc", "uts", "cgroup", "user")


def is_bind(mount: dict) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def guest_mounts(config: dict, bundle: str, share: PlannedShare | None) -> list[dict]:
    """The spec's mounts for the agent; bind sources are added to `share`."""
    result = []
    for index, mount in enumerate(config.get("mounts") or []):
        entry = {"destination": mount["destination"], "options": list(mount.get("options") or [])}
        if mount.get("type"):
            entry["type"] = mount["type"]
        if not is_bind(mount):
            if mount.get("source"):
                entry["source"] = mount["source"]
            result.append(entry)
            continue
        source = mount.get("source", "")
        if not os.path.isabs(source):
            source = os.path.join(bundle, source)
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise ConfigError(f"config.json /mounts/{index}/source: {source}: {exc.strerror}") from None
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            if not source.startswith("/dev/"):
                raise ConfigError(f"config.json /mounts/{index}/source: device {source} is not under /dev")
            entry.update({"from": "guest", "source": source})
        elif share is None:
            raise ConfigError(f"config.json /mounts/{index}: bind mounts need the container's share")
        else:
            options = entry["options"]
            entry.update({"from": "share", "source": share.add(
                source, readonly="ro" in options, recursive="rbind" in options)})
        result.append(entry)
    return result


def create_container_args(agent_id: str, config: dict, bundle: str, share: PlannedShare | None,
                          no_pivot: bool = False, rootfs_entry: str = ROOTFS_ENTRY) -> dict:
    linux = config.get("linux") or {}
    root = config.get("root") or {}
    args = {
        "container_id": agent_id,
        "mount_tag": "rootfs",
        "readonly": bool(root.get("readonly")),
        "hostname": config.get("hostname", ""),
        "resources": linux.get("resources") or {},
        "namespaces": sorted({ns["type"] for ns in linux.get("namespaces") or [] if ns["type"] in GUEST_NAMESPACES}
                             | {"mount"}),
        "mounts": guest_mounts(config, bundle, share),
        "masked_paths": list(linux.get("maskedPaths") or []),
        "readonly_paths": list(linux.get("readonlyPaths") or []),
        "no_pivot": no_pivot,
    }
    if share is not None:
        args["rootfs_path"] = rootfs_entry
    if config.get("domainname"):
        args["domainname"] = config["domainname"]
    if linux.get("rootfsPropagation"):
        args["rootfs_propagation"] = linux["rootfsPropagation"]
    if linux.get("sysctl"):
        args["sysctl"] = [{"key": key, "value": value} for key, value in linux["sysctl"].items()]
    for key, name in (("uidMappings", "uid_mappings"), ("gidMappings", "gid_mappings")):
        if linux.get(key):
            args[name] = [{"container_id": m["containerID"], "host_id": m["hostID"], "size": m["size"]}
                          for m in linux[key]]
    if "user" in args["namespaces"] and not (args.get("uid_mappings") and args.get("gid_mappings")):
        raise ConfigError("config.json /linux/namespaces: a user namespace needs uidMappings and gidMappings")
    devices = []
    for device in linux.get("devices") or []:
        item = {"path": device["path"], "type": device["type"]}
        for key, name in (("major", "major"), ("minor", "minor"), ("fileMode", "file_mode"), ("uid", "uid"),
                          ("gid", "gid")):
            if device.get(key) is not None:
                item[name] = device[key]
        devices.append(item)
    if devices:
        args["devices"] = devices
    return args
