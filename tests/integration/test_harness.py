"""`kata-py harness run` end to end, as a user runs it: the default battery
in kata-py's own container (every probe holds) and in runc's (the same
probes; runc shares the host kernel), then a privileged bundle, under which
runc gives the host away and the VM still holds.

Each run leaves nothing: no work directory, container, VM, marker process,
or file planted in (or beside) a user's rootfs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kata_py.harness import catalog
from kata_py.oci.busybox import DEFAULT_MOUNTS, make_busybox_rootfs
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import cli

pytestmark = pytest.mark.vm

DEFAULT = [probe.name for probe in catalog.select(None)]
needs_runc = pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)")


def markers() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"kata-py-harness-marker-" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def harness(base: Path, *args: str) -> dict:
    tmp = base / "tmp"
    tmp.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp))
    result = cli(None, "harness", "run", "--json", *args, env=env, timeout=900)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert sorted(p.name for p in tmp.iterdir()) == [], "the harness left its work directory"
    assert markers() == []
    assert qemu_processes_under(RUN_DIR) == []
    return report


def by_name(report: dict) -> dict[str, dict]:
    return {result["name"]: result for result in report["results"]}


@pytest.fixture(scope="module")
def kata_report(image, tmp_path_factory):
    return harness(tmp_path_factory.mktemp("harness-kata"))


@pytest.fixture(scope="module")
def runc_report(tmp_path_factory):
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (Debian package runc)")
    return harness(tmp_path_factory.mktemp("harness-runc"), "--runtime", "runc")


def test_every_probe_holds_under_kata_py(kata_report):
    assert kata_report["runtime"] == "kata-py"
    assert [r["name"] for r in kata_report["results"]] == DEFAULT
    broken = {r["name"]: r["evidence"] for r in kata_report["results"] if r["result"] != "held"}
    assert broken == {}
    assert all(r["evidence"] for r in kata_report["results"])
    assert kata_report["summary"] == {"held": len(DEFAULT), "broke": 0, "skipped": 0}


def test_runc_runs_the_same_battery_and_shares_the_host_kernel(runc_report, kata_report):
    assert runc_report["runtime"] == "runc"
    assert [r["name"] for r in runc_report["results"]] == DEFAULT
    runc, kata = by_name(runc_report), by_name(kata_report)
    assert runc["kernel-identity"]["result"] == "broke" and kata["kernel-identity"]["result"] == "held"
    assert f"uname -r {os.uname().release}," in runc["kernel-identity"]["evidence"]
    assert os.uname().release not in kata["kernel-identity"]["evidence"].split("(host:")[0]
    # The same limits contain the bombs in both.
    assert runc["fork-bomb"]["result"] == runc["memory-bomb"]["result"] == "held"


@pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed (Debian package crun)")
def test_crun_runs_the_same_battery_and_shares_the_host_kernel(tmp_path):
    """crun 1.8 refuses a host with hybrid cgroups; the harness runs it with the
    v2 mount hidden in a mount namespace of its own (hostsys.crun_preexec)."""
    report = harness(tmp_path, "--runtime", "crun")
    assert report["runtime"] == "crun"
    assert [r["name"] for r in report["results"]] == DEFAULT
    crun = by_name(report)
    assert crun["kernel-identity"]["result"] == "broke"
    assert crun["fork-bomb"]["result"] == crun["memory-bomb"]["result"] == "held"


# -- a privileged bundle: all capabilities, no pid, network or UTS namespace

# Probes whose break under runc changes nothing on the host for good (the
# marker is resumed; the listener and canary are the harness's own).
PRIVILEGED_PROBES = ["fs-hardlink-host", "net-host-loopback", "host-pids", "ptrace-host", "kernel-identity"]


def privileged_bundle(directory: Path) -> Path:
    from kata_py.protocol.oci_names import CAPABILITIES

    bounding = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("CapBnd:")).split()[1], 16)
    caps = [name for number, name in enumerate(CAPABILITIES) if bounding >> number & 1]
    make_busybox_rootfs(directory / "rootfs")
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/",
                    "capabilities": {key: caps for key in ("bounding", "effective", "permitted")}},
        "root": {"path": "rootfs"},
        "mounts": DEFAULT_MOUNTS,
        "linux": {"namespaces": [{"type": "mount"}],
                  "resources": {"devices": [{"allow": True, "access": "rwm"}]}},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def privileged(tmp_path_factory):
    bundle = privileged_bundle(tmp_path_factory.mktemp("privileged") / "bundle")
    config = (bundle / "config.json").read_text()
    yield bundle
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "rootfs"]
    assert not [p for p in (bundle / "rootfs").iterdir() if p.name.startswith(".kata-py-harness")]
    assert (bundle / "config.json").read_text() == config


@needs_runc
def test_privileged_runc_gives_the_host_away(privileged, tmp_path):
    report = by_name(harness(tmp_path, "--runtime", "runc", "--bundle", str(privileged),
                             "--probe", *PRIVILEGED_PROBES))
    assert {name: r["result"] for name, r in report.items()} == {name: "broke" for name in PRIVILEGED_PROBES}
    assert "got the container's token" in report["net-host-loopback"]["evidence"]
    assert "SIGSTOP" in report["ptrace-host"]["evidence"] or "environment" in report["ptrace-host"]["evidence"]


def test_privileged_kata_py_still_holds(image, privileged, tmp_path):
    report = by_name(harness(tmp_path, "--bundle", str(privileged), "--probe", *PRIVILEGED_PROBES))
    # A hard link the host made is the file itself: every runtime serves it (see README).
    assert report.pop("fs-hardlink-host")["result"] == "broke"
    assert {name: r["result"] for name, r in report.items()} == {name: "held" for name in PRIVILEGED_PROBES[1:]}
