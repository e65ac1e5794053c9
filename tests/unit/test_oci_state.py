"""The OCI state store, the status rules, container ids and signal names (no VM)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kata_py.errors import ConfigError, KataError
from kata_py.oci.container import parse_signal
from kata_py.oci.state import (MAX_ID, ContainerBusy, ContainerExists, ContainerNotFound, ContainerState,
                               StateStore, Status, StatusError, process_start_time, validate_id)

# -- status rules (runtime-spec "Operations", plus runc's delete of and exec into a created container)


RULES = {
    #            start  kill   delete exec   pause  resume
    "creating": (False, False, False, False, False, False),
    "created": (True, True, True, True, False, False),
    "running": (False, True, False, True, True, False),
    "paused": (False, True, False, False, False, True),
    "stopped": (False, False, True, False, False, False),
}


@pytest.mark.parametrize("status", list(RULES))
def test_status_rules(status):
    s = Status(status)
    got = (s.can_start(), s.can_kill(), s.can_delete(), s.can_exec(), s.can_pause(), s.can_resume())
    assert got == RULES[status]


# runc 1.1's messages, which shims and conmon match on (the integration test
# test_runc_wording.py checks them against a real runc).
WORDING = [
    ("start", "running", "cannot start an already running container"),
    ("start", "stopped", "cannot start a container that has stopped"),
    ("start", "paused", "cannot start a container in the paused state"),
    ("delete", "running", "cannot delete container c1 that is not stopped: running"),
    ("exec in", "stopped", "cannot exec in a stopped container"),
    ("exec in", "paused", "cannot exec in a paused container (use --ignore-paused to override)"),
    ("kill", "stopped", "container not running"),
    ("pause", "paused", "container not running"),
    ("update", "stopped", "container not running"),
    ("resume", "running", "container not paused"),
    ("read stats of", "stopped", "container with id c1 is not running"),
]


@pytest.mark.parametrize("operation, status, message", WORDING)
def test_refusals_use_runcs_wording(operation, status, message):
    assert str(StatusError("c1", operation, Status(status))) == message


def test_unknown_and_duplicate_ids_use_runcs_wording():
    assert str(ContainerNotFound("c1")) == "container does not exist"
    assert str(ContainerExists("c1")) == "container with given ID already exists"


def test_every_status_has_a_rule():
    assert {s.value for s in Status} == set(RULES)


# -- container ids


@pytest.mark.parametrize("good", ["a", "c1", "A-b_c.d+e", "0" * MAX_ID, "x..y"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "a/b", "/abs", "..", ".", "../x", "a\0b", "x" * (MAX_ID + 1),
                                 "-leading", ".hidden", "sp ace", "new\nline", "trailing\n", "é"])
def test_invalid_ids(bad):
    with pytest.raises(ConfigError):
        validate_id(bad)


def test_store_paths_never_leave_the_root(tmp_path):
    store = StateStore(tmp_path / "root")
    for bad in ("..", "../x", "a/b"):
        with pytest.raises(ConfigError):
            store.dir(bad)


# -- the store


def state(container_id="c1", **kwargs) -> ContainerState:
    return ContainerState(id=container_id, bundle="/b", rootfs="/b/rootfs", **kwargs)


def test_create_save_load_roundtrip(tmp_path):
    store = StateStore(tmp_path / "root")
    with store.lock("c1", create=True) as directory:
        assert directory == tmp_path / "root" / "c1"
        store.save(state(status="created", pid=os.getpid(), annotations={"k": "v"}))
    loaded = store.load("c1")
    assert (loaded.status, loaded.pid, loaded.annotations) == ("created", os.getpid(), {"k": "v"})
    # The root and each container directory are private.
    assert (tmp_path / "root").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "root" / "c1").stat().st_mode & 0o777 == 0o700


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    with store.lock("c1", create=True):
        store.save(state(status="created"))
    path = tmp_path / "c1" / "state.json"
    before = path.read_bytes()

    # A writer that dies half-way through must leave the old state intact.
    def broken_dump(obj, f):
        f.write('{"id": "c1", "bund')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kata_py.oci.state.json.dump", broken_dump)
    # A KataError, so the CLI prints one line rather than a traceback.
    with pytest.raises(KataError, match="cannot record the state of container 'c1': No space left on device"):
        store.save(state(status="running"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not (tmp_path / "c1" / "state.json.tmp").exists()
    store.save(state(status="running"))
    assert store.load("c1").status == "running"
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == ["lock", "state.json"]


def test_create_refuses_an_existing_id_and_keeps_it(tmp_path):
    store = StateStore(tmp_path)
    with store.lock("c1", create=True):
        store.save(state(status="created", pid=1234))
    with pytest.raises(ContainerExists):
        with store.lock("c1", create=True):
            pytest.fail("entered the block for an existing id")
    assert store.load("c1").pid == 1234


def test_failed_create_leaves_nothing(tmp_path):
    store = StateStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.lock("c1", create=True):
            raise RuntimeError("monitor failed")
    assert list(tmp_path.iterdir()) == []


def test_unknown_ids(tmp_path):
    store = StateStore(tmp_path / "never-made")
    with pytest.raises(ContainerNotFound):
        store.load("nope")
    with pytest.raises(ContainerNotFound):
        with store.lock("nope"):
            pass
    assert store.list_ids() == []
    assert not (tmp_path / "never-made").exists()


def test_list_ids_and_remove(tmp_path):
    store = StateStore(tmp_path)
    for container_id in ("b", "a", "c"):
        with store.lock(container_id, create=True):
            store.save(state(container_id))
    (tmp_path / "half-made").mkdir()          # no state.json: a create in progress or a crash
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray-file").write_text("")
    assert store.list_ids() == ["a", "b", "c"]
    store.remove("b")
    assert store.list_ids() == ["a", "c"]
    assert not (tmp_path / "b").exists()
    store.remove("b")  # idempotent


def test_lock_excludes_other_processes(tmp_path):
    store = StateStore(tmp_path)
    with store.lock("c1", create=True):
        store.save(state())
    probe = ("import sys; from kata_py.oci.state import StateStore, ContainerBusy\n"
             "try:\n"
             "    with StateStore(sys.argv[1]).lock('c1', wait=False): print('got it')\n"
             "except ContainerBusy: print('busy')\n")

    def other() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parents[2]).stdout.strip()

    with store.lock("c1"):
        assert other() == "busy"
        with pytest.raises(ContainerBusy):  # flock is per open file: the same process is refused too
            with store.lock("c1", wait=False):
                pass
    assert other() == "got it"


def test_unreadable_state_is_an_error_not_a_crash(tmp_path):
    store = StateStore(tmp_path)
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "state.json").write_text("{not json")
    with pytest.raises(Exception) as info:
        store.load("c1")
    assert "unreadable" in str(info.value)


# -- the status is checked against the monitor process


def test_live_status_follows_the_monitor():
    me = os.getpid()
    assert state(status="running", pid=me, pid_start_time=process_start_time(me)).live_status() is Status.RUNNING
    # Same pid, different start time: the pid was reused, the monitor is gone.
    reused = state(status="running", pid=me, pid_start_time=(process_start_time(me) or 0) + 1)
    assert reused.live_status() is Status.STOPPED
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert state(status="paused", pid=dead.pid).live_status() is Status.STOPPED
    # A zombie (exited, not yet reaped) is not alive either.
    zombie = subprocess.Popen(["true"])
    try:
        for _ in range(200):
            if Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            os.sched_yield()
            import time
            time.sleep(0.01)
        assert state(status="created", pid=zombie.pid).live_status() is Status.STOPPED
    finally:
        zombie.wait()


def test_oci_state_document():
    me = os.getpid()
    running = state(status="running", pid=me, pid_start_time=process_start_time(me), annotations={"a": "b"})
    doc = running.oci_state()
    assert doc["status"] == "running" and doc["pid"] == me and doc["annotations"] == {"a": "b"}
    assert {"ociVersion", "id", "status", "pid", "bundle"} <= set(doc)
    json.dumps(doc)
    stopped = state(status="stopped", pid=me).oci_state()
    assert stopped["pid"] == 0 and stopped["status"] == "stopped" and "annotations" not in stopped


# -- kill's signal argument, as runc takes it


@pytest.mark.parametrize("text,number", [
    ("TERM", signal.SIGTERM), ("SIGTERM", signal.SIGTERM), ("15", 15), ("sigterm", signal.SIGTERM),
    ("KILL", 9), ("9", 9), ("SIGKILL", 9), ("hup", signal.SIGHUP), ("USR1", signal.SIGUSR1),
    ("64", 64), (" INT ", signal.SIGINT)])
def test_parse_signal(text, number):
    assert parse_signal(text) == int(number)


@pytest.mark.parametrize("text", ["", "0", "65", "-9", "SIGNOPE", "TERM9", "9.0", "SIG"])
def test_parse_signal_rejects(text):
    with pytest.raises(ConfigError):
        parse_signal(text)
