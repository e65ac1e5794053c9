"""Positive controls: for every probe, a configuration in which it must
report broke, so that no probe can be silently blind. Each is runc (a
shared kernel) with the harness's own spec, weakened as little as the
probes need:

shared-kernel  the spec as it is: runc runs on the host's kernel
privileged     every capability the harness has, only a mount namespace
               (the host's pid, network, ipc, uts and cgroup namespaces),
               every device allowed, nothing masked or read-only in /proc,
               a writable /sys, and the directory holding the rootfs and
               the canaries bind-mounted at its own path
leaked-fd      the spec as it is, but the probes' exec gets an fd on a
               host directory (`--preserve-fds`): what a runtime that
               leaks one hands the container
unlimited      the spec without its pids and memory limits
symlink-followed
               the spec as it is, but the second container the
               mount-symlink probe starts gets its mount destinations
               resolved on the host, through the symlink container 1
               planted, before they are handed to runc: what a runtime
               without a rootfs-confined resolution (no securejoin, a
               host-side mount as in Kata's CVE-2020-2026) does. The
               resolution is used only where it lands inside that
               container's own rootfs, so the token lands on the
               harness's directory there, never elsewhere on the host

Every break a control provokes is one the probes make harmless (see each
probe: canaries, the harness's own processes and listeners, values put
back at once, equivalent spellings of kernel helper paths).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError
from . import catalog, mount_probes
from .probe import Probe
from .runner import HarnessReport, run_harness

RUNTIME = "runc"


@dataclass(frozen=True)
class Control:
    name: str
    description: str
    weaken: Callable[[dict, object], None]  # (the harness's spec, the host side), in place
    leak_fd: bool = False


def _as_is(spec: dict, host) -> None:
    pass


def _privileged(spec: dict, host) -> None:
    caps = host_capabilities()
    process = spec.setdefault("process", {})
    process["capabilities"] = {key: list(caps) for key in ("bounding", "effective", "permitted")}
    process.pop("noNewPrivileges", None)
    process.pop("apparmorProfile", None)
    linux = spec.setdefault("linux", {})
    linux["namespaces"] = [{"type": "mount"}]
    linux.pop("maskedPaths", None)
    linux.pop("readonlyPaths", None)
    linux.pop("seccomp", None)
    linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    mounts = copy.deepcopy(spec.get("mounts") or [])
    for mount in mounts:
        if mount.get("type") == "sysfs":
            mount["options"] = [o for o in mount.get("options", []) if o != "ro"]
    beside = str(host.rootfs.parent)
    mounts.append({"destination": beside, "type": "bind", "source": beside, "options": ["rbind", "rw"]})
    spec["mounts"] = mounts
    spec.pop("hostname", None)  # no UTS namespace of its own


def _follow_symlinks(spec: dict, host) -> None:
    host.fixtures[mount_probes.FOLLOW_ON_HOST] = True


def _unlimited(spec: dict, host) -> None:
    resources = spec.setdefault("linux", {}).setdefault("resources", {})
    resources.pop("pids", None)
    resources.pop("memory", None)


def host_capabilities() -> list[str]:
    """The capabilities in this process's bounding set, by name."""
    from pathlib import Path

    from ..protocol.oci_names import CAPABILITIES

    bounding = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("CapBnd:")).split()[1], 16)
    return [name for number, name in enumerate(CAPABILITIES) if bounding >> number & 1]


CONTROLS = {control.name: control for control in (
    Control("shared-kernel", "runc with the harness's spec: the host's kernel", _as_is),
    Control("privileged", "runc, all capabilities, only a mount namespace, all devices, /proc and /sys "
            "writable, the rootfs's directory bind-mounted", _privileged),
    Control("leaked-fd", "runc with the harness's spec; the probes' exec holds an fd on a host directory",
            _as_is, leak_fd=True),
    Control("unlimited", "runc with the harness's spec without its pids and memory limits", _unlimited),
    Control("symlink-followed", "runc with the harness's spec; the second container of mount-symlink gets its "
            "mount destinations resolved on the host through the symlink container 1 planted (no securejoin)",
            _follow_symlinks),
)}


def plan(probe_names: list[str] | None = None) -> list[tuple[Control, list[Probe]]]:
    """Each control configuration with the probes (all of them by default,
    opt-in ones included) it must break, in battery order."""
    probes = catalog.select(probe_names) if probe_names else list(catalog.PROBES)
    unknown = sorted({p.control for p in probes} - set(CONTROLS))
    if unknown:
        raise ConfigError(f"probe control(s) {', '.join(unknown)} are not defined")
    return [(control, [p for p in probes if p.control == name]) for name, control in CONTROLS.items()
            if any(p.control == name for p in probes)]


def run_controls(probe_names: list[str] | None = None) -> list[HarnessReport]:
    """Every probe in its positive control; one container per configuration."""
    if shutil.which(RUNTIME) is None:
        raise ConfigError(f"the positive controls run under {RUNTIME}, which is not installed (Debian package "
                          f"{RUNTIME})")
    return [run_harness(RUNTIME, control=control, probes=probes) for control, probes in plan(probe_names)]
