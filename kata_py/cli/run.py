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
    import os
    import signal

    from ..oci.container import create, delete, delete_after_teardown, mark_exited, start, wait_exit_report
    from ..timing import mark

    mark("cli_run")
    check_create_flags(args)
    st = store(args)
    # In the foreground, the owner reports the init's exit before it tears the
    # VM down: the status is returned then, and the teardown goes on in the
    # owner (delete_after_teardown removes the container once it is done).
    exit_read, exit_write = os.pipe2(os.O_CLOEXEC) if not args.detach else (-1, -1)
    try:
        owner = create(st, args.container_id, args.bundle, args.pid_file, args.console_socket, args.log,
                       no_pivot=args.no_pivot, log_format=args.log_format, exit_fd=exit_write)
    except BaseException:
        if exit_read >= 0:
            os.close(exit_read)
        raise
    finally:
        if exit_write >= 0:
            os.close(exit_write)
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
    try:
        status = wait_exit_report(exit_read)
    finally:
        os.close(exit_read)
    if status is not None:
        mark("cli_container_exited")
        mark_exited(st, args.container_id)
        # A poststop hook runs once the container is deleted, as ever: before `run` returns.
        if args.keep or not st.load(args.container_id).config_hooks.get("poststop"):
            if not args.keep:
                delete_after_teardown(st, args.container_id)
            return status
    returncode = owner.wait()
    mark("cli_owner_exited")
    if not args.keep:
        delete(st, args.container_id, force=True)
        mark("cli_deleted")
    if status is not None:
        return status
    return returncode if returncode >= 0 else 128 - returncode
