"""The runc-compatible CLI end to end: create/start/state/kill/delete, run, exec,
pause/resume, bad input, and that nothing is left behind.

Every container boots its own QEMU guest (seconds under TCG), so one running
container is shared by the checks that can share it. The test process makes
itself a child subreaper, as conmon and containerd's shim are: the monitor that
`create` leaves behind is then re-parented to us, and its exit status (the
container's, by contract) can be read with waitpid.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.bundles import make_bundle
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import assert_nothing_left, cli, cmdline, owned_container, reap

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]


def state_of(root: Path, container_id: str) -> dict:
    result = cli(root, "state", container_id)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_status(root: Path, container_id: str, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = state_of(root, container_id)
        if state["status"] == status or time.monotonic() > deadline:
            assert state["status"] == status, state
            return state
        time.sleep(0.2)


def one_error_line(result: subprocess.CompletedProcess, *needles: str, status: int = 1) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def is_live_monitor(pid: int) -> bool:
    """A container's sandbox owner or an exec relay, still running."""
    argv = cmdline(pid).split(b"\0")
    return owned_container(argv) is not None or any(b"kata_py.sandbox.relay" in arg for arg in argv)


TRAP_LOOP = ("touch /started; trap 'echo got-term; exit 7' TERM; echo ready; "
             "while :; do sleep 1 & wait $!; done")


def test_lifecycle(tmp_path):
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "bundle", ["sh", "-c", TRAP_LOOP])
    pid_file = tmp_path / "container.pid"
    logs = tmp_path / "io"

    result = cli(root, "create", "--bundle", bundle, "--pid-file", pid_file, "c1", io=logs)
    assert result.returncode == 0, result.stderr
    state = state_of(root, "c1")
    assert state["status"] == "created" and state["id"] == "c1"
    assert state["bundle"] == str(bundle.resolve()) and state["rootfs"] == str((bundle / "rootfs").resolve())
    pid = int(pid_file.read_text())
    assert state["pid"] == pid and is_live_monitor(pid)
    assert not list(tmp_path.glob(".kata-py-pid*"))
    # Held at the barrier: set up, but its program has not run yet.
    time.sleep(0.5)
    assert not (bundle / "rootfs" / "started").exists()
    listed = json.loads(cli(root, "list", "--format", "json").stdout)
    assert [(s["id"], s["status"], s["pid"]) for s in listed] == [("c1", "created", pid)]

    result = cli(root, "start", "c1")
    assert result.returncode == 0, result.stderr
    assert state_of(root, "c1")["status"] == "running"
    deadline = time.monotonic() + 20
    while not (bundle / "rootfs" / "started").exists():
        assert time.monotonic() < deadline, "the container's process never ran"
        time.sleep(0.1)

    # Operations the status does not allow are refused, and change nothing.
    one_error_line(cli(root, "start", "c1"), "cannot start an already running container")
    one_error_line(cli(root, "delete", "c1"), "cannot delete container c1 that is not stopped: running")
    one_error_line(cli(root, "resume", "c1"), "container not paused")
    assert state_of(root, "c1")["status"] == "running" and is_live_monitor(pid)

    result = cli(root, "kill", "c1", "TERM")
    assert result.returncode == 0, result.stderr
    state = wait_status(root, "c1", "stopped")
    assert state["pid"] == 0
    # The monitor exits with the container's status: the trap's `exit 7`.
    assert reap(pid) == 7
    assert b"got-term" in (logs / "stdout").read_bytes()
    one_error_line(cli(root, "kill", "c1", "KILL"), "container not running")
    # --all on a stopped container: nothing left to signal, not an error (runc; containerd depends on it).
    assert cli(root, "kill", "--all", "c1", "KILL").returncode == 0

    result = cli(root, "delete", "c1")
    assert result.returncode == 0, result.stderr
    one_error_line(cli(root, "state", "c1"), "does not exist")
    assert_nothing_left(root)


@pytest.mark.parametrize("script,status,output,namespaces", [
    ("true", 0, b"", None),
    ("echo hi; exit 3", 3, b"hi\n", None),
    # As with runc: the init of a pid namespace ignores even SIGKILL from inside it...
    ("kill -9 $$; echo survived", 0, b"survived\n", None),
    # ...and without one, it dies of it, and the status says so (128 + 9).
    ("kill -9 $$", 137, b"", ["mount", "ipc", "uts"]),
])
def test_run_exit_status(tmp_path, script, status, output, namespaces):
    extra = {"linux": {"namespaces": [{"type": t} for t in namespaces]}} if namespaces else {}
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "bundle", ["sh", "-c", script], **extra)
    result = cli(root, "run", "--bundle", bundle, "r1")
    assert (result.returncode, result.stdout) == (status, output), result.stderr
    assert_nothing_left(root)


def test_bad_input(tmp_path):
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path / "bundle", ["true"])
    config = json.loads((bundle / "config.json").read_text())

    def with_config(mutate) -> Path:
        changed = json.loads(json.dumps(config))
        mutate(changed)
        (bundle / "config.json").write_text(json.dumps(changed))
        return bundle

    for mutate, json_path in ((lambda c: c["root"].pop("path"), "/root/path"),
                              (lambda c: c["process"].update(args="true"), "/process/args"),
                              (lambda c: c["process"]["user"].update(uid="0"), "/process/user/uid")):
        with_config(mutate)
        for command in ("create", "run"):
            one_error_line(cli(root, command, "--bundle", bundle, "b1"), f"config.json {json_path}:")
            assert_nothing_left(root)
    (bundle / "config.json").write_text("{\n  \"ociVersion\": \"1.0.2\",\n")
    one_error_line(cli(root, "create", "--bundle", bundle, "b1"), "invalid JSON at line 3")
    with_config(lambda c: c["process"].update(terminal=True))
    one_error_line(cli(root, "create", "--bundle", bundle, "b1"), "--console-socket")
    with_config(lambda c: None)
    one_error_line(cli(root, "create", "--bundle", bundle, "--preserve-fds", "1", "b1"), "--preserve-fds")
    one_error_line(cli(root, "create", "--bundle", tmp_path / "nowhere", "b1"), "no such file")
    for bad_id in ("../escape", "a/b", "x" * 256):
        one_error_line(cli(root, "create", "--bundle", bundle, bad_id), "invalid container id")
    assert_nothing_left(root)

    for args in (["state"], ["start"], ["kill"], ["kill", "-a"], ["delete"], ["pause"], ["resume"]):
        one_error_line(cli(root, *args, "nope"), "container does not exist")
    # As runc: deleting with --force what is already gone succeeds (containerd's
    # shim cleans up that way after the fact).
    result = cli(root, "delete", "--force", "nope")
    assert result.returncode == 0 and result.stderr == b""
    one_error_line(cli(root, "exec", "nope", "true"), "exec failed: container does not exist", status=255)
    one_error_line(cli(root, "kill", "nope", "NOSUCHSIGNAL"), "invalid signal")
    assert_nothing_left(root)

    # containerd's runc shim reads the last JSON error line of --log.
    log = tmp_path / "log.json"
    result = cli(root, "state", "nope", log=log)
    one_error_line(result, "does not exist")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and records[-1]["level"] == "error" and "container does not exist" in records[-1]["msg"]
    assert "time" in records[-1]
    assert_nothing_left(root)


def test_json_log_holds_only_json_lines(tmp_path):
    """containerd's runc shim reads the runtime's error from the last JSON line
    of --log: the container's monitor writes to that file too, and in JSON."""
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "bundle", ["sh", "-c", "exit 0"])
    log = tmp_path / "log.json"
    result = cli(root, "create", "--bundle", bundle, "j1", io=tmp_path / "io", log=log)
    assert result.returncode == 0, result.stderr
    assert cli(root, "start", "j1", log=log).returncode == 0
    wait_status(root, "j1", "stopped")
    assert cli(root, "delete", "j1", log=log).returncode == 0
    lines = log.read_text().splitlines()
    assert any("owner_started" in line for line in lines), lines[:5]     # the sandbox owner did write here
    records = [json.loads(line) for line in lines]
    assert all(set(record) == {"level", "msg", "time"} for record in records)
    assert_nothing_left(root)


def test_duplicate_id_and_force_delete(tmp_path):
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "bundle", ["sleep", "1000"])
    other = make_bundle(tmp_path / "other", ["true"])
    result = cli(root, "create", "--bundle", bundle, "d1", io=tmp_path / "io")
    assert result.returncode == 0, result.stderr
    first = json.loads((root / "d1" / "state.json").read_text())

    # A second container with the same id is refused and the first is untouched.
    one_error_line(cli(root, "create", "--bundle", other, "d1", io=tmp_path / "io2"),
                   "container with given ID already exists")
    one_error_line(cli(root, "run", "--bundle", other, "d1", io=tmp_path / "io3"),
                   "container with given ID already exists")
    state = state_of(root, "d1")
    assert (state["status"], state["pid"], state["bundle"]) == ("created", first["pid"], str(bundle.resolve()))
    assert is_live_monitor(first["pid"])

    assert cli(root, "start", "d1").returncode == 0
    assert state_of(root, "d1")["status"] == "running"
    run_dir = Path(first["run_dir"])
    assert run_dir.is_dir() and any(run_dir.glob("*.sock"))
    assert qemu_processes_under(RUN_DIR)

    started = time.monotonic()
    result = cli(root, "delete", "--force", "d1")
    assert result.returncode == 0, result.stderr
    # The monitor must not be left waiting for delete's lock until delete kills it.
    assert time.monotonic() - started < 10
    assert not is_live_monitor(first["pid"])
    assert reap(first["pid"]) == 137  # killed by SIGKILL inside the guest
    assert not run_dir.exists()
    one_error_line(cli(root, "state", "d1"), "does not exist")
    assert_nothing_left(root)


# -- one running container shared by the checks below (they run in file order)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    base = tmp_path_factory.mktemp("box")
    root, bundle = base / "root", make_bundle(base / "bundle", ["sh", "-c", "echo started; exec sleep 1000"])
    pid_file = base / "pid"
    result = cli(root, "run", "--detach", "--bundle", bundle, "--pid-file", pid_file, "box", io=base / "io")
    assert result.returncode == 0, result.stderr
    box = {"root": root, "bundle": bundle, "pid": int(pid_file.read_text()), "base": base,
           "state": json.loads((root / "box" / "state.json").read_text())}
    yield box
    if (root / "box").exists():
        cli(root, "delete", "--force", "box")
    assert_nothing_left(root)


def test_box_runs(box):
    state = wait_status(box["root"], "box", "running")
    assert state["pid"] == box["pid"] and is_live_monitor(box["pid"])
    assert (box["base"] / "io" / "stdout").read_bytes() == b"started\n"


def test_the_guest_kernel_is_not_the_hosts(box, image):
    result = cli(box["root"], "exec", "box", "uname", "-r")
    assert result.returncode == 0, result.stderr
    release = result.stdout.decode().strip()
    assert release == image.kernel_release and release != os.uname().release


def test_files_cross_the_rootfs_share_both_ways(box):
    rootfs = box["bundle"] / "rootfs"
    (rootfs / "tmp" / "from-host").write_text("written on the host\n")
    result = cli(box["root"], "exec", "box", "sh", "-c",
                 "cat /tmp/from-host && echo written in the guest > /tmp/from-guest && hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"written on the host\nkata-test\n"
    assert (rootfs / "tmp" / "from-guest").read_text() == "written in the guest\n"


def test_exec_attached(box):
    result = cli(box["root"], "exec", "box", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (result.returncode, result.stdout, result.stderr) == (4, b"out\n", b"err\n")
    result = cli(box["root"], "exec", "box", "cat", input=b"through stdin\n")
    assert (result.returncode, result.stdout) == (0, b"through stdin\n"), result.stderr
    result = cli(box["root"], "exec", "--env", "A=b", "--cwd", "/tmp", "box", "sh", "-c", 'echo "$A $PWD"')
    assert result.stdout == b"b /tmp\n", result.stderr
    one_error_line(cli(box["root"], "exec", "box", "/no/such/program"), "exec failed:", "no/such/program",
                   status=255)


def test_exec_detached(box, tmp_path):
    pid_file = tmp_path / "exec.pid"
    started = time.monotonic()
    result = cli(box["root"], "exec", "--detach", "--pid-file", pid_file, "box",
                 "sh", "-c", "sleep 2; echo done > /tmp/exec-done; exit 5", io=tmp_path / "io")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10  # it returns once the process runs, not when it ends
    pid = int(pid_file.read_text())
    assert is_live_monitor(pid)
    assert not (box["bundle"] / "rootfs" / "tmp" / "exec-done").exists()
    assert reap(pid) == 5
    assert (box["bundle"] / "rootfs" / "tmp" / "exec-done").read_text() == "done\n"
    assert not list((box["root"] / "box").glob("exec-*"))  # its process.json is gone
    assert state_of(box["root"], "box")["status"] == "running"


def test_exec_process_json(box, tmp_path):
    process = {"terminal": False, "user": {"uid": 65534, "gid": 65534}, "cwd": "/tmp",
               "args": ["sh", "-c", 'echo "$GREETING $(id -u):$(id -g) $PWD"; exit 9'],
               "env": ["PATH=/bin", "GREETING=hello"]}
    (tmp_path / "process.json").write_text(json.dumps(process))
    result = cli(box["root"], "exec", "--process", tmp_path / "process.json", "box")
    assert (result.returncode, result.stdout) == (9, b"hello 65534:65534 /tmp\n"), result.stderr


def test_pause_resume_then_force_delete_while_paused(box):
    root = box["root"]
    assert cli(root, "pause", "box").returncode == 0
    assert state_of(root, "box")["status"] == "paused"
    one_error_line(cli(root, "exec", "box", "true"), "exec failed: cannot exec in a paused container", status=255)
    one_error_line(cli(root, "pause", "box"), "container not running")
    assert cli(root, "resume", "box").returncode == 0
    assert state_of(root, "box")["status"] == "running"
    result = cli(root, "exec", "box", "echo", "alive")
    assert (result.returncode, result.stdout) == (0, b"alive\n"), result.stderr

    assert cli(root, "pause", "box").returncode == 0
    one_error_line(cli(root, "delete", "box"), "cannot delete container box that is not stopped: paused")
    run_dir = Path(box["state"]["run_dir"])
    assert run_dir.is_dir()
    started = time.monotonic()
    result = cli(root, "delete", "--force", "box")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert not is_live_monitor(box["pid"]) and not run_dir.exists()
    reap(box["pid"])
    one_error_line(cli(root, "state", "box"), "does not exist")
    assert_nothing_left(root)


def test_a_failing_prestart_hook_fails_create_and_leaves_nothing(tmp_path):
    """The hook runs while the monitor waits, before any VM: create ends with
    the hook's error, and neither the monitor nor anything of it is left."""
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path / "bundle", ["true"], hooks={"prestart": [{"path": "/bin/false"}]})
    one_error_line(cli(root, "create", "--bundle", bundle, "p1", io=tmp_path / "io"), "prestart hook /bin/false")
    assert_nothing_left(root)


def test_hooks_ps_and_kill_all(tmp_path):
    """Hooks run on the host with the state on stdin; ps lists the container's
    guest processes; kill --all reaches every one of them."""
    root = tmp_path / "root"
    out = tmp_path / "hooks"
    out.mkdir()

    def hook(name):
        return [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {out}/{name}.json"], "timeout": 30}]

    # The shell ignores TERM; its two children get the default back.
    script = "trap '' TERM; (trap - TERM; exec sleep 1000) & (trap - TERM; exec sleep 1001) & wait"
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script],
                         hooks={"prestart": hook("prestart"), "createRuntime": hook("createRuntime"),
                                "poststart": hook("poststart"), "poststop": hook("poststop"),
                                # These two run in the guest, in the container's root.
                                "createContainer": [{"path": "/bin/sh", "args": [
                                    "sh", "-c", "cat > /createContainer.json"], "timeout": 60}],
                                "startContainer": [{"path": "/bin/sh", "args": [
                                    "sh", "-c", "cat > /startContainer.json"], "timeout": 60}]})
    logs = tmp_path / "logs"
    assert cli(root, "create", "--bundle", bundle, "h1", io=logs).returncode == 0
    created = json.loads((out / "prestart.json").read_text())
    assert created["id"] == "h1" and created["status"] == "created" and created["bundle"] == str(bundle)
    assert (out / "createRuntime.json").exists() and not (out / "poststart.json").exists()
    in_guest = json.loads((bundle / "rootfs" / "createContainer.json").read_text())
    assert in_guest["id"] == "h1" and in_guest["status"] == "creating"
    assert not (bundle / "rootfs" / "startContainer.json").exists()
    assert cli(root, "start", "h1").returncode == 0
    assert json.loads((bundle / "rootfs" / "startContainer.json").read_text())["status"] == "created"
    assert json.loads((out / "poststart.json").read_text())["status"] == "running"

    deadline = time.monotonic() + 30
    while True:
        listed = cli(root, "ps", "--format", "json", "h1")
        assert listed.returncode == 0, listed.stderr
        if len(json.loads(listed.stdout)) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(json.loads(listed.stdout)) == 3  # sh and its two sleeps (the hooks are gone)
    table = cli(root, "ps", "h1").stdout.decode()
    assert "sleep 1000" in table and "sleep 1001" in table

    # TERM to the init alone is ignored; --all reaches the children, and the
    # shell's wait then returns.
    assert cli(root, "kill", "h1", "TERM").returncode == 0
    time.sleep(2)
    assert state_of(root, "h1")["status"] == "running"
    assert len(json.loads(cli(root, "ps", "--format", "json", "h1").stdout)) == 3
    assert cli(root, "kill", "--all", "h1", "TERM").returncode == 0
    wait_status(root, "h1", "stopped")
    assert cli(root, "delete", "h1").returncode == 0
    assert json.loads((out / "poststop.json").read_text())["status"] == "stopped"
    assert_nothing_left(root)


def test_dead_vm_reads_as_stopped_and_delete_cleans_up(tmp_path):
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path / "bundle", ["sleep", "1000"])
    assert cli(root, "run", "--detach", "--bundle", bundle, "dead1", io=tmp_path / "logs").returncode == 0
    qemus = qemu_processes_under(RUN_DIR)
    assert qemus
    for pid in qemus:
        os.kill(pid, 9)
    wait_status(root, "dead1", "stopped")
    assert cli(root, "delete", "dead1").returncode == 0
    assert_nothing_left(root)


def test_failing_start_container_hook_stops_the_container(tmp_path):
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path / "bundle", ["sleep", "1000"], hooks={"startContainer": [
        {"path": "/bin/sh", "args": ["sh", "-c", "exit 3"], "timeout": 60}]})
    assert cli(root, "create", "--bundle", bundle, "sh1", io=tmp_path / "logs").returncode == 0
    one_error_line(cli(root, "start", "sh1"), "startContainer hook /bin/sh failed", "exit status 3")
    wait_status(root, "sh1", "stopped")
    assert cli(root, "delete", "sh1").returncode == 0
    assert_nothing_left(root)
