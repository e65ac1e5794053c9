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


def check_create_flags(args) -> None:
    """What can be refused before anything is created: a VM boot later, a missing
    pid-file directory would leave a running container behind an error."""
    import os
    import stat
    from pathlib import Path

    from ..errors import ConfigError

    if args.preserve_fds:
        raise ConfigError("--preserve-fds: host file descriptors cannot be passed into a VM sandbox")
    if args.pid_file is not None:
        target = Path(args.pid_file)
        if not args.pid_file or target.is_dir():
            raise ConfigError(f"--pid-file {args.pid_file!r}: not a file name")
        if not target.resolve().parent.is_dir():
            raise ConfigError(f"--pid-file {args.pid_file}: directory {target.resolve().parent} does not exist")
    if args.console_socket is not None:
        try:
            mode = os.stat(args.console_socket).st_mode
        except OSError as exc:
            raise ConfigError(f"--console-socket {args.console_socket}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"--console-socket {args.console_socket}: not a Unix socket")


def cmd_create(args) -> int:
    from ..oci.container import create

    check_create_flags(args)
    create(store(args), args.container_id, args.bundle, args.pid_file, args.console_socket, args.log,
           no_pivot=args.no_pivot, log_format=args.log_format)
    return 0
