"""`kata-py harness report` on results of real runs: runc's default battery
and two of its positive controls (`--control`), rendered as one page, opened
in headless Chromium as a reader would, and its matrix read back from the
DOM the browser built: every cell is the verdict the JSON holds, and links
to that verdict's evidence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from kata_py.harness.report import SCHEMA_FILE
from tests.oci_helpers import cli

PROBES = ["kernel-identity", "clock", "leaked-fd"]

pytestmark = [pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)"),
              pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (ci/setup.sh)")]


class Matrix(HTMLParser):
    """The report's table (columns, rows of (class, link, text)) and every element id."""

    def __init__(self) -> None:
        super().__init__()
        self.columns: list[dict] = []
        self.rows: dict[str, list[tuple[str, str, str]]] = {}
        self.ids: set[str] = set()
        self._in_table = False
        self._row: str | None = None
        self._cell: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table" and attrs.get("id") == "matrix":
            self._in_table = True
        elif not self._in_table:
            return
        elif tag == "th" and "data-runtime" in attrs:
            self.columns.append(attrs)
        elif tag == "tr" and "data-probe" in attrs:
            self._row = attrs["data-probe"]
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = [attrs.get("class", ""), "", ""]
        elif tag == "a" and self._cell is not None:
            self._cell[1] = attrs.get("href", "")

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data.strip()

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self.rows[self._row].append(tuple(self._cell))
            self._cell = None
        elif tag == "table" and self._in_table:
            self._in_table = False


def run_json(tmp_path: Path, name: str, *args: str) -> Path:
    result = cli(None, "harness", "run", "--format", "json", "--runtime", "runc", "--allow-inconclusive", *args,
                 env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    path = tmp_path / name
    path.write_bytes(result.stdout)
    return path


def test_report_html_opened_in_chromium_shows_the_results(tmp_path):
    default = run_json(tmp_path, "runc.json", "--probe", *PROBES)
    controls = tmp_path / "controls.json"
    result = cli(None, "harness", "run", "--control", "--json", "--probe", "kernel-identity", "leaked-fd",
                 env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=600)
    assert result.returncode == 0, result.stderr.decode()  # both broke in their controls
    controls.write_bytes(result.stdout)
    runs = [json.loads(default.read_text())] + json.loads(controls.read_text())
    schema = json.loads(SCHEMA_FILE.read_text())
    for run in runs:
        jsonschema.validate(run, schema)
    assert [r["configuration"] for r in runs] == ["default", "shared-kernel", "leaked-fd"]

    page = tmp_path / "report.html"
    made = cli(None, "harness", "report", str(default), str(controls), "--format", "html", "-o", str(page))
    assert made.returncode == 0 and made.stdout == b"", made.stderr.decode()
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
                         capture_output=True, timeout=180)
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    matrix = Matrix()
    matrix.feed(dom.stdout.decode())

    assert [(c["data-host"], c["data-runtime"], c["data-configuration"]) for c in matrix.columns] == [
        (run["host"], run["runtime"], run["configuration"]) for run in runs]
    assert list(matrix.rows) == PROBES  # every probe of any run, in battery order
    for probe, cells in matrix.rows.items():
        assert len(cells) == len(runs)
        for index, (run, (css, href, text)) in enumerate(zip(runs, cells)):
            result = next((r for r in run["results"] if r["name"] == probe), None)
            if result is None:
                assert (css, href) == ("absent", "")
                continue
            assert css == text == result["result"], (probe, index)
            assert href.startswith("#") and href[1:] in matrix.ids  # a link to its evidence, which is there
    assert matrix.rows["kernel-identity"][0][2] == "broke" and matrix.rows["leaked-fd"][2][2] == "broke"

    markdown = cli(None, "harness", "report", str(default), str(controls))
    assert markdown.returncode == 0
    text = markdown.stdout.decode()
    for run in runs:
        summary = run["summary"]
        assert f"{summary['held']} held, {summary['broke']} broke, {summary['inconclusive']} inconclusive" in text


def test_report_refuses_what_is_not_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    result = cli(None, "harness", "report", str(bad), "-o", str(tmp_path / "out.html"))
    assert result.returncode != 0 and b"not a harness result" in result.stderr
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert not (tmp_path / "out.html").exists()
