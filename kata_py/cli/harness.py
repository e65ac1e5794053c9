"""`kata-py harness`: the escape-probe harness (kata_py/harness)."""

from __future__ import annotations


def add_parser(sub) -> None:
    harness = sub.add_parser("harness", help="probe a container's isolation boundary from inside and outside")
    harness_sub = harness.add_subparsers(dest="harness_command", metavar="HARNESS_COMMAND", required=True)
    run = harness_sub.add_parser("run", help="run the probes in a container and print what held")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--bundle", help="an OCI bundle to run the probes in (its process is replaced)")
    source.add_argument("--rootfs", help="a root filesystem to run the probes in, with the harness's spec")
    run.add_argument("--runtime", default="kata-py",
                     help="kata-py (default), runc, crun, or the path of a runc-compatible runtime")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--probe", action="extend", nargs="+", metavar="NAME",
                     help="run only these probes (see `kata-py harness list`)")
    run.set_defaults(func=cmd_run)
    listing = harness_sub.add_parser("list", help="list the probes")
    listing.set_defaults(func=cmd_list)


def cmd_run(args) -> int:
    import signal
    import sys

    from ..harness.report import as_json, as_table
    from ..harness.runner import run_harness

    # A TERM (a CI timeout) unwinds like an error: the container, the marker
    # process and the planted files are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    report = run_harness(args.runtime, bundle=args.bundle, rootfs=args.rootfs, probe_names=args.probe)
    print(as_json(report) if args.json else as_table(report))
    return 0


def cmd_list(args) -> int:
    from ..harness.catalog import PROBES

    width = max(len(p.name) for p in PROBES)
    for probe in PROBES:
        print(f"{probe.name.ljust(width)}  {probe.title}" + ("" if probe.default else "  [not in the default run]"))
    return 0
