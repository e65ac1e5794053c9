"""`kata-py kill [--all] ID [SIGNAL]`."""

from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("kill", help="send a signal to a container's init process (--all: every process)")
    parser.add_argument("--all", "-a", action="store_true", help="signal every process of the container")
    add_id(parser)
    parser.add_argument("signal", nargs="?", default="SIGTERM", help="name or number (default SIGTERM)")
    parser.set_defaults(func=cmd_kill)


def cmd_kill(args) -> int:
    from ..oci.container import kill, parse_signal

    kill(store(args), args.container_id, parse_signal(args.signal), args.all)
    return 0
