"""The escape-probe harness's own logic, without a container: the batch
output parser, canaries, the verdicts of the checks given what a container
could print (a break must read as broke), probe selection, the bundle it
derives from a user's."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from kata_py.errors import ConfigError
from kata_py.harness import bundle, catalog
from kata_py.harness.host import HostSide
from kata_py.harness.probe import BROKE, HELD, SKIPPED, Output, one_line
from kata_py.harness.runner import decide, parse_batch


@pytest.fixture
def host(tmp_path):
    rootfs = tmp_path / "bundle" / "rootfs"
    rootfs.mkdir(parents=True)
    side = HostSide(rootfs)
    yield side
    side.close()
    assert sorted(p.name for p in rootfs.iterdir()) == [], "the harness left files in the rootfs"
    assert sorted(p.name for p in rootfs.parent.iterdir()) == ["rootfs"], "the harness left canaries beside it"


def out(text: str, status: int | None = 0) -> Output:
    return Output(text=text, status=status, ran=True)


def test_parse_batch_splits_sections_and_statuses():
    outputs = parse_batch("noise\n@@probe a\nx=1\nx=2\n@@status 0\n@@probe b\ny=3\n@@status 137\n@@probe c\nz=4\n")
    assert outputs["a"].values("x") == ["1", "2"] and outputs["a"].status == 0
    assert outputs["b"].value("y") == "3" and outputs["b"].status == 137
    assert outputs["c"].status is None and outputs["c"].ran  # cut short: no status line
    assert "noise" not in "".join(o.text for o in outputs.values())


def test_canary_sees_a_read_a_write_and_a_link_and_puts_the_content_back(host):
    canary = host.canary("c")
    assert canary.breaches("denied=/x: No such file or directory\n") == []
    assert canary.breaches(f"read=/../c: {canary.secret}\n") == ["read its secret through /../c"]
    canary.path.write_text("changed\n")
    os.link(canary.path, host.plant_dir / "extra")
    assert canary.breaches("") == ["changed its content", "gave it 1 more hard link(s)"]
    assert canary.path.read_bytes() == canary.content


def test_default_battery_and_selection():
    default = catalog.select(None)
    assert "fs-hardlink-host" not in [p.name for p in default]
    assert {"kernel-identity", "fork-bomb", "memory-bomb", "clock"} <= {p.name for p in default}
    assert [p.name for p in catalog.select(["clock", "fs-dotdot"])] == ["fs-dotdot", "clock"]  # battery order
    with pytest.raises(ConfigError, match="unknown probe"):
        catalog.select(["no-such-probe"])
    assert [p.name for p in default if p.during] == ["fork-bomb", "memory-bomb"]  # last, on their own


def test_fs_probe_verdict_comes_from_the_host_file(host):
    probe = catalog.BY_NAME["fs-dotdot"]
    variables = probe.setup(host)
    paths = variables["H_PATHS"].splitlines()
    assert all(".kata-py-harness-canaries-" in p for p in paths)
    canary = host.fixtures["fs-dotdot"]
    assert probe.check(out(f"denied={paths[0]}: cat: can't open: No such file or directory\n"), host).result == HELD
    # Claiming to have read it proves nothing; printing its secret does.
    assert probe.check(out(f"read={paths[0]}: something\n"), host).result == HELD
    verdict = probe.check(out(f"read={paths[0]}: {canary.secret}\n"), host)
    assert verdict.result == BROKE and paths[0] in verdict.evidence
    canary.path.write_text("written through ..\n")
    assert "changed its content" in probe.check(out(""), host).evidence


def test_kernel_identity_is_decided_by_boot_id(host):
    probe = catalog.BY_NAME["kernel-identity"]
    facts = host.facts
    same = f"release={facts.kernel_release}\nversion={facts.kernel_version}\nboot_id={facts.boot_id}\n"
    assert probe.check(out(same), host).result == BROKE
    other = f"release={facts.kernel_release}\nboot_id=00000000-0000-4000-8000-000000000000\n"
    assert probe.check(out(other), host).result == HELD
    unreadable = f"release={facts.kernel_release}\nversion={facts.kernel_version}\nboot_id=\n"
    assert probe.check(out(unreadable), host).result == BROKE  # same build, nothing shows otherwise


def test_an_opened_device_counts_only_on_the_host_kernel(host):
    probe = catalog.BY_NAME["dev-kvm"]
    opened = "present=/dev/kvm\nopened=/dev/kvm\n"
    assert probe.check(out(opened + f"boot_id={host.facts.boot_id}\n"), host).result == BROKE
    assert probe.check(out(opened + "boot_id=00000000-0000-4000-8000-000000000000\n"), host).result == HELD
    denied = "absent=/dev/kvm\nmknod-denied=mknod: /dev/x/dev: Operation not permitted\n"
    verdict = probe.check(out(denied), host)
    assert verdict.result == HELD and "Operation not permitted" in verdict.evidence


def test_network_verdict_is_what_the_listener_received(host):
    probe = catalog.BY_NAME["net-host-loopback"]
    variables = probe.setup(host)
    failed = out("connect=failed: nc: can't connect to remote host (127.0.0.1): Connection refused\n")
    assert probe.check(failed, host).result == HELD
    with socket.create_connection(("127.0.0.1", int(variables["H_PORT"]))) as conn:
        conn.sendall(b"no token\n")
        conn.recv(1)  # the listener closes once it has read
    assert probe.check(failed, host).result == HELD
    with socket.create_connection(("127.0.0.1", int(variables["H_PORT"]))) as conn:
        conn.sendall(variables["H_TOKEN"].encode() + b"\n")
        conn.recv(1)
    assert probe.check(failed, host).result == BROKE  # whatever the container says


def test_marker_is_found_only_by_its_whole_word(host):
    probe = catalog.BY_NAME["host-pids"]
    variables = probe.setup(host)
    marker = host.marker()
    assert variables["H_MA"] + variables["H_MB"] == marker.word
    assert marker.word.encode() in Path(f"/proc/{marker.pid}/cmdline").read_bytes()
    assert probe.check(out("processes=3\n"), host).result == HELD
    assert probe.check(out(f"processes=300\nfound={marker.pid}\n"), host).result == BROKE


def test_ptrace_probe_sees_a_stopped_marker_and_resumes_it(host):
    probe = catalog.BY_NAME["ptrace-host"]
    probe.setup(host)
    marker = host.marker()
    os.kill(marker.pid, 19)  # SIGSTOP, as a container that reached it would
    while marker.state() != "T":  # signals are asynchronous
        time.sleep(0.01)
    verdict = probe.check(out(f"found={marker.pid}\nsignalled={marker.pid}\n"), host)
    assert verdict.result == BROKE and "SIGSTOP" in verdict.evidence
    assert marker.state() != "T"
    assert probe.check(out(f"environ=1: KATA_PY_HARNESS_SECRET={marker.secret}\n"), host).result == BROKE


def test_disks_visible_compares_names_and_sizes(host):
    probe = catalog.BY_NAME["host-disks-visible"]
    if not host.disks():
        pytest.skip("this host has no block device with a size")
    disk = host.disks()[0]
    assert probe.check(out(f"disk={disk.name}:{disk.sectors}\n"), host).result == BROKE
    assert probe.check(out(f"disk={disk.name}:{disk.sectors + 8}\n"), host).result == HELD


def test_a_probe_that_did_not_finish_has_not_held(host):
    probe = catalog.BY_NAME["proc-leaks"]
    assert decide(probe, out("hostname=x\n", status=None), host, "").result == SKIPPED
    assert decide(probe, Output(), host, "the exec failed").result == SKIPPED
    assert decide(probe, out("hostname=x\n"), host, "").result == HELD
    broke_anyway = out(f"hostname={host.facts.hostname}\n", status=None)
    assert decide(probe, broke_anyway, host, "").result == BROKE  # host evidence of a break stands


def test_user_bundle_is_copied_with_limits_where_it_has_none(tmp_path):
    user = tmp_path / "user"
    (user / "rootfs").mkdir(parents=True)
    (user / "data").mkdir()
    config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["x"], "cwd": "/"},
              "mounts": [{"destination": "/d", "type": "bind", "source": "data", "options": ["rbind"]}],
              "linux": {"resources": {"pids": {"limit": 10}}}}
    (user / "config.json").write_text(json.dumps(config))
    work = tmp_path / "work"
    work.mkdir()
    setup = bundle.prepare(work, bundle=str(user))
    setup.write("/h/bin")
    written = json.loads((setup.bundle / "config.json").read_text())
    assert setup.bundle != user and json.loads((user / "config.json").read_text()) == config
    assert written["root"]["path"] == str((user / "rootfs").resolve())
    assert written["mounts"][0]["source"] == str((user / "data").resolve())
    assert written["linux"]["resources"]["pids"] == {"limit": 10}
    assert written["linux"]["resources"]["memory"] == {"limit": bundle.MEMORY_LIMIT}
    assert setup.notes == [f"memory limit {bundle.MEMORY_LIMIT >> 20} MiB set by the harness (the spec has none)"]
    assert written["process"]["args"][:2] == ["/h/bin/sh", "-c"] and written["process"]["terminal"] is False


def test_harness_spec_is_unprivileged_with_limits(tmp_path):
    spec = bundle.harness_spec(tmp_path)
    assert spec["process"]["capabilities"]["bounding"] == ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    assert {ns["type"] for ns in spec["linux"]["namespaces"]} >= {"pid", "network", "uts", "mount"}
    assert all("path" not in ns for ns in spec["linux"]["namespaces"])
    assert spec["linux"]["resources"]["pids"]["limit"] == bundle.PIDS_LIMIT
    assert spec["root"]["readonly"] is False  # writes are stopped by the boundary, not a read-only mount


def test_container_text_is_made_one_line_of_evidence():
    assert one_line("a\n b   c") == "a b c" and len(one_line("x" * 500)) == 160


def test_a_changed_sysctl_or_clock_reads_as_broke_and_is_put_back(tmp_path, monkeypatch):
    """With the host's sysctls and clock faked: what a broken runtime would do to them.
    The host side is this test's own and is closed while the fakes are in place: its
    put-back steps must never run against the real clock with fake snapshots."""
    from kata_py.harness import host_state

    sysctls = {"kernel.hostname": "vm", "kernel.domainname": "(none)", "kernel.printk_ratelimit_burst": "10"}
    monkeypatch.setattr(host_state, "read_sysctl", sysctls.get)
    monkeypatch.setattr(host_state, "write_sysctl", sysctls.__setitem__)
    clock = {"offset": 1000.0, "tuning": (10000, 0)}
    monkeypatch.setattr(host_state, "clock_offset", lambda: clock["offset"])
    monkeypatch.setattr(host_state, "restore_clock_offset", lambda offset: clock.update(offset=offset))
    monkeypatch.setattr(host_state, "clock_tuning", lambda: clock["tuning"])
    monkeypatch.setattr(host_state, "set_clock_tuning", lambda tick, freq: clock.update(tuning=(tick, freq)))
    (tmp_path / "rootfs").mkdir()
    host = HostSide(tmp_path / "rootfs")
    try:
        sysctl, clock_probe = catalog.BY_NAME["sysctl-write"], catalog.BY_NAME["clock"]
        word = sysctl.setup(host)["H_WORD"]
        clock_probe.setup(host)
        assert sysctl.check(out("denied=kernel/hostname: Read-only file system\n"), host).result == HELD
        assert clock_probe.check(out("date=denied: Operation not permitted\n"), host).result == HELD
        sysctls["kernel.hostname"] = word
        clock.update(offset=1030.0, tuning=(10001, 0))
        verdict = sysctl.check(out("wrote=kernel/hostname\n"), host)
        assert verdict.result == BROKE and word in verdict.evidence and sysctls["kernel.hostname"] == "vm"
        verdict = clock_probe.check(out("date=set\nadjtimex=set\n"), host)
        assert verdict.result == BROKE and "+30.0 s" in verdict.evidence
        assert clock == {"offset": 1000.0, "tuning": (10000, 0)}
        # A run cut short puts them back when the host side closes.
        sysctls["kernel.domainname"] = word
        clock["offset"] = 990.0
    finally:
        host.close()
    assert sysctls["kernel.domainname"] == "(none)" and clock["offset"] == 1000.0


def test_only_crun_on_a_hybrid_host_runs_with_the_v2_mount_hidden(monkeypatch, tmp_path):
    from kata_py import hostsys
    from kata_py.harness.runtime import Runtime

    monkeypatch.setattr(hostsys.os.path, "ismount", lambda path: path == hostsys.HYBRID_CGROUP2)
    assert hostsys.crun_preexec("crun") is hostsys.hide_hybrid_cgroup2
    assert hostsys.crun_preexec("runc") is None and hostsys.crun_preexec("kata-py") is None
    monkeypatch.setattr(hostsys.os.path, "ismount", lambda path: False)
    assert hostsys.crun_preexec("crun") is None  # a pure v2 (or v1) host: crun runs as it is
    assert Runtime("runc", ["runc"], tmp_path / "root").preexec is None
