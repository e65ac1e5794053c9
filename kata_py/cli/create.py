"""`kata-py create`: boot the container's VM and hold its process before exec."""

from __future__ import annotations

from .common import add_id, store


def add_create_flags(parser) -> None:
    parser.add_argument("--bundle", "-b", default=".", help="path to the OCI bundle (default: .)")
    parser.add_argument("--console-socket", help="Unix socket to send the pty master to (terminal: true)")
    parser.add_argument("--pid-file", help="file to write the container's (monitor's) pid to")
    parser.add_argument("--no-pivot", action="store_true", help="MS_MOVE + chroot into the rootfs instead of pivot_root (inside the guest)")
    parser.add_argument("--no-new-keyring", action="store_true", help="accepted; keyrings are per guest kernel")
    parser.add_argument("--preserve-fds", type=int, default=0, help="not supported beyond 0 (fds cannot cross into a VM)")


def add_parser(sub) -> None:
    parser = sub.add_parser("create", help="create a container")
    add_create_flags(parser)
    add_id(parser)
    parser.set_defaults(func=cmd_create)


def check_preserve_fds(args) -> None:
    from ..errors import ConfigError

    if args.preserve_fds:
        raise ConfigError("--preserve-fds: host file descriptors cannot be passed into a VM sandbox")


def cmd_create(args) -> int:
    from ..oci.container import create

    check_preserve_fds(args)
    create(store(args), args.container_id, args.bundle, args.pid_file, args.console_socket, args.log,
           no_pivot=args.no_pivot)
    return 0
