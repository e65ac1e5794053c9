"""`kata-py pause ID`: stop the container's whole VM (QMP stop)."""

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("pause", help="pause all processes of a container (the VM's vCPUs stop)")
    add_id(parser)
    parser.set_defaults(func=cmd_pause)


def cmd_pause(args) -> int:
    from ..oci.container import pause

    pause(store(args), args.container_id)
    return 0
