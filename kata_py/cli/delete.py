"""`kata-py delete [--force] ID`: remove a container and everything it had."""

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("delete", help="delete a container")
    parser.add_argument("--force", "-f", action="store_true", help="kill the container first if it runs")
    add_id(parser)
    parser.set_defaults(func=cmd_delete)


def cmd_delete(args) -> int:
    from ..oci.container import delete

    delete(store(args), args.container_id, args.force)
    return 0
