"""The README's Python API example runs as written (with a busybox rootfs)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bundles import make_rootfs

pytestmark = pytest.mark.vm

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_example_runs(tmp_path):
    section = README.read_text().split("### A Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rootfs = make_rootfs(tmp_path / "rootfs")
    script = tmp_path / "example.py"
    script.write_text(code.replace("/srv/rootfs", str(rootfs)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "3 b'42\\n' b'oops\\n'", lines
    assert lines[1] == "b'hello from the guest\\n'", lines
    assert lines[2].startswith("timed out"), lines
    assert lines[3] == "exit web 137", lines
