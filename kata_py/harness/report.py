"""A harness report: one run as a table or JSON (`harness run`), and one or
more runs' JSON as a matrix of probes x (host, runtime) in Markdown or a
single self-contained HTML page (`harness report`), each cell linking the
evidence that decided it, with a summary line per run."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from ..errors import ConfigError
from .probe import RESULTS
from .runner import SCHEMA, HarnessReport

SCHEMA_FILE = Path(__file__).with_name("result.schema.json")
REQUIRED = ("runtime", "host", "results", "summary")
MARK = {"held": "held", "broke": "BROKE", "inconclusive": "inconclusive"}


def as_json(report: HarnessReport) -> str:
    return json.dumps(report.as_dict(), indent=2)


def as_table(report: HarnessReport) -> str:
    summary = report.summary
    where = "" if report.configuration == "default" else f" [positive control: {report.configuration}]"
    lines = [f"runtime {report.runtime} ({report.runtime_version}) on {report.host}, kernel {report.host_kernel}"
             f"{where}, {report.seconds:.0f} s: {summary['held']} held, {summary['broke']} broke"
             + (f", {summary['inconclusive']} inconclusive" if summary["inconclusive"] else "")]
    lines += [f"note: {note}" for note in report.notes]
    width = max([len("PROBE")] + [len(r.name) for r in report.results])
    lines.append(f"{'PROBE'.ljust(width)}  {'RESULT'.ljust(12)}  EVIDENCE")
    lines += [f"{r.name.ljust(width)}  {r.result.ljust(12)}  " + (f"[{r.reason}] " if r.reason else "") + r.evidence
              for r in report.results]
    return "\n".join(lines)


# -- several runs


def load(paths: list[str]) -> list[dict]:
    """Results as `harness run --format json` wrote them (a file may hold one, or a list of them)."""
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read a harness result: {exc}") from None
        for run in data if isinstance(data, list) else [data]:
            if not isinstance(run, dict) or run.get("schema") != SCHEMA or any(k not in run for k in REQUIRED):
                raise ConfigError(f"{path}: not a harness result ({SCHEMA}: `kata-py harness run --format json`)")
            runs.append(run)
    if not runs:
        raise ConfigError("no harness result given")
    return runs


def column(run: dict) -> str:
    configuration = run.get("configuration", "default")
    return f"{run['host']} / {run['runtime']}" + ("" if configuration == "default" else f" [{configuration}]")


def summary_line(run: dict) -> str:
    summary = run["summary"]
    return f"{column(run)}: " + ", ".join(f"{summary.get(result, 0)} {result}" for result in RESULTS) + (
        f" ({run.get('runtime_version', '')}; kernel {run.get('host_kernel', '?')})")


def _probes(runs: list[dict]) -> list[tuple[str, str]]:
    """(name, title) of every probe in any run, in the order first seen."""
    seen: dict[str, str] = {}
    for run in runs:
        for result in run["results"]:
            seen.setdefault(result["name"], result.get("title", ""))
    return list(seen.items())


def anchor(index: int, probe: str) -> str:
    return f"e{index}-{re.sub(r'[^a-z0-9-]', '-', probe.lower())}"


def _cell(run: dict, probe: str) -> dict | None:
    return next((r for r in run["results"] if r["name"] == probe), None)


def as_markdown(runs: list[dict]) -> str:
    lines = ["# kata-py harness report", ""]
    lines += [f"- {summary_line(run)}" for run in runs]
    lines += ["", "| probe | " + " | ".join(_md(column(run)) for run in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for name, _title in _probes(runs):
        cells = []
        for index, run in enumerate(runs):
            result = _cell(run, name)
            cells.append("–" if result is None else f"[{MARK[result['result']]}](#{anchor(index, name)})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "## Evidence"]
    for index, run in enumerate(runs):
        lines += ["", f"### {_md(column(run))}", ""]
        lines += [f"note: {_md(note)}  " for note in run.get("notes", [])]
        for result in run["results"]:
            reason = f" ({result['reason']})" if result.get("reason") else ""
            lines += [f'<a id="{anchor(index, result["name"])}"></a>',
                      f"- **{result['name']}**: {result['result']}{reason}: {_md(result['evidence'])}"]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.held { background: #d9f2d9; } td.broke { background: #f7c6c6; font-weight: bold; }
td.inconclusive { background: #f5e6b3; } td.absent { color: #999; }
td a { color: inherit; } code { font-size: 0.95em; }
dt { margin-top: 0.6em; font-family: monospace; } dd { margin-left: 1.5em; }
pre { background: #f4f4f4; padding: 0.4em; white-space: pre-wrap; max-height: 12em; overflow: auto; }
"""


def as_html(runs: list[dict]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>kata-py harness report</title>", f"<style>{STYLE}</style></head><body>",
           "<h1>kata-py harness report</h1>", '<ul id="summary">']
    out += [f'<li data-column="{index}">{e(summary_line(run))}</li>' for index, run in enumerate(runs)]
    out += ["</ul>", '<table id="matrix">', "<thead><tr><th>probe</th>"]
    out += [f'<th data-host="{e(run["host"])}" data-runtime="{e(run["runtime"])}" '
            f'data-configuration="{e(run.get("configuration", "default"))}">{e(column(run))}</th>' for run in runs]
    out += ["</tr></thead><tbody>"]
    for name, title in _probes(runs):
        out.append(f'<tr data-probe="{e(name)}"><th title="{e(title)}"><code>{e(name)}</code></th>')
        for index, run in enumerate(runs):
            result = _cell(run, name)
            if result is None:
                out.append('<td class="absent">–</td>')
            else:
                out.append(f'<td class="{e(result["result"])}" title="{e(result["evidence"])}">'
                           f'<a href="#{anchor(index, name)}">{e(result["result"])}</a></td>')
        out.append("</tr>")
    out += ["</tbody></table>", '<h2 id="evidence">Evidence</h2>']
    for index, run in enumerate(runs):
        out += [f"<h3>{e(column(run))}</h3>"]
        out += [f"<p>note: {e(note)}</p>" for note in run.get("notes", [])]
        out.append("<dl>")
        for result in run["results"]:
            reason = f" ({e(result['reason'])})" if result.get("reason") else ""
            out += [f'<dt id="{anchor(index, result["name"])}">{e(result["name"])}: {e(result["result"])}{reason}'
                    f"</dt>", f"<dd>{e(result.get('title', ''))}<br>{e(result['evidence'])}"]
            if result.get("output"):
                out.append(f"<pre>{e(result['output'])}</pre>")
            out.append("</dd>")
        out.append("</dl>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render(runs: list[dict], fmt: str) -> str:
    if fmt == "md":
        return as_markdown(runs)
    if fmt == "html":
        return as_html(runs)
    return json.dumps(runs if len(runs) > 1 else runs[0], indent=2) + "\n"
