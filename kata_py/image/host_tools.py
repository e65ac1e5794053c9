"""Host tools the image build runs (lz4), installed with apt-get when missing."""

from __future__ import annotations

import shutil
import subprocess

from ..errors import ImageError


def require_tool(tool: str, package: str) -> None:
    if shutil.which(tool):
        return
    proc = subprocess.run(["apt-get", "install", "-y", "-q", package],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not shutil.which(tool):
        raise ImageError(f"the {tool} tool is missing and apt-get install {package} failed: "
                         + proc.stderr.strip()[-500:])
