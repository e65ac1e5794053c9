"""`kata-py exec`: run one more process in a running container."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError, KataError
from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("exec", help="run a process in a running container")
    parser.add_argument("--process", "-p", help="path to a process.json (OCI process object)")
    parser.add_argument("--detach", "-d", action="store_true")
    parser.add_argument("--pid-file")
    parser.add_argument("--tty", "-t", action="store_true")
    parser.add_argument("--console-socket")
    parser.add_argument("--env", "-e", action="append", default=[])
    parser.add_argument("--cwd")
    parser.add_argument("--user", "-u")
    parser.add_argument("--additional-gids", "-g", action="append", default=[])
    parser.add_argument("--preserve-fds", type=int, default=0)
    parser.add_argument("--no-new-privs", action="store_true", help="set no_new_privs for the process")
    parser.add_argument("--cap", "-c", action="append", default=[],
                        help="add a capability (CAP_...) to the process's bounding, effective and permitted sets")
    parser.add_argument("--process-label")
    parser.add_argument("--apparmor")
    parser.add_argument("--ignore-paused", action="store_true")
    add_id(parser)
    # Everything after the id is the command, options included (`exec ID sh -c
    # ...`), as runc's flag parsing stops at the first positional. Its own dest:
    # "command" is the top-level parser's subcommand name.
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND")
    parser.set_defaults(func=cmd_exec)


def process_spec(args) -> dict:
    if args.process:
        try:
            with open(args.process) as f:
                spec = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--process {args.process}: {exc}") from None
        if not isinstance(spec, dict) or not spec.get("args"):
            raise ConfigError(f"--process {args.process}: an OCI process object with args is required")
    else:
        if not args.argv:
            raise ConfigError("exec needs a command (or --process)")
        spec = {"args": args.argv, "cwd": "/", "env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if args.tty:
        spec["terminal"] = True
    spec.setdefault("env", [])
    spec["env"] = list(spec["env"]) + args.env
    if args.cwd:
        spec["cwd"] = args.cwd
    if args.user:
        from ..oci.process_spec import parse_user

        user = parse_user(args.user)
        spec["user"] = {"uid": user["uid"], "gid": user["gid"]}
    if args.additional_gids:
        spec.setdefault("user", {"uid": 0, "gid": 0})["additionalGids"] = [int(g) for g in args.additional_gids]
    if not str(spec.get("cwd", "/")).startswith("/"):
        raise ConfigError("exec: the working directory must be absolute")
    return spec


class ExecFailed(KataError):
    """An exec that failed before its process ran: runc's wording and status
    (255, so that it cannot be mistaken for the process's own exit status)."""

    exit_code = 255


def cmd_exec(args) -> int:
    try:
        return _exec(args)
    except ExecFailed:
        raise
    except KataError as exc:
        raise ExecFailed(f"exec failed: {exc}") from exc


def _exec(args) -> int:
    from ..oci.container import exec_detached
    from ..oci.exec_process import container_process, run_attached, with_container_defaults

    if args.preserve_fds:
        raise ConfigError("--preserve-fds: host file descriptors cannot be passed into a VM sandbox")
    spec = with_container_defaults(process_spec(args), container_process(store(args), args.container_id),
                                   add_caps=args.cap, no_new_privs=args.no_new_privs)
    if spec.get("terminal") and not args.console_socket and args.detach:
        raise ConfigError("exec --tty --detach needs --console-socket")
    if args.detach:
        exec_detached(store(args), args.container_id, spec, args.pid_file, args.console_socket, args.log,
                      args.log_format)
        return 0
    return run_attached(store(args), args.container_id, spec, args.console_socket)
