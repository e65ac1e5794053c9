"""`kata-py harness run --host ssh://...` against a real OpenSSH server
(tests/ssh_node.py: Debian's sshd in a private network namespace, keys made
for the test). The node is this machine seen through SSH, so a local run of
the same probes, in the same namespace, is what the remote run must equal.

After every remote run the node must hold nothing of it: no work directory
in /tmp, no process naming it, no harness marker, no container (each lives
in a state root under the work directory), no VM under the run directory;
and the client keeps no record of unfinished cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tests.conftest import RUN_DIR, qemu_processes_under
from tests.ssh_node import SshNode, processes_mentioning

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)")]

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
# The node's PATH: sshd's usual one, with kata-py "installed" (this checkout's venv) at its end, so
# python3 is still the system's.
NODE_PATH = f"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{VENV_BIN}"
QUICK = ["fs-dotdot", "dev-mem", "kernel-identity", "proc-leaks", "host-pids", "fork-bomb"]
WORK_GLOB = "kata-py-harness-remote.*"
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "kata_py" / "harness" / "result.schema.json").read_text())


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    ssh = SshNode(tmp_path_factory.mktemp("ssh-node") / "node",
                  {"PATH": NODE_PATH, "KATA_PY_RUN_DIR": str(RUN_DIR)}).start()
    yield ssh
    ssh.close()


@pytest.fixture
def known(node, tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(node.known_hosts_line())
    return path


@pytest.fixture
def records(tmp_path):
    return tmp_path / "client-state"


def remote(node, known: Path, records: Path, *args: str, identity: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, KATA_PY_STATE_DIR=str(records))
    return node.client("harness", "run", "--json", "--host", node.url, "--identity", str(identity or node.user_key),
                       "--known-hosts", str(known), *args, env=env)


def local(node, *args: str) -> tuple[int, dict]:
    result = node.client("harness", "run", "--json", *args)
    return result.returncode, json.loads(result.stdout)


def verdicts(report: dict) -> dict[str, str]:
    return {r["name"]: r["result"] for r in report["results"]}


def stray_markers() -> list[int]:
    """Harness marker processes outliving the harness that started them, or
    started by a remote run's (other harness runs on this machine, with their
    markers, may be going on at the same time)."""
    found = []
    for pid in processes_mentioning("kata-py-harness-marker-"):
        try:
            parent = int(Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")[-1])
            parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, ValueError):
            parent_argv = b""
        if not parent_argv or b"kata-py-harness-remote." in parent_argv:
            found.append(pid)
    return found


def assert_nothing_left(records: Path) -> None:
    assert sorted(Path("/tmp").glob(WORK_GLOB)) == []
    assert processes_mentioning("kata-py-harness-remote.") == []
    deadline = time.monotonic() + 5  # a marker ends within a second of its harness
    while stray_markers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stray_markers() == []
    assert qemu_processes_under(RUN_DIR) == []
    assert sorted(p.name for p in records.rglob("*.json")) == [], "a record of unfinished cleanup was kept"


# -- host keys


def test_unknown_host_key_is_refused_then_recorded_with_accept_new(node, tmp_path, records):
    known = tmp_path / "ssh" / "known_hosts"  # not there yet
    refused = remote(node, known, records, "--runtime", "runc", "--probe", "kernel-identity")
    assert refused.returncode != 0
    error = refused.stderr.decode().strip()
    assert len(error.splitlines()) == 1 and "is not in" in error and "--accept-new-host-key" in error
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(node.host_key)], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    assert fingerprint in error
    assert refused.stdout == b"" and not known.exists()
    assert_nothing_left(records)

    accepted = remote(node, known, records, "--runtime", "runc", "--probe", "kernel-identity",
                      "--accept-new-host-key")
    assert accepted.returncode == 0, accepted.stderr.decode()
    assert verdicts(json.loads(accepted.stdout)) == {"kernel-identity": "broke"}
    assert known.read_text().split() == node.known_hosts_line().split()
    # Known now: the flag is not needed any more.
    again = remote(node, known, records, "--runtime", "runc", "--probe", "kernel-identity")
    assert again.returncode == 0, again.stderr.decode()
    assert_nothing_left(records)


def test_changed_host_key_is_refused_even_with_accept_new(node, tmp_path, records):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    key_type, blob = (other.with_suffix(".pub")).read_text().split()[:2]
    known.write_text(f"# the node, as recorded before\n[127.0.0.1]:{node.port} {key_type} {blob}\n")
    before = known.read_text()
    result = remote(node, known, records, "--runtime", "runc", "--probe", "kernel-identity", "--accept-new-host-key")
    assert result.returncode != 0
    assert "HOST KEY CHANGED" in result.stderr.decode()
    assert known.read_text() == before
    assert_nothing_left(records)


def test_a_key_the_node_does_not_know_is_refused(node, known, tmp_path, records):
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    result = remote(node, known, records, "--runtime", "runc", identity=stranger)
    assert result.returncode != 0
    assert "accepted none of the keys" in result.stderr.decode()
    assert_nothing_left(records)


# -- the same verdicts as a local run


def test_runc_on_the_node_gives_the_local_verdicts(node, known, records):
    status, here = local(node, "--runtime", "runc", "--probe", *QUICK)
    result = remote(node, known, records, "--runtime", "runc", "--probe", *QUICK)
    report = json.loads(result.stdout)
    assert report["host"] == node.url and report["runtime"] == "runc"
    assert [r["name"] for r in report["results"]] == [r["name"] for r in here["results"]]
    assert verdicts(report) == verdicts(here)
    assert verdicts(report)["kernel-identity"] == "broke"  # runc shares the node's kernel
    assert result.returncode == status
    assert report["host_kernel"] == here["host_kernel"] and report["runtime_version"] == here["runtime_version"]
    Draft202012Validator(SCHEMA).validate(report)  # the machine format, as a local run writes it
    assert_nothing_left(records)


def test_kata_py_on_the_node_gives_the_local_verdicts(image, node, known, records):
    status, here = local(node, "--probe", *QUICK)
    result = remote(node, known, records, "--runtime", "kata-py", "--probe", *QUICK)
    report = json.loads(result.stdout)
    assert report["runtime"] == "kata-py"
    assert verdicts(report) == verdicts(here)
    assert verdicts(report)["kernel-identity"] == "held"
    assert result.returncode == status
    assert_nothing_left(records)


def test_the_default_battery_with_runc_on_the_node(node, known, records):
    status, here = local(node, "--runtime", "runc")
    result = remote(node, known, records, "--runtime", "runc")
    report = json.loads(result.stdout)
    assert verdicts(report) == verdicts(here)
    assert result.returncode == status
    assert_nothing_left(records)


def test_several_nodes_from_a_hosts_file(node, known, records, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# two checks of one node, at once\n{node.url} runc\n{node.url}   # --runtime's\n")
    env = dict(os.environ, KATA_PY_STATE_DIR=str(records))
    result = node.client("harness", "run", "--json", "--hosts", str(hosts), "--runtime", "runc", "--probe",
                         "kernel-identity", "proc-leaks", "--identity", str(node.user_key), "--known-hosts", str(known),
                         env=env)
    assert result.returncode == 0, result.stderr.decode()
    reports = json.loads(result.stdout)
    assert [r["host"] for r in reports] == [node.url, node.url]
    assert [verdicts(r) for r in reports] == [{"kernel-identity": "broke", "proc-leaks": "broke"}] * 2
    assert_nothing_left(records)


# -- a connection lost mid-run


def test_a_cut_connection_gives_inconclusive_probes_and_the_next_run_cleans_up(node, known, records):
    probes = ["kernel-identity", "proc-leaks", "fork-bomb", "memory-bomb"]
    env = dict(os.environ, KATA_PY_STATE_DIR=str(records))
    client = node.client("harness", "run", "--json", "--host", node.url, "--identity", str(node.user_key),
                         "--known-hosts", str(known), "--runtime", "runc", "--probe", *probes, env=env, popen=True)
    seen = []
    try:
        for raw in client.stderr:
            seen.append(raw.decode())
            if "running fork-bomb" in seen[-1]:
                break
        else:
            pytest.fail("the remote run never reached fork-bomb: " + "".join(seen))
        time.sleep(1)  # the bomb is running on the node
        # The node goes away: the server (no reconnecting now) and this connection's sshd.
        node.stop_server()
        out, err = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if node.proc is None:
            node.start_server()
    assert client.returncode != 0
    report = json.loads(out)
    results = {r["name"]: r for r in report["results"]}
    # What came back before the cut keeps its verdict; what did not is inconclusive, with the reason.
    assert results["kernel-identity"]["result"] == results["proc-leaks"]["result"] == "broke"
    for name in ("fork-bomb", "memory-bomb"):
        assert results[name]["result"] == "inconclusive"
        assert results[name]["reason"] == "connection lost"
        assert "was lost" in results[name]["evidence"]
    assert any("cleaned up at the next run" in note for note in report["notes"])
    assert len(list(records.rglob("*.json"))) == 1, "the run's record is kept for the next run"

    # The next run against the node cleans up after it first, and says so.
    after = remote(node, known, records, "--runtime", "runc", "--probe", "kernel-identity")
    assert after.returncode == 0, after.stderr.decode()
    assert any("cleaned up after an earlier run" in note for note in json.loads(after.stdout)["notes"])
    assert_nothing_left(records)


def test_session_child_killed_mid_run_is_inconclusive_and_cleaned_at_once(node, known, records):
    """Only this connection's sshd dies (the server stays): the client
    reconnects at once and removes what the cut run left."""
    env = dict(os.environ, KATA_PY_STATE_DIR=str(records))
    client = node.client("harness", "run", "--json", "--host", node.url, "--identity", str(node.user_key),
                         "--known-hosts", str(known), "--runtime", "runc", "--probe", "kernel-identity",
                         "fork-bomb", env=env, popen=True)
    try:
        for raw in client.stderr:
            if b"running fork-bomb" in raw:
                break
        time.sleep(1)
        sessions = node.sessions()
        assert sessions
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        out, _err = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    report = json.loads(out)
    assert verdicts(report) == {"kernel-identity": "broke", "fork-bomb": "inconclusive"}
    assert client.returncode != 0
    assert_nothing_left(records)
