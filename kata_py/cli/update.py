"""`kata-py update`: change a running container's resource limits (in its VM's cgroup)."""

from __future__ import annotations

import json
import sys

from ..errors import ConfigError
from .common import add_id, store

# flag -> (section, member, type)
FLAGS = {
    "memory": ("memory", "limit", int), "memory_reservation": ("memory", "reservation", int),
    "memory_swap": ("memory", "swap", int), "cpu_shares": ("cpu", "shares", int),
    "cpu_quota": ("cpu", "quota", int), "cpu_period": ("cpu", "period", int),
    "cpuset_cpus": ("cpu", "cpus", str), "cpuset_mems": ("cpu", "mems", str),
    "pids_limit": ("pids", "limit", int), "blkio_weight": ("blockIO", "weight", int),
}


def add_parser(sub) -> None:
    parser = sub.add_parser("update", help="update a container's resource limits")
    parser.add_argument("--resources", "-r", help="an OCI linux.resources JSON file, or - for stdin")
    for flag, (_, _, kind) in FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind)
    add_id(parser)
    parser.set_defaults(func=cmd_update)


def resources_from(args) -> dict:
    resources: dict = {}
    if args.resources:
        try:
            text = sys.stdin.read() if args.resources == "-" else open(args.resources).read()
            resources = json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resources: {exc}") from None
        if not isinstance(resources, dict):
            raise ConfigError("--resources: expected a JSON object (OCI linux.resources)")
    for flag, (section, member, _) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            resources.setdefault(section, {})[member] = value
    if not resources:
        raise ConfigError("update: nothing to change (give --resources or a limit flag)")
    return resources


def cmd_update(args) -> int:
    from ..oci.container import update

    update(store(args), args.container_id, resources_from(args))
    return 0
