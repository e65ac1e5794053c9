"""Entry point: global flags, subcommand dispatch, and the error contract.

A KataError becomes one line on stderr (and an error record in --log) and exit
status 1; the subcommand modules never print errors themselves.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import ConfigError, KataError
from . import logging_setup

# subcommand -> module in kata_py.cli; imported only when used, so `kata-py
# state` does not pay for what `kata-py vm run` needs.
SUBCOMMANDS = {name: name for name in (
    "create", "start", "state", "kill", "delete", "run", "exec", "list", "ps", "events", "update", "pause", "resume",
    "spec", "features", "vm", "check", "image", "factory", "harness")}


# Global options that take a value (the word after them is not a subcommand).
VALUE_OPTIONS = ("--log", "--log-format", "--root", "--rootless")


def named_command(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is neither a global
    option nor an option's value), if it is one of ours."""
    words = iter(argv)
    for word in words:
        if word in VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given argv naming a subcommand, with only that subcommand's
    module imported (`kata-py state` must not pay for `vm run`'s asyncio). Help,
    a typo or no subcommand get them all."""
    parser = argparse.ArgumentParser(prog="kata-py", description="VM-sandboxed OCI container runtime")
    parser.add_argument("--version", "-v", action="version", version=f"kata-py version {__version__}")
    parser.add_argument("--debug", action="store_true", help="enable debug logging")
    parser.add_argument("--log", metavar="FILE", help="write log records to FILE")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--root", default="/run/kata-py", help="root directory for container state")
    parser.add_argument("--systemd-cgroup", action="store_true",
                        help="accepted for compatibility; the container's cgroup lives inside its VM, "
                             "so the host's cgroup manager is not involved")
    parser.add_argument("--rootless", default="false", help="only false is supported")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = named_command(argv) if argv is not None and "-h" not in argv and "--help" not in argv else None
    for name, module in SUBCOMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"{__package__}.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        logging_setup.setup(args.log, args.log_format, args.debug)
    except OSError as exc:
        print(f"kata-py: --log {args.log}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        if args.rootless not in ("false", "auto"):
            raise ConfigError("--rootless: rootless containers are not supported by kata-py")
        status = args.func(args)
    except KataError as exc:
        logging.getLogger("kata_py").error("%s", exc)
        if args.debug and hasattr(exc, "full_report"):
            print(exc.full_report(), file=sys.stderr)
        print(f"kata-py: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(status or 0)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
