"""`kata-py state`: the OCI state of a container, as JSON."""

import json

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("state", help="print the state of a container")
    add_id(parser)
    parser.set_defaults(func=cmd_state)


def cmd_state(args) -> int:
    print(json.dumps(store(args).load(args.container_id).oci_state(), indent=2))
    return 0
