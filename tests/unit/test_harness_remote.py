"""The logic of remote harness runs: node URLs and hosts files, the
known_hosts policy (with paramiko's own key objects), how the results that
came back are merged into one report, the records of unfinished cleanup,
and what the node-side cleanup refuses to touch."""

from __future__ import annotations

import json
import subprocess
import sys

import paramiko
import pytest

from kata_py.errors import ConfigError
from kata_py.harness import catalog, remote_cleanup, remote_record
from kata_py.harness.remote import CONNECTION_LOST, merge
from kata_py.harness.remote_node import chunks, node_runtime
from kata_py.harness.ssh_bundle import cleanup_source, zipapp
from kata_py.harness.ssh_target import SshTarget, parse_hosts_file, parse_url, targets_from
from kata_py.harness.ssh_trust import HostKeyChanged, HostKeyUnknown, KnownHosts, fingerprint, preferred_key_types

# -- URLs and hosts files


@pytest.mark.parametrize("url, user, host, port", [
    ("ssh://root@node", "root", "node", 22),
    ("ssh://ops@node.example:2222", "ops", "node.example", 2222),
    ("ssh://root@10.0.0.5:22", "root", "10.0.0.5", 22),
    ("ssh://root@[fd00::5]:2200", "root", "fd00::5", 2200),
])
def test_a_node_url_names_user_host_and_port(url, user, host, port):
    target = parse_url(url)
    assert (target.user, target.host, target.port) == (user, host, port)
    assert parse_url(target.url) == target


@pytest.mark.parametrize("url, says", [
    ("node", "expected ssh://"),
    ("http://root@node", "expected ssh://"),
    ("ssh://node", "names no user"),
    ("ssh://root:hunter2@node", "a password in the URL is refused"),
    ("ssh://root@node/path", "nothing after the port"),
    ("ssh://root@node:99999", "out of range"),
    ("ssh://root@node:0", "port 0"),
    ("ssh://-oProxyCommand=x@node", "is not a user name"),
    ("ssh://root@-oProxyCommand", "no usable node"),
    ("ssh://root@", "no usable node"),
])
def test_a_bad_node_url_is_one_clear_error(url, says):
    with pytest.raises(ConfigError, match=says):
        parse_url(url)


def test_known_hosts_names_a_node_off_port_22_with_its_port():
    assert parse_url("ssh://root@node").known_hosts_name == "node"
    assert parse_url("ssh://root@node:2222").known_hosts_name == "[node]:2222"


def test_a_hosts_file_has_one_node_a_line_with_an_optional_runtime(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the fleet\n\nssh://root@a   runc  # old nodes\n  ssh://root@b:2200\nssh://root@c kata-py\n")
    assert parse_hosts_file(str(hosts)) == [SshTarget("root", "a", 22, "runc"), SshTarget("root", "b", 2200, None),
                                            SshTarget("root", "c", 22, "kata-py")]


@pytest.mark.parametrize("text, says", [
    ("ssh://root@a runc extra\n", r"hosts:1: expected"),
    ("# nothing\n", "names no host"),
    ("ssh://root@a\nssh://a\n", r"hosts:2: the URL names no user"),
])
def test_a_bad_hosts_file_says_which_line(tmp_path, text, says):
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    with pytest.raises(ConfigError, match=says):
        parse_hosts_file(str(hosts))


def test_a_missing_hosts_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--hosts"):
        parse_hosts_file(str(tmp_path / "none"))


def test_the_same_node_and_runtime_twice_is_refused(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("ssh://root@a runc\nssh://root@a kata-py\n")
    assert len(targets_from(["ssh://root@b"], str(hosts))) == 3
    with pytest.raises(ConfigError, match="named twice"):
        targets_from(["ssh://root@a", "ssh://root@a:22"], None)


# -- known_hosts


def _key(tmp_path, name: str) -> paramiko.PKey:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.PKey.from_path(path)


def test_a_known_key_passes(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "known_hosts"
    known.write_text(f"# ours\n[node]:2222 {key.get_name()} {key.get_base64()}\n")
    assert KnownHosts(known).verify("[node]:2222", key) == "known"
    assert KnownHosts(known).key_types("[node]:2222") == ["ssh-ed25519"]


def test_a_hashed_entry_is_matched(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "known_hosts"
    hashed = paramiko.HostKeys.hash_host("node.example")
    known.write_text(f"{hashed} {key.get_name()} {key.get_base64()}\n")
    assert KnownHosts(known).verify("node.example", key) == "known"


def test_an_unknown_node_is_refused_and_nothing_written(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "known_hosts"
    with pytest.raises(HostKeyUnknown, match=key.fingerprint.replace("+", r"\+")):
        KnownHosts(known).verify("node", key)
    assert not known.exists()


def test_accept_new_appends_the_key_and_keeps_the_rest(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "ssh" / "known_hosts"
    known.parent.mkdir()
    known.write_text("# keep me\n@cert-authority *.example ssh-ed25519 AAAA\nother ssh-ed25519 AAAAC3Nz")  # no final newline
    assert KnownHosts(known, accept_new=True).verify("[node]:2222", key) == "added"
    lines = known.read_text().splitlines()
    assert lines[:3] == ["# keep me", "@cert-authority *.example ssh-ed25519 AAAA", "other ssh-ed25519 AAAAC3Nz"]
    assert lines[3] == f"[node]:2222 ssh-ed25519 {key.get_base64()}"
    assert KnownHosts(known).verify("[node]:2222", key) == "known"
    assert oct(known.stat().st_mode & 0o777) in ("0o600", "0o644")


def test_a_new_known_hosts_file_is_private(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "fresh" / "known_hosts"
    KnownHosts(known, accept_new=True).verify("node", key)
    assert known.stat().st_mode & 0o777 == 0o600 and known.parent.stat().st_mode & 0o777 == 0o700


def test_a_changed_key_is_refused_even_with_accept_new(tmp_path):
    old, new = _key(tmp_path, "old"), _key(tmp_path, "new")
    known = tmp_path / "known_hosts"
    known.write_text(f"node {old.get_name()} {old.get_base64()}\n")
    before = known.read_text()
    with pytest.raises(HostKeyChanged, match="HOST KEY CHANGED"):
        KnownHosts(known, accept_new=True).verify("node", new)
    assert known.read_text() == before


def test_a_key_of_a_type_not_known_for_the_node_is_refused(tmp_path):
    ed = _key(tmp_path, "ed")
    rsa = paramiko.RSAKey.generate(2048)
    known = tmp_path / "known_hosts"
    known.write_text(f"node {ed.get_name()} {ed.get_base64()}\n")
    with pytest.raises(HostKeyChanged, match="has only ssh-ed25519"):
        KnownHosts(known, accept_new=True).verify("node", rsa)


def test_the_key_types_known_for_a_node_are_asked_for_first():
    offered = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    assert preferred_key_types(["ssh-rsa"], offered) == ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa", "ssh-ed25519",
                                                         "ecdsa-sha2-nistp256"]
    assert preferred_key_types([], offered) == offered
    assert preferred_key_types(["ecdsa-sha2-nistp256"], offered)[0] == "ecdsa-sha2-nistp256"


# -- merging what came back


def _chunk(results, notes=()):
    return {"runtime": "runc", "runtime_version": "runc 1.1", "host_kernel": "6.1", "host_name": "n1",
            "results": [{"name": n, "title": f"t-{n}", "result": r, "evidence": "e", "output": ""}
                        for n, r in results], "notes": list(notes), "seconds": 1.0, "summary": {}}


PROBES = [{"name": n, "title": f"t-{n}"} for n in ("a", "b", "c", "d")]


def test_chunks_merge_in_battery_order_with_the_node_url():
    events = {"probes": PROBES, "chunks": [_chunk([("a", "held"), ("b", "broke")], ["n"]),
                                           _chunk([("c", "held")], ["n"]), _chunk([("d", "held")])]}
    report = merge("ssh://root@n1", "runc", events, None, ["cleaned"], 9.5)
    assert report["host"] == "ssh://root@n1" and report["host_name"] == "n1"
    assert [(r["name"], r["result"]) for r in report["results"]] == [("a", "held"), ("b", "broke"), ("c", "held"),
                                                                      ("d", "held")]
    assert report["notes"] == ["n", "cleaned"] and report["seconds"] == 9.5
    assert report["summary"]["held"] == 3 and report["summary"]["broke"] == 1


def test_probes_cut_by_a_lost_connection_are_inconclusive_and_the_rest_kept():
    events = {"probes": PROBES, "chunks": [_chunk([("a", "held"), ("b", "broke")])]}
    report = merge("ssh://root@n1", "runc", events, (CONNECTION_LOST, "the connection was lost"), [], 3.0)
    results = {r["name"]: r for r in report["results"]}
    assert results["a"]["result"] == "held" and results["b"]["result"] == "broke"
    for name in ("c", "d"):
        assert results[name]["result"] == "inconclusive" and results[name]["reason"] == CONNECTION_LOST
        assert results[name]["title"] == f"t-{name}" and "was lost" in results[name]["evidence"]
    assert report["summary"]["inconclusive"] == 2
    assert "the connection was lost" in report["notes"]
    # still the machine format: a cut run validates as a good one does
    import jsonschema

    from kata_py.harness import report as report_module
    jsonschema.validate(report, json.loads(report_module.SCHEMA_FILE.read_text()))


def test_nothing_came_back_at_all():
    report = merge("ssh://root@n1", "/opt/bin/crun", {"probes": PROBES, "chunks": []},
                   (CONNECTION_LOST, "lost"), [], 1.0)
    assert report["runtime"] == "crun" and {r["result"] for r in report["results"]} == {"inconclusive"}


def test_the_battery_runs_in_the_chunks_the_runner_splits_it_into():
    probes = catalog.select(None)
    parts = chunks(probes)
    assert [p.name for part in parts for p in part] == [p.name for p in probes if p.during is None] + \
        [p.name for p in probes if p.during is not None]
    assert all(len(part) == 1 for part in parts[1:]) and all(p.during is None for p in parts[0])


def test_a_runtime_name_resolves_on_the_node(tmp_path, monkeypatch):
    assert node_runtime("runc") == "runc" and node_runtime("/opt/x/runc") == "/opt/x/runc"
    assert node_runtime("runsc") == "runsc"   # a known runtime: resolved with its flags by the harness
    tool = tmp_path / "kata-runtime"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert node_runtime("kata-runtime") == str(tool)
    with pytest.raises(ConfigError, match="not installed on this node"):
        node_runtime("youki")


# -- records of what was made on nodes


def test_a_record_held_by_a_live_run_is_not_cleaned_by_another(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_STATE_DIR", str(tmp_path))
    target = parse_url("ssh://root@node:2222")
    live = remote_record.Record.new(target, "runc")
    assert live.work.startswith(remote_record.WORK_PREFIX)
    assert json.loads(live.path.read_text())["runtime"] == "runc"
    cleaned = []
    assert remote_record.clean_leftovers(target, lambda r: cleaned.append(r.work) or []) == []
    assert cleaned == []
    live.update(pid=42)
    live.release()  # the run died: its record is a leftover now
    notes = remote_record.clean_leftovers(target, lambda r: cleaned.append((r.work, r.data["pid"])) or [])
    assert cleaned == [(live.work, 42)] and "cleaned up after an earlier run" in notes[0]
    assert not live.path.exists()


def test_a_record_whose_cleanup_left_something_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_STATE_DIR", str(tmp_path))
    target = parse_url("ssh://root@node")
    record = remote_record.Record.new(target, "runc")
    record.release()
    notes = remote_record.clean_leftovers(target, lambda r: ["directory x"])
    assert "could not all be removed: directory x" in notes[0] and record.path.exists()


# -- the node-side cleanup and the bundle


def test_the_node_cleanup_touches_only_a_remote_harness_directory(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    for work in (str(victim), "/tmp/kata-py-harness-remote.x/../../etc", "/tmp/kata-py-harness-remote.a/b"):
        done = remote_cleanup.clean(work, None, "runc")
        assert done["left"] and done["left"][0].startswith("refused")
    assert victim.exists()


def test_the_node_cleanup_removes_a_work_directory_and_says_nothing_is_left(tmp_path):
    work = remote_record.WORK_PREFIX + "unit-" + tmp_path.name
    try:
        subprocess.run(["mkdir", "-p", f"{work}/tmp/kata-py-harness-x/state", f"{work}/bin"], check=True)
        result = subprocess.run([sys.executable, "-I", "-", json.dumps({"work": work, "pid": None, "runtime": "runc"})],
                                input=cleanup_source(), capture_output=True, check=True)
        assert json.loads(result.stdout) == {"containers_deleted": [], "processes_stopped": [], "left": []}
    finally:
        subprocess.run(["rm", "-rf", work])


def test_the_bundle_runs_the_node_side_with_only_the_stdlib(tmp_path):
    pyz = tmp_path / "harness.pyz"
    pyz.write_bytes(zipapp())
    result = subprocess.run(["/usr/bin/python3", "-I", str(pyz), "run", "--runtime", "no-such-runtime"],
                            capture_output=True, text=True, timeout=60)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "started"
    assert events[-1] == {"event": "error", "message": "--runtime no-such-runtime: not installed on this node "
                                                       "(no-such-runtime is not on its PATH)"}
    assert result.returncode == 1


def test_a_revoked_key_is_refused_even_with_accept_new(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "known_hosts"
    known.write_text(f"@revoked * {key.get_name()} {key.get_base64()}\nnode {key.get_name()} {key.get_base64()}\n")
    with pytest.raises(HostKeyChanged, match="@revoked"):
        KnownHosts(known, accept_new=True).verify("node", key)


def test_patterns_and_negations_name_nodes(tmp_path):
    key = _key(tmp_path, "node")
    known = tmp_path / "known_hosts"
    known.write_text(f"*.rack1.example,!bad.rack1.example {key.get_name()} {key.get_base64()}\n"
                     "garbage line\nnode ssh-ed25519 !!notbase64!!\n")
    assert KnownHosts(known).verify("n7.rack1.example", key) == "known"
    with pytest.raises(HostKeyUnknown):
        KnownHosts(known).verify("bad.rack1.example", key)
    with pytest.raises(HostKeyUnknown):
        KnownHosts(known).verify("node", key)


def test_fingerprints_are_those_ssh_keygen_prints(tmp_path):
    key = _key(tmp_path, "node")
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "node.pub")], capture_output=True, text=True,
                             check=True).stdout.split()[1]
    assert fingerprint(key) == printed == key.fingerprint
