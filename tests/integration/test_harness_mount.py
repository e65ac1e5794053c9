"""The mount-target symlink race probe end to end, alone: container 1 swaps
`lnk` between a directory and a symlink to a host path while the harness
starts second containers with the same runtime that mount container 1's
directory and then a token at `/vol/lnk`. runc 1.1.5 (securejoin, and the
mount made through the opened target) and kata-py (destinations resolved
by the guest agent, never on the host) hold; the positive control, runc
handed destinations resolved on the host through the symlink, breaks.

Each run leaves nothing: `harness` checks the work directory, marker
processes and VMs are gone; here also every second container's processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_py.harness.mount_probes import NAME
from tests.integration.test_harness import by_name, harness, needs_runc

pytestmark = pytest.mark.vm


def second_containers_left() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"kata-py-harness-mount-" in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            pass
    return found


def run(tmp_path, *args: str) -> dict:
    report = harness(tmp_path, *args, "--probe", NAME)
    assert second_containers_left() == []
    return report


@needs_runc
def test_runc_holds_the_race(tmp_path):
    result = by_name(run(tmp_path, "--runtime", "runc"))[NAME]
    assert result["result"] == "held", result["evidence"]
    assert "/exposed without the token" in result["evidence"]
    assert "the host saw lnk a symlink" in result["evidence"] and "swapped" in result["evidence"]


@needs_runc
def test_the_positive_control_breaks(tmp_path):
    reports = run(tmp_path, "--control")
    assert [r["configuration"] for r in reports] == ["symlink-followed"]
    result = by_name(reports[0])[NAME]
    assert result["result"] == "broke", result["evidence"]
    assert "handed to the runtime as /exposed" in result["evidence"]
    assert "container 2 found it at /exposed" in result["evidence"] and "/root/exposed holds the token" in \
        result["evidence"]


def test_kata_py_holds_the_race(image, tmp_path):
    report = run(tmp_path)
    assert report["runtime"] == "kata-py"
    result = by_name(report)[NAME]
    assert result["result"] == "held", result["evidence"]
    assert "/exposed without the token" in result["evidence"] and "the host saw lnk a symlink" in result["evidence"]
