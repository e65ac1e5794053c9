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
from kata_py.harness.probe import BROKE, END, HELD, INCONCLUSIVE, Output, one_line
from kata_py.harness.runner import decide, parse_batch


def out(text: str, status: int | None = 0, ended: bool = True) -> Output:
    """What a probe printed; `ended`: it reached its end marker."""
    return Output(text=text + (f"{END}\n" if ended else ""), status=status, ran=True)


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
    assert [p.name for p in default if p.during] == ["runtime-exe", "mount-symlink", "fork-bomb",
                                                      "memory-bomb"]  # on their own


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
    assert probe.check(out("release=\nversion=\nboot_id=\n"), host).result == INCONCLUSIVE  # an empty reply


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


PROC_LEAKS_HELD = f"cmdline_sha256={'0' * 64}\nhostname=x\n"


def test_a_probe_that_did_not_finish_has_not_held(host):
    probe = catalog.BY_NAME["proc-leaks"]
    assert decide(probe, out(PROC_LEAKS_HELD), host, "").result == HELD
    cut = decide(probe, out(PROC_LEAKS_HELD, status=None, ended=False), host, "")
    assert (cut.result, cut.reason) == (INCONCLUSIVE, "no end marker")
    never = decide(probe, Output(), host, "the exec failed")
    assert (never.result, never.reason) == (INCONCLUSIVE, "did not run") and "the exec failed" in never.evidence
    broke_anyway = out(f"hostname={host.facts.hostname}\n", status=None, ended=False)
    assert decide(probe, broke_anyway, host, "").result == BROKE  # host evidence of a break stands


def test_a_probe_killed_by_its_timeout_is_inconclusive(host):
    probe = catalog.BY_NAME["proc-leaks"]
    verdict = decide(probe, out(PROC_LEAKS_HELD, status=137, ended=False), host, "")
    assert (verdict.result, verdict.reason) == (INCONCLUSIVE, "timeout")
    assert f"{probe.timeout} s timeout" in verdict.evidence


def test_a_probe_that_exits_non_zero_is_inconclusive(host):
    probe = catalog.BY_NAME["proc-leaks"]
    syntax_error = decide(probe, out(PROC_LEAKS_HELD + "sh: syntax error\n", status=2, ended=False), host, "")
    assert (syntax_error.result, syntax_error.reason) == (INCONCLUSIVE, "no end marker")
    # Reached its end but with a status it does not accept (a wrapper that ended badly).
    verdict = decide(probe, out(PROC_LEAKS_HELD, status=1), host, "")
    assert (verdict.result, verdict.reason) == (INCONCLUSIVE, "error status")


def test_a_probe_that_prints_nothing_is_inconclusive(host):
    for probe in catalog.select(None):
        if probe.during is not None or probe.setup is not None:
            continue  # the probes that need no host fixture: their checks run on nothing at all
        verdict = decide(probe, Output(text="", status=0, ran=True), host, "")
        assert verdict.result == INCONCLUSIVE, probe.name
        assert verdict.reason in ("nothing printed", "missing evidence"), (probe.name, verdict)


def test_held_needs_every_declared_piece_of_evidence(host):
    probe = catalog.BY_NAME["dev-kvm"]
    assert probe.evidence == ("present|absent", "boot_id", "opened|open-denied|mknod-denied")
    full = "absent=/dev/kvm\nboot_id=\nmknod-denied=mknod: Operation not permitted\n"
    assert decide(probe, out(full), host, "").result == HELD
    verdict = decide(probe, out("boot_id=\nmknod-denied=mknod: Operation not permitted\n"), host, "")
    assert (verdict.result, verdict.reason) == (INCONCLUSIVE, "missing evidence")
    assert "present|absent" in verdict.evidence
    net = catalog.BY_NAME["net-host-loopback"]
    net.setup(host)
    tool = decide(net, out("sh: nc: not found\n"), host, "")
    assert (tool.result, tool.reason) == (INCONCLUSIVE, "missing tool") and "nc" in tool.evidence


def test_every_probe_script_prints_the_evidence_it_declares():
    for probe in catalog.PROBES:
        assert probe.evidence, f"{probe.name} declares no evidence"
        for keys in probe.evidence:
            assert any(f"{key}=" in probe.script for key in keys.split("|")), (probe.name, keys)


def test_the_bombs_need_a_measured_peak_and_a_limit_at_work(host):
    fork, memory = catalog.BY_NAME["fork-bomb"], catalog.BY_NAME["memory-bomb"]
    host.during["fork-bomb"] = host.during["memory-bomb"] = {"ok": True, "fork_ms": 1, "alloc_ms": 1}
    fork_out = "pids_max=128\nbomb_peak={}\nbomb_left=0\nforks_refused={}\n"
    assert decide(fork, out(fork_out.format(0, 0)), host, "").result == INCONCLUSIVE  # peak 0: nothing ran
    assert decide(fork, out(fork_out.format(60, 0)), host, "").result == INCONCLUSIVE  # nothing refused
    assert decide(fork, out(fork_out.format(60, 40)), host, "").result == HELD
    assert decide(fork, out(fork_out.format(2047, 0)), host, "").result == BROKE
    memory_out = "memory_max=67108864\nbomb_status={}\n"
    awk_failed = decide(memory, out(memory_out.format(2)), host, "")
    assert awk_failed.result == INCONCLUSIVE  # awk failing on its own proves no limit
    assert decide(memory, out(memory_out.format(137)), host, "").result == HELD
    assert decide(memory, out(memory_out.format(1) + "oom_kill=1\n"), host, "").result == HELD
    assert decide(memory, out(memory_out.format(0) + "bomb_completed=536870912\n"), host, "").result == BROKE
    host.during["fork-bomb"] = {"ok": False, "fork_error": "EAGAIN"}
    assert decide(fork, out(fork_out.format(60, 40)), host, "").result == BROKE


def test_a_host_without_what_a_probe_reaches_makes_it_inconclusive(host, monkeypatch):
    from kata_py.harness import host_state
    from kata_py.harness.probe import SkipProbe

    monkeypatch.setattr(host_state, "loaded_modules", lambda: None)
    with pytest.raises(SkipProbe, match="no loadable modules"):
        catalog.BY_NAME["kernel-module"].setup(host)
    from kata_py.harness.device_probes import _setup_char_device
    with pytest.raises(SkipProbe, match="nothing to reach"):
        _setup_char_device("/dev/none", 4095, 4095)


def test_kernel_helper_paths_are_rewritten_to_equivalent_spellings():
    from kata_py.harness.escape_probes import equivalent

    assert equivalent("core", "t") == "./core"
    assert equivalent("/var/crash/core.%p", "t") == "/./var/crash/core.%p"
    assert equivalent("|/usr/lib/systemd/systemd-coredump %P %u", "t") == "|/./usr/lib/systemd/systemd-coredump %P %u"
    assert equivalent("/sbin/modprobe", "t") == "/./sbin/modprobe"
    assert equivalent("", "t") == "/nonexistent/kata-py-harness-t"


def test_exit_status_rules():
    from kata_py.harness.runner import HarnessReport, ProbeResult, exit_status

    def report(*results):
        return HarnessReport("runc", "1", "6", "h", [ProbeResult(f"p{i}", "", r, "e") for i, r in enumerate(results)])

    assert exit_status([report("held", "broke")]) == 0  # a break is a finding
    assert exit_status([report("held", "inconclusive")]) == 3
    assert exit_status([report("held", "inconclusive")], allow_inconclusive=True) == 0
    assert exit_status([report("broke", "broke")], control=True) == 0
    assert exit_status([report("broke", "held")], control=True) == 4


def test_every_probe_has_a_positive_control():
    from kata_py.harness import controls

    planned = [p.name for _control, probes in controls.plan() for p in probes]
    assert sorted(planned) == sorted(p.name for p in catalog.PROBES)
    assert {p.control for p in catalog.PROBES} == set(controls.CONTROLS)


def test_the_privileged_control_weakens_the_harness_spec(tmp_path):
    from kata_py.harness import controls

    (tmp_path / "rootfs").mkdir()
    host = HostSide(tmp_path / "rootfs")
    try:
        spec = bundle.harness_spec(host.rootfs)
        controls.CONTROLS["privileged"].weaken(spec, host)
        assert spec["linux"]["namespaces"] == [{"type": "mount"}]
        assert "CAP_SYS_ADMIN" in spec["process"]["capabilities"]["effective"]
        assert "readonlyPaths" not in spec["linux"] and "maskedPaths" not in spec["linux"]
        assert {"destination": str(tmp_path), "type": "bind", "source": str(tmp_path),
                "options": ["rbind", "rw"]} in spec["mounts"]
        unlimited = bundle.harness_spec(host.rootfs)
        controls.CONTROLS["unlimited"].weaken(unlimited, host)
        assert "pids" not in unlimited["linux"]["resources"] and "memory" not in unlimited["linux"]["resources"]
    finally:
        host.close()


def _result(name: str, result: str, reason: str = "") -> dict:
    return {"name": name, "title": f"t {name}", "result": result, "evidence": f"ev <{name}>", "output": "",
            "reason": reason, "control": "privileged"}


def _run(host: str, runtime: str, results: list[dict]) -> dict:
    summary = {r: sum(1 for x in results if x["result"] == r) for r in ("held", "broke", "inconclusive")}
    return {"schema": "kata-py-harness-result/1", "runtime": runtime, "runtime_version": "v", "host": host,
            "host_name": host, "host_kernel": "6", "configuration": "default", "results": results,
            "summary": summary, "notes": [], "seconds": 1.0}


def test_report_renders_a_matrix_with_links_to_evidence(tmp_path):
    from kata_py.harness import report

    runs = [_run("a", "kata-py", [_result("p1", "held"), _result("p2", "inconclusive", "timeout")]),
            _run("b", "runc", [_result("p1", "broke")])]
    markdown = report.as_markdown(runs)
    assert "| `p1` | [held](#e0-p1) | [BROKE](#e1-p1) |" in markdown
    assert "| `p2` | [inconclusive](#e0-p2) | – |" in markdown
    assert '<a id="e1-p1"></a>' in markdown and "b / runc: 0 held, 1 broke, 0 inconclusive" in markdown
    page = report.as_html(runs)
    assert '<td class="broke" title="ev &lt;p1&gt;"><a href="#e1-p1">broke</a></td>' in page
    assert '<dt id="e0-p2">p2: inconclusive (timeout)</dt>' in page
    assert "<script" not in page and "http" not in page.replace("https://", "")  # self-contained
    (tmp_path / "r.json").write_text(json.dumps(runs))
    assert report.load([str(tmp_path / "r.json")]) == runs
    (tmp_path / "bad.json").write_text('{"runtime": "x"}')
    with pytest.raises(ConfigError, match="not a harness result"):
        report.load([str(tmp_path / "bad.json")])


def test_the_json_report_follows_its_schema():
    import jsonschema

    from kata_py.harness import report
    from kata_py.harness.runner import HarnessReport, ProbeResult

    schema = json.loads(report.SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    made = HarnessReport("runc", "runc 1", "6.1", "node", [
        ProbeResult("fs-dotdot", "t", "held", "e", "out", "", "privileged"),
        ProbeResult("dev-mem", "t", "inconclusive", "e", "", "unavailable here", "privileged")])
    jsonschema.validate(json.loads(report.as_json(made)), schema)
    assert made.as_dict()["host"] == "node" and made.as_dict()["summary"]["inconclusive"] == 1
    wrong = json.loads(report.as_json(made))
    wrong["results"][1]["reason"] = ""  # an inconclusive without its reason
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)


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


def test_runsc_gets_a_pids_limit_its_own_sandbox_does_not_exhaust(tmp_path):
    """At the harness's 128 runsc's sentry (its threads and ptrace stubs count
    on the host) panics mid-battery; the limit is raised for it alone, and said."""
    from kata_py.harness.bundle import PIDS_LIMIT
    from kata_py.harness.runtime import PIDS_FLOOR, Runtime

    def spec(limit):
        return {"linux": {"resources": {"pids": {"limit": limit}} if limit else {}}}

    runsc, runc = Runtime("runsc", ["runsc"], tmp_path / "a"), Runtime("runc", ["runc"], tmp_path / "b")
    config = spec(PIDS_LIMIT)
    assert "raised to" in runsc.fit_limits(config)
    assert config["linux"]["resources"]["pids"]["limit"] == PIDS_FLOOR["runsc"] > PIDS_LIMIT
    config = spec(PIDS_LIMIT)
    assert runc.fit_limits(config) is None and config["linux"]["resources"]["pids"]["limit"] == PIDS_LIMIT
    config = spec(4096)
    assert runsc.fit_limits(config) is None and config["linux"]["resources"]["pids"]["limit"] == 4096
    assert runsc.fit_limits(spec(None)) is None
