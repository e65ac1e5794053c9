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
                     help="kata-py (default), runc, crun, runsc, or the path of a runc-compatible runtime")
    run.add_argument("--format", choices=("table", "json"), default="table",
                     help="table (default) or json: the machine format (kata_py/harness/result.schema.json)")
    run.add_argument("--json", action="store_true", help="the same as --format json")
    run.add_argument("--probe", action="extend", nargs="+", metavar="NAME",
                     help="run only these probes (see `kata-py harness list`)")
    run.add_argument("--allow-inconclusive", action="store_true",
                     help="exit 0 even when a probe is inconclusive (exit status 3 otherwise)")
    run.add_argument("--control", action="store_true",
                     help="run every probe (or those named) in its positive control under runc instead: each "
                          "must report broke (exit status 4 when one held)")
    remote = run.add_argument_group("remote nodes (over SSH; see README, Remote runs)")
    remote.add_argument("--host", action="append", metavar="ssh://USER@NODE[:PORT]",
                        help="run the battery on this node, with its runtime (repeatable)")
    remote.add_argument("--hosts", metavar="FILE",
                        help="nodes to run on at once: one ssh:// URL a line, optionally followed by a runtime")
    remote.add_argument("--identity", metavar="FILE", help="the private key to log in with (else ssh-agent, "
                        "then ~/.ssh/id_*); never a password")
    remote.add_argument("--known-hosts", metavar="FILE", help="host keys to check nodes against "
                        "(default ~/.ssh/known_hosts)")
    remote.add_argument("--accept-new-host-key", action="store_true",
                        help="trust and record the key of a node not in known_hosts (a changed key is always refused)")
    run.set_defaults(func=cmd_run)
    listing = harness_sub.add_parser("list", help="list the probes")
    listing.set_defaults(func=cmd_list)
    report = harness_sub.add_parser("report", help="render results of `harness run --format json` as a matrix")
    report.add_argument("results", nargs="+", metavar="RESULT.json", help="results, from one or more hosts and runtimes")
    report.add_argument("--format", choices=("md", "html", "json"), default="md",
                        help="md (default), html (one self-contained page) or json (the results, merged)")
    report.add_argument("-o", "--output", metavar="FILE", help="write it here instead of stdout")
    report.set_defaults(func=cmd_report)


def cmd_run(args) -> int:
    import signal
    import sys

    from ..harness.report import as_json, as_table
    from ..harness.runner import exit_status, run_harness

    args.json = args.json or args.format == "json"
    if args.control:
        return _run_controls(args)
    if args.host or args.hosts:
        from ..harness.remote import cmd_remote

        return cmd_remote(args)
    # A TERM (a CI timeout) unwinds like an error: the container, the marker
    # process and the planted files are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    report = run_harness(args.runtime, bundle=args.bundle, rootfs=args.rootfs, probe_names=args.probe)
    print(as_json(report) if args.json else as_table(report))
    return exit_status([report], args.allow_inconclusive)


def _run_controls(args) -> int:
    import json

    from ..errors import ConfigError
    from ..harness.controls import run_controls
    from ..harness.report import as_table
    from ..harness.runner import exit_status

    if args.bundle or args.rootfs or args.host or args.hosts or args.runtime != "kata-py":
        raise ConfigError("--control runs the harness's own controls under runc: it takes no --bundle, --rootfs, "
                          "--runtime or --host")
    reports = run_controls(args.probe)
    print(json.dumps([r.as_dict() for r in reports], indent=2) if args.json
          else "\n\n".join(as_table(r) for r in reports))
    return exit_status(reports, args.allow_inconclusive, control=True)


def cmd_report(args) -> int:
    from ..errors import ConfigError
    from ..harness.report import load, render

    text = render(load(args.results), args.format)
    if args.output is None:
        print(text, end="")
        return 0
    try:
        with open(args.output, "w") as out:
            out.write(text)
    except OSError as exc:
        raise ConfigError(f"-o {args.output}: {exc.strerror or exc}") from None
    return 0


def cmd_list(args) -> int:
    from ..harness.catalog import PROBES

    width = max(len(p.name) for p in PROBES)
    for probe in PROBES:
        print(f"{probe.name.ljust(width)}  {probe.title}" + ("" if probe.default else "  [not in the default run]"))
    return 0
