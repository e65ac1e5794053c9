"""`kata-py list`: the containers under --root."""

import json

from .common import store


def add_parser(sub) -> None:
    parser = sub.add_parser("list", help="list containers")
    parser.add_argument("--format", "-f", choices=("table", "json"), default="table")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the ids")
    parser.set_defaults(func=cmd_list)


def cmd_list(args) -> int:
    from ..errors import KataError

    st = store(args)
    states = []
    for container_id in st.list_ids():
        try:
            states.append(st.load(container_id).oci_state())
        except KataError:
            continue  # deleted while we looked
    if args.quiet:
        for state in states:
            print(state["id"])
    elif args.format == "json":
        print(json.dumps(states))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")] + [
            (s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]) for s in states]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            print("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
