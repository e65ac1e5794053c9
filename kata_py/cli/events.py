"""`kata-py events [--stats] [--interval S] ID`: stats and OOM events as JSON lines."""

from __future__ import annotations

import json
import sys
import time

from ..errors import KataError
from .common import add_id, store


def add_parser(sub) -> None:
    parser = sub.add_parser("events", help="display container events (stats, OOM) as JSON")
    parser.add_argument("--stats", action="store_true", help="print one stats event and exit")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between stats events")
    add_id(parser)
    parser.set_defaults(func=cmd_events)


def stats_event(container_id: str, raw: dict) -> dict:
    """runc's stats event shape, from the guest's cgroup v2 figures."""
    memory, cpu, pids = raw["memory"], raw["cpu"], raw["pids"]
    return {"type": "stats", "id": container_id, "data": {
        "cpu": {"usage": {"total": cpu["usage_usec"] * 1000, "user": cpu["user_usec"] * 1000,
                          "kernel": cpu["system_usec"] * 1000}},
        "memory": {"usage": {"usage": memory["usage"], "limit": memory["limit"] or 0},
                   "swap": {"usage": memory["swap_usage"]},
                   "raw": {"anon": memory["anon"], "file": memory["file"], "oom": memory["oom"],
                           "oom_kill": memory["oom_kill"]}},
        "pids": {"current": pids["current"], "limit": pids["limit"] or 0},
    }}


def cmd_events(args) -> int:
    from ..oci.container import stats

    st = store(args)
    if args.stats:
        print(json.dumps(stats_event(args.container_id, stats(st, args.container_id))))
        return 0
    oom_seen = None
    while True:
        try:
            raw = stats(st, args.container_id)
        except KataError:
            if st.load(args.container_id).live_status().value == "stopped":
                return 0  # the container is gone: so is its event stream
            raise
        oom_kill = raw["memory"]["oom_kill"]
        if oom_seen is not None and oom_kill > oom_seen:
            print(json.dumps({"type": "oom", "id": args.container_id}), flush=True)
        oom_seen = oom_kill
        print(json.dumps(stats_event(args.container_id, raw)), flush=True)
        sys.stdout.flush()
        time.sleep(args.interval)
