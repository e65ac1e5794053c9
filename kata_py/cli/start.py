"""`kata-py start`: let a created container's process exec."""

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("start", help="start a created container")
    add_id(parser)
    parser.set_defaults(func=cmd_start)


def cmd_start(args) -> int:
    from ..oci.container import start

    start(store(args), args.container_id)
    return 0
