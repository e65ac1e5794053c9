"""`kata-py harness run` end to end, as a user runs it: the default battery
in kata-py's own container (every probe holds, but those this host gives
nothing to reach, which are inconclusive) and in runc's (the same probes;
exactly the README's three break: runc shares the host kernel), every
probe's positive control (each breaks), then a privileged bundle, under
which the VM still holds.

Each run leaves nothing: no work directory, container, VM, marker process,
or file planted in (or beside) a user's rootfs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from kata_py.harness import catalog
from kata_py.oci.busybox import DEFAULT_MOUNTS, make_busybox_rootfs
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import cli

pytestmark = pytest.mark.vm

DEFAULT = [probe.name for probe in catalog.select(None)]
README_RUNC_BREAKS = (Path(__file__).parents[2] / "README.md").read_text().split("<!-- runc-breaks -->")[1]
needs_runc = pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)")


def markers() -> list[int]:
    """Marker processes whose harness has gone (argv[-1] is its pid): a
    harness that another test runs at the same time keeps its own."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
            if any(b"kata-py-harness-marker-" in arg for arg in argv):
                parent = [arg for arg in argv if arg.isdigit()]
                if not parent or not Path(f"/proc/{int(parent[-1])}").exists():
                    found.append(int(proc.name))
        except OSError:
            pass
    return found


def _readable(node: str) -> bool:
    try:
        with open(node, "rb") as f:
            return len(f.read(512)) > 0
    except OSError:
        return False


def unavailable_here() -> set[str]:
    from kata_py.harness.host_state import block_location, host_disks

    missing = set()
    if not Path("/sys/dev/char/1:1").exists():
        missing.add("dev-mem")
    if not Path("/sys/dev/char/10:232").exists():
        missing.add("dev-kvm")
    if not Path("/proc/modules").exists():
        missing.add("kernel-module")
    if not Path("/proc/sysrq-trigger").exists():
        missing.add("sysrq-trigger")
    if not any(d.head_sha256 for d in host_disks()):
        missing.add("host-disk-read")
    location = block_location(Path(tempfile.gettempdir()))
    if location is None or not _readable(f"/dev/{Path(f'/sys/dev/block/{location[0]}').resolve().name}"):
        missing.add("host-disk-mount")
    return missing


# On this host (see README): the probes runc breaks with the harness's spec.
RUNC_BREAKS = {"host-disks-visible", "kernel-identity", "proc-leaks", "vmm-uid", "vmm-capabilities", "vmm-seccomp"}


def harness(base: Path, *args: str, expect: int | None = None) -> dict:
    tmp = base / "tmp"
    tmp.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp))
    result = cli(None, "harness", "run", "--format", "json", *args, env=env, timeout=900)
    report = json.loads(result.stdout)
    inconclusive = [r for r in (report if isinstance(report, list) else [report])
                    for r in r["results"] if r["result"] == "inconclusive"]
    if expect is None:
        expect = 3 if inconclusive and "--allow-inconclusive" not in args else 0
    assert result.returncode == expect, result.stderr.decode()
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
    """Every probe holds, but those this host gives nothing to reach (no
    /dev/mem, no loadable modules, ...): no control could break them here,
    so they are inconclusive, each with the reason."""
    assert kata_report["runtime"] == "kata-py" and kata_report["host"]
    assert [r["name"] for r in kata_report["results"]] == DEFAULT
    results = by_name(kata_report)
    unavailable = unavailable_here()
    not_held = {name: r["evidence"] for name, r in results.items() if r["result"] != "held" and name not in unavailable}
    assert not_held == {}
    for name in unavailable & set(DEFAULT):
        assert (results[name]["result"], results[name]["reason"]) == ("inconclusive", "unavailable here"), name
    assert all(r["evidence"] for r in kata_report["results"])
    assert kata_report["summary"] == {"held": len(DEFAULT) - len(unavailable & set(DEFAULT)), "broke": 0,
                                      "inconclusive": len(unavailable & set(DEFAULT))}


def test_runc_breaks_exactly_the_probes_the_readme_lists(runc_report, kata_report):
    assert runc_report["runtime"] == "runc"
    assert [r["name"] for r in runc_report["results"]] == DEFAULT
    runc, kata = by_name(runc_report), by_name(kata_report)
    assert {name for name, r in runc.items() if r["result"] == "broke"} == RUNC_BREAKS
    listed = {line.split()[0] for line in README_RUNC_BREAKS.splitlines() if line.split()[1:2] == ["broke"]}
    assert listed == RUNC_BREAKS  # the README's list of what runc breaks on this host
    assert {name for name, r in runc.items() if r["result"] == "inconclusive"} == unavailable_here() & set(DEFAULT)
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


POSTURE = ["vmm-uid", "vmm-capabilities", "vmm-no-new-privs", "vmm-seccomp", "vmm-namespaces", "vmm-root"]


def test_the_posture_probes_say_what_crun_holds(tmp_path):
    """For crun (as for runc) the process that holds the boundary is the
    container's init: root, with capabilities and no seccomp filter under the
    harness's spec, in namespaces and a root of its own. Each probe reaches a
    verdict with its evidence."""
    found = by_name(harness(tmp_path, "--runtime", "crun", "--probe", *POSTURE))
    assert list(found) == POSTURE
    assert {name: r["result"] for name, r in found.items()} == {
        "vmm-uid": "broke", "vmm-capabilities": "broke", "vmm-no-new-privs": "held", "vmm-seccomp": "broke",
        "vmm-namespaces": "held", "vmm-root": "held"}
    assert all("container init" in r["evidence"] for r in found.values())


@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed (Debian package runsc)")
def test_the_posture_probes_say_what_runsc_holds(tmp_path):
    """For runsc the process that holds the boundary is its sandbox: nobody,
    with no_new_privs and a seccomp filter in a root of its own, but with
    CAP_SYS_ADMIN and CAP_SYS_CHROOT and the host's pid namespace (the ptrace
    platform traces from there). The TMPDIR that harness() gives it lies under
    pytest's 0700 /tmp/pytest-of-root, which the sandbox process cannot pass."""
    found = by_name(harness(tmp_path, "--runtime", "runsc", "--probe", *POSTURE))
    assert list(found) == POSTURE
    assert {name: r["result"] for name, r in found.items()} == {
        "vmm-uid": "held", "vmm-capabilities": "broke", "vmm-no-new-privs": "held", "vmm-seccomp": "held",
        "vmm-namespaces": "broke", "vmm-root": "held"}
    assert all("runsc sandbox (pid " in r["evidence"] for r in found.values())
    assert "uid 65534/65534/65534/65534" in found["vmm-uid"]["evidence"]
    effective = int(found["vmm-capabilities"]["evidence"].split("CapEff ")[1].split(",")[0], 16)
    cap_sys_chroot, cap_sys_admin = 1 << 18, 1 << 21
    assert effective & cap_sys_admin and effective & cap_sys_chroot
    assert "NoNewPrivs 1" in found["vmm-no-new-privs"]["evidence"]
    assert "Seccomp 2 " in found["vmm-seccomp"]["evidence"]
    assert "shares the pid namespace" in found["vmm-namespaces"]["evidence"]


# -- positive controls: every probe must break in its own


@needs_runc
def test_every_probe_breaks_in_its_positive_control(tmp_path):
    reports = harness(tmp_path, "--control", "--allow-inconclusive")
    assert {r["configuration"] for r in reports} == {"shared-kernel", "privileged", "leaked-fd", "unlimited",
                                                      "symlink-followed"}
    results = {r["name"]: r for report in reports for r in report["results"]}
    assert sorted(results) == sorted(p.name for p in catalog.PROBES)  # the opt-in ones too
    unavailable = unavailable_here()
    for name, result in results.items():
        expected = "inconclusive" if name in unavailable else "broke"
        assert result["result"] == expected, (name, result["evidence"])
    assert "got the container's token" in results["net-host-loopback"]["evidence"]
    assert "put back" in results["kernel-helper-paths"]["evidence"]
    assert "/fd/3" in results["leaked-fd"]["evidence"]
    assert "canary copy of the runtime binary" in results["runtime-exe"]["evidence"]
    assert "reached container 2's /exposed" in results["mount-symlink"]["evidence"]


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


def test_privileged_kata_py_still_holds(image, privileged, tmp_path):
    report = by_name(harness(tmp_path, "--bundle", str(privileged), "--probe", *PRIVILEGED_PROBES))
    # A hard link the host made is the file itself: every runtime serves it (see README).
    assert report.pop("fs-hardlink-host")["result"] == "broke"
    assert {name: r["result"] for name, r in report.items()} == {name: "held" for name in PRIVILEGED_PROBES[1:]}
