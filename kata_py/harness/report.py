"""A harness report as a table (probe, held/broke, one line of evidence) or as JSON."""

from __future__ import annotations

import json

from .runner import HarnessReport


def as_json(report: HarnessReport) -> str:
    return json.dumps(report.as_dict(), indent=2)


def as_table(report: HarnessReport) -> str:
    summary = report.as_dict()["summary"]
    lines = [f"runtime {report.runtime} ({report.runtime_version}) on host kernel {report.host_kernel}, "
             f"{report.seconds:.0f} s: {summary['held']} held, {summary['broke']} broke"
             + (f", {summary['skipped']} skipped" if summary["skipped"] else "")]
    lines += [f"note: {note}" for note in report.notes]
    width = max([len("PROBE")] + [len(r.name) for r in report.results])
    lines.append(f"{'PROBE'.ljust(width)}  {'RESULT'.ljust(7)}  EVIDENCE")
    lines += [f"{r.name.ljust(width)}  {r.result.ljust(7)}  {r.evidence}" for r in report.results]
    return "\n".join(lines)
