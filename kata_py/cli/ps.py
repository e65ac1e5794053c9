"""`kata-py ps [--format table|json] ID`: the container's processes (guest pids)."""

import json

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("ps", help="list the processes running in a container (pids inside its VM)")
    parser.add_argument("--format", "-f", choices=("table", "json"), default="table")
    add_id(parser)
    parser.add_argument("ps_args", nargs="*", help="accepted for runc compatibility; ignored")
    parser.set_defaults(func=cmd_ps)


def cmd_ps(args) -> int:
    from ..oci.container import processes

    found = processes(store(args), args.container_id)
    if args.format == "json":
        # runc prints host pids; a VM container's processes only have guest pids.
        print(json.dumps([p["pid"] for p in found]))
    else:
        print(f"{'PID':>7}  CMD")
        for p in found:
            print(f"{p['pid']:>7}  {p['cmd']}")
    return 0
