"""The node's side of a remote run: started over SSH from the bundle the
client copied there (`python3 -I harness.pyz run --runtime R ...`), it runs
the battery with that node's runtime and streams what it finds as JSON
lines on stdout, so the client knows every result that came back before a
connection was cut.

The battery runs in the chunks the runner itself splits it into: the
ordinary probes (one exec in one container), then each probe that runs an
exec of its own (the bombs), each chunk a run of its own whose result is
sent as soon as it is decided. A chunk's container and host fixtures are
removed before the next starts, so a cut connection leaves at most the
chunk that was running, and this process stops after it (its next line
cannot be written).

Lines: {"event": "started", "pid"}, {"event": "probes", "probes": [{name,
title}]}, {"event": "running", "probes": [names]}, {"event": "chunk",
"report": {...}} (the local JSON report of that chunk), {"event": "error",
"message"}, {"event": "done"}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

from ..errors import ConfigError, KataError
from . import catalog
from .probe import Probe
from .runtime import KNOWN


class ClientGone(Exception):
    """stdout is closed: the SSH connection that started us is gone."""


def emit(event: dict) -> None:
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError) as exc:
        # Nothing more can be said to anyone; the interpreter's own flush at exit must not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise ClientGone() from exc


def node_runtime(spec: str) -> str:
    """The runtime as the harness resolves it on this node: a path as given;
    runc, crun and runsc by name (with the flags they need); any other name
    (kata-py, kata-runtime) is the executable of that name on this node's PATH."""
    if os.sep in spec or spec in KNOWN:
        return spec
    path = shutil.which(spec)
    if path is None:
        raise ConfigError(f"--runtime {spec}: not installed on this node ({spec} is not on its PATH)")
    return path


def chunks(probes: list[Probe]) -> list[list[Probe]]:
    ordinary = [probe for probe in probes if probe.during is None]
    return ([ordinary] if ordinary else []) + [[probe] for probe in probes if probe.during is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.pyz")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--runtime", required=True)
    run.add_argument("--probe", nargs="*", default=None)
    args = parser.parse_args(argv)
    # TERM (the client's cleanup, finding us orphaned) unwinds like an error:
    # the running chunk's container and fixtures are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        emit({"event": "started", "pid": os.getpid()})
        try:
            from .runner import run_harness

            runtime = node_runtime(args.runtime)
            probes = catalog.select(args.probe or None)
            emit({"event": "probes", "probes": [{"name": p.name, "title": p.title} for p in probes]})
            for chunk in chunks(probes):
                emit({"event": "running", "probes": [p.name for p in chunk]})
                report = run_harness(runtime, probe_names=[p.name for p in chunk])
                emit({"event": "chunk", "report": report.as_dict()})
        except KataError as exc:
            emit({"event": "error", "message": str(exc)})
            return 1
        emit({"event": "done"})
    except ClientGone:
        return 3
    return 0
