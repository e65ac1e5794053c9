"""`kata-py vm run`: boot a fresh sandbox VM, run one command in it, tear down."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..errors import ConfigError


def add_parser(sub) -> None:
    vm = sub.add_parser("vm", help="run commands in a bare sandbox VM (no container)")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
    run = vm_sub.add_parser("run", help="boot a VM, run CMD as root in it, exit with its status")
    run.add_argument("--memory", type=int, default=128, metavar="MiB", help="guest RAM (default 128)")
    run.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    run.add_argument("--machine", choices=("microvm", "q35"), default="microvm")
    run.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--cwd", default="/")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    run.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("vm run needs a command: kata-py vm run -- CMD ARGS...")
    if not 64 <= args.memory <= 65536:
        raise ConfigError(f"--memory {args.memory}: use 64 to 65536 MiB")
    if not 1 <= args.cpus <= 64:
        raise ConfigError(f"--cpus {args.cpus}: use 1 to 64")
    for item in args.env:
        if "=" not in item:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
    return asyncio.run(_run(args, cmd))


async def _run(args, cmd: list[str]) -> int:
    from ..image import ensure_image
    from ..sandbox.process import run_process
    from ..sandbox.sandbox import Sandbox

    image = ensure_image(progress=sys.stderr.isatty())
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
           "TERM=xterm"] + args.env
    async with Sandbox(image, memory_mib=args.memory, cpus=args.cpus, machine=args.machine) as sandbox:
        return await run_process(sandbox, cmd, env=env, cwd=args.cwd, forward_signals=True)
