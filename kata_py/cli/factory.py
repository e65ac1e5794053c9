"""`kata-py factory start|status|stop`: the pool of booted, idle sandbox VMs."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    parser = sub.add_parser("factory", help="a pool of booted VMs that create takes from (Kata's VM cache)")
    actions = parser.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start the factory daemon")
    start.add_argument("--size", type=int, help="idle VMs to keep (default: [factory] size in the config file)")
    start.add_argument("--memory", type=int, help="MiB per VM (default: [factory] memory_mib)")
    start.add_argument("--cpus", type=int, help="vCPUs per VM (default: [factory] cpus)")
    start.add_argument("--wait", type=float, metavar="SECONDS", default=0.0,
                       help="wait up to SECONDS for the pool to fill")
    actions.add_parser("status", help="show the pool (JSON)")
    actions.add_parser("stop", help="stop the factory and its idle VMs")
    parser.set_defaults(func=cmd_factory)


def cmd_factory(args) -> int:
    from ..config import load_factory_config
    from ..errors import ConfigError
    from ..factory import client
    from ..sandbox import pool

    if args.action == "start":
        config = load_factory_config()
        size = config.size if args.size is None else args.size
        memory = config.memory_mib if args.memory is None else args.memory
        cpus = config.cpus if args.cpus is None else args.cpus
        if not 1 <= size <= 64 or not 128 <= memory <= 16384 or not 1 <= cpus <= 64:
            raise ConfigError("factory: --size 1..64, --memory 128..16384, --cpus 1..64")
        status = client.start(size, memory, cpus)
        if args.wait > 0:
            status = client.wait_ready(args.wait)
        print(json.dumps(status))
        return 0
    if args.action == "status":
        status = pool.request({"op": "status"})
        print(json.dumps(status if status is not None else {"running": False}))
        return 0
    if not client.stop():
        raise pool.FactoryError("the factory is not running")
    return 0
