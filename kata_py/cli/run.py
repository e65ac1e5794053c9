"""`kata-py run`: create + start, then wait for the container (unless --detach)."""

from .common import add_id, store
from .create import add_create_flags, check_create_flags


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="create and start a container")
    add_create_flags(parser)
    parser.add_argument("--detach", "-d", action="store_true", help="return once the container runs")
    parser.add_argument("--keep", action="store_true", help="do not delete the container after it exits")
    add_id(parser)
    parser.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    import signal

    from ..oci.container import create, delete, start
    from ..timing import mark

    mark("cli_run")
    check_create_flags(args)
    st = store(args)
    owner = create(st, args.container_id, args.bundle, args.pid_file, args.console_socket, args.log,
                     no_pivot=args.no_pivot, log_format=args.log_format)
    mark("cli_created")
    try:
        start(st, args.container_id)
    except BaseException:
        delete(st, args.container_id, force=True)
        raise
    mark("cli_started")
    if args.detach:
        return 0
    # The sandbox owner relays stdio and forwards signals; we pass ours to it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, lambda s, _f: owner.send_signal(s))
    status = owner.wait()
    mark("cli_owner_exited")
    if not args.keep:
        delete(st, args.container_id, force=True)
        mark("cli_deleted")
    return status if status >= 0 else 128 - status
