"""kata-py's containerd shim v2 (io.containerd.kata-py.v2) under a real
containerd 1.6: `ctr` driving one container, and the CRI driving a pod of two
containers in one VM, through the `kata-py` handler of contrib/containerd/
config.toml as shipped. containerd runs in a private "node" network namespace
(tests/cri_node.py); nothing touches the host's."""

import os
import re
import subprocess
import time

import pytest

from tests.cri_node import NETNS_DIR, SHIM_HANDLER, Node, described, processes_where, running_node, wait_for
from tests.engines import IMAGE
from tests.terminal import drive_tty

pytestmark = pytest.mark.vm

RUNTIME = "io.containerd.kata-py.v2"
SHIM = b"containerd-shim-kata-py-v2"
GUARDIAN = b"kata-py shim guardian"


def _ours(proc: str) -> bool:
    """A process of this test session: it carries our KATA_PY_RUN_DIR (containerd
    passes its environment to the shim); other kata-py users of the machine do not count."""
    try:
        environ = open(f"/proc/{proc}/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    return b"KATA_PY_RUN_DIR=" + os.environ["KATA_PY_RUN_DIR"].encode() in environ


def _shims() -> dict[int, list[bytes]]:
    """Daemons of kata-py's shim (`start` and `delete` runs end at once)."""
    return processes_where(lambda proc, argv: (b"kata_py.shim.main" in argv or argv[0].endswith(SHIM))
                           and _ours(proc))


def shim_pids() -> list[int]:
    return list(_shims())


def shim_processes() -> list[str]:
    """The shims' daemons and their guardians (which end once they have
    removed what a dead shim left)."""
    guardians = processes_where(lambda proc, argv: (argv[0].startswith(GUARDIAN) or b"kata_py.shim.leftovers" in argv)
                                and _ours(proc))
    return described({**_shims(), **guardians})


def qemus_of_pods() -> list[int]:
    return list(processes_where(lambda proc, argv: b"qemu-system" in argv[0] and b"kata-py-pod-" in b" ".join(argv)
                                and _ours(proc)))


@pytest.fixture(scope="module")
def node(image):
    with running_node() as made:
        yield made
    assert shim_processes() == []
    assert qemus_of_pods() == []


def test_containerd_runs_this_trees_shim():
    """containerd finds io.containerd.kata-py.v2 as containerd-shim-kata-py-v2 on
    its PATH (ci/setup.sh links it): it must be this tree's, beside kata-py."""
    import shutil

    from tests.engines import kata_binary

    found = shutil.which(SHIM.decode())
    assert found and os.path.realpath(found) == os.path.realpath(os.path.join(os.path.dirname(kata_binary()),
                                                                              SHIM.decode()))


def host_memory_cgroup(pid: int) -> str:
    """The process's memory cgroup (v1), or its unified one (v2)."""
    lines = open(f"/proc/{pid}/cgroup").read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))


def _memory_root() -> str:
    return "/sys/fs/cgroup/memory" if os.path.isdir("/sys/fs/cgroup/memory") else "/sys/fs/cgroup"


def memory_limit(cgroup: str) -> int:
    directory = _memory_root() + cgroup
    for name in ("memory.limit_in_bytes", "memory.max"):
        if os.path.exists(f"{directory}/{name}"):
            text = open(f"{directory}/{name}").read().strip()
            return 1 << 62 if text == "max" else int(text)
    raise AssertionError(f"no memory limit file in {directory}")


def cgroup_exists(cgroup: str) -> bool:
    return os.path.isdir(_memory_root() + cgroup)


def ctr_ok(node: Node, *args, timeout: float = 180) -> str:
    result = node.ctr(*args, timeout=timeout)
    assert result.returncode == 0, (args, result.stderr.decode(errors="replace")[-2000:],
                                    node.log_tail(20, only_errors=True))
    return result.stdout.decode(errors="replace")


def assert_pods_gone(node: Node) -> None:
    wait_for(lambda: not shim_processes() and not qemus_of_pods(), 30, 0.2, "the shim and its VM to end")
    assert node.taps() == []


@pytest.mark.parametrize("script,status", [("true", 0), ("exit 7", 7)])
def test_ctr_run_gives_the_exit_status(node, script, status):
    name = f"exit{status}"
    result = node.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "sh", "-c", f"echo out-{status}; {script}")
    assert result.returncode == status, result.stderr
    assert result.stdout == f"out-{status}\n".encode()
    assert_pods_gone(node)


def test_ctr_run_of_a_killed_container_exits_137(node):
    """SIGKILL from outside (a container's init ignores its own)."""
    name = "killed"
    run = subprocess.Popen(["ctr", "-a", str(node.socket), "-n", "k8s.io", "run", "--rm", "--runtime", RUNTIME,
                            IMAGE, name, "sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        wait_for(lambda: re.search(rf"{name}\s+\d+\s+RUNNING", node.ctr("task", "ls").stdout.decode()),
                 120, 0.3, "the task to run")
        ctr_ok(node, "task", "kill", "--signal", "SIGKILL", name)
        assert run.wait(timeout=60) == 137, run.stderr.read()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert_pods_gone(node)


def test_ctr_run_with_a_terminal(node):
    """`ctr run -t`: the container's stdio is a pty in the guest with ctr's
    terminal size (ResizePty), input reaches it, its exit status comes back."""
    argv = ["ctr", "-a", str(node.socket), "-n", "k8s.io", "run", "-t", "--rm", "--runtime", RUNTIME, IMAGE,
            "tty1", "sh"]
    session = [(b"", b"# "), (b"tty; test -t 0 && echo stdin-is-a-tty\r", b"stdin-is-a-tty"),
               (b"stty size\r", b"33 97"), (b"echo $((6*7))-computed\r", b"42-computed"),
               (b"exit 5\r", b"")]
    status, _ = drive_tty(argv, session, rows=33, cols=97, timeout=120)
    assert status == 5
    assert_pods_gone(node)


def test_ctr_exec_pause_resume_metrics_kill(node):
    name = "ticker"
    # Written aside and renamed: a reader never sees the file truncated but not yet written
    # (a pause can land between the two).
    counter = "trap 'exit 3' TERM; i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.2; done"
    ctr_ok(node, "run", "-d", "--runtime", RUNTIME, IMAGE, name, "sh", "-c", counter)
    try:
        wait_for(lambda: node.ctr("task", "exec", "--exec-id", "w", name, "cat", "/tmp/n").returncode == 0,
                 60, 0.5, "the counter")
        out = ctr_ok(node, "task", "exec", "--exec-id", "e1", name, "sh", "-c", "echo exec-ok; cat /tmp/n")
        assert out.startswith("exec-ok\n")
        # stdin through its FIFO; ctr's end of input reaches the guest (CloseIO) and cat ends.
        piped = subprocess.run(["ctr", "-a", str(node.socket), "-n", "k8s.io", "task", "exec", "--exec-id",
                                "e5", name, "cat"], input=b"through stdin\n", capture_output=True, timeout=60)
        assert (piped.returncode, piped.stdout) == (0, b"through stdin\n"), piped.stderr
        # Paused is the whole VM stopped: the counter does not advance.
        before = int(ctr_ok(node, "task", "exec", "--exec-id", "e2", name, "cat", "/tmp/n"))
        ctr_ok(node, "task", "pause", name)
        assert re.search(rf"{name}\s+\d+\s+PAUSED", ctr_ok(node, "task", "ls"))
        time.sleep(3)           # 15 ticks if it ran
        ctr_ok(node, "task", "resume", name)
        after = int(ctr_ok(node, "task", "exec", "--exec-id", "e3", name, "cat", "/tmp/n"))
        assert after - before < 10, (before, after)
        metrics = ctr_ok(node, "task", "metrics", name)
        usage = re.search(r"memory\.usage_in_bytes\s+(\d+)|memory.usage\s+(\d+)|usage\s+(\d+)", metrics)
        assert usage and int(next(g for g in usage.groups() if g)) > 0, metrics
        assert re.search(r"RUNNING", ctr_ok(node, "task", "ls"))
        ctr_ok(node, "task", "kill", name)      # SIGTERM, which the script traps
        wait_for(lambda: "STOPPED" in node.ctr("task", "ls").stdout.decode(), 30, 0.2, "the task to stop")
    finally:
        node.ctr("task", "delete", "--force", name)
        node.ctr("container", "delete", name)
    assert_pods_gone(node)


def test_cri_pod_is_one_vm_whose_containers_share_localhost(node):
    from cri_api.v1 import api_pb2

    parent = f"/kpt-pods-{os.getpid()}/shimpod"     # kubelet's pod cgroup, as cgroupfs names it
    pod_id, pod_config = node.run_pod("shimpod", handler=SHIM_HANDLER, cgroup_parent=parent)
    try:
        server = node.create_container(pod_id, pod_config, "web", [
            "sh", "-c", "mkdir -p /www && echo pod-ok > /www/index.html && exec httpd -f -p 8080 -h /www"])
        node.start_container(server)
        client = node.create_container(pod_id, pod_config, "client", ["sleep", "1000"])
        node.start_container(client)
        [qemu] = qemus_of_pods()
        # The pod's host cgroup (the sandbox container's, under cgroup_parent) holds QEMU, with a limit.
        memory_cgroup = host_memory_cgroup(qemu)
        assert memory_cgroup == f"{parent}/{pod_id}", memory_cgroup
        assert memory_limit(memory_cgroup) < 1 << 40
        fetch = ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://127.0.0.1:8080/ && exit 0; "
                             "sleep 1; done; exit 1"]
        reply = node.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=client, cmd=fetch, timeout=60),
                                      timeout=90)
        assert (reply.exit_code, reply.stdout) == (0, b"pod-ok\n"), reply.stderr
        reply = node.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=client, cmd=["hostname"], timeout=30),
                                      timeout=60)
        assert reply.stdout == b"shimpod\n"
        reply = node.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=server, cmd=["sh", "-c", "echo $$"],
                                                              timeout=30), timeout=60)
        assert reply.exit_code == 0
        # The pod IP answers from the node.
        ip = node.pod_status(pod_id).status.network.ip
        fetched = subprocess.run(["nsenter", f"--net={NETNS_DIR / node.netns}", "busybox", "wget", "-qO-",
                                  f"http://{ip}:8080/"], capture_output=True, timeout=60)
        assert fetched.stdout == b"pod-ok\n", fetched.stderr
        stats = node.runtime.ContainerStats(api_pb2.ContainerStatsRequest(container_id=server), timeout=60).stats
        assert stats.memory.working_set_bytes.value > 0 or stats.memory.usage_bytes.value > 0, stats
    finally:
        problems = node.remove_everything()
    assert problems == []
    assert_pods_gone(node)
    assert not cgroup_exists(parent.rsplit("/", 1)[0])     # all kata-py made of it is gone
    from kata_py.shim.main import shim_dir

    assert not shim_dir().exists() or list(shim_dir().iterdir()) == []   # no socket, log or pod directory


def pod_with_a_sleeper(node: Node, name: str):
    pod_id, pod_config = node.run_pod(name, handler=SHIM_HANDLER)
    container = node.create_container(pod_id, pod_config, "sleeper", ["sleep", "1000"])
    node.start_container(container)
    return pod_id, container


def exit_code_when_exited(node: Node, container_id: str, timeout: float = 60) -> int:
    from cri_api.v1 import api_pb2

    def exited():
        status = node.container_status(container_id)
        return status if status.state == api_pb2.CONTAINER_EXITED else None
    return wait_for(exited, timeout, 0.3, "the container to read as exited").exit_code


def remove_and_check_nothing_left(node: Node, pod_id: str) -> None:
    problems = node.remove_everything()
    assert problems == [], problems
    assert_pods_gone(node)
    from kata_py.shim.main import shim_dir

    assert not shim_dir().exists() or list(shim_dir().iterdir()) == []


# A killed QEMU: the shim reports its containers SIGKILLed (137). A killed
# shim: containerd's CRI loses the task's Wait and records its "unknown" exit
# code, 255, as it does when runc's shim is killed.
@pytest.mark.parametrize("victim,exit_code", [("shim", 255), ("qemu", 137)])
def test_a_killed_shim_or_qemu_ends_the_pod_truthfully(node, victim, exit_code):
    """The pod's container reads as exited, and removing the pod leaves
    nothing: no QEMU, shim, tap or pod directory."""
    pod_id, container = pod_with_a_sleeper(node, f"killed-{victim}")
    [pid] = shim_pids() if victim == "shim" else qemus_of_pods()
    os.kill(pid, 9)
    assert exit_code_when_exited(node, container) == exit_code
    remove_and_check_nothing_left(node, pod_id)


def test_a_restarted_containerd_finds_the_pod_again(node):
    from cri_api.v1 import api_pb2

    pod_id, container = pod_with_a_sleeper(node, "survivor")
    shims = shim_pids()
    node.restart_containerd()
    assert shim_pids() == shims                     # the shim outlived containerd
    assert node.container_status(container).state == api_pb2.CONTAINER_RUNNING
    reply = node.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=container, cmd=["echo", "still-here"],
                                                          timeout=30), timeout=60)
    assert reply.stdout == b"still-here\n", reply.stderr
    remove_and_check_nothing_left(node, pod_id)


def test_task_events_reach_containerd_in_order(node):
    """create, start, exit (with the status), delete; exec-added and
    exec-started for an exec; paused and resumed: as containerd publishes them."""
    events = subprocess.Popen(["ctr", "-a", str(node.socket), "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    name = "evented"
    try:
        ctr_ok(node, "run", "-d", "--runtime", RUNTIME, IMAGE, name, "sh", "-c", "sleep 3; exit 4")
        ctr_ok(node, "task", "exec", "--exec-id", "x1", name, "true")
        ctr_ok(node, "task", "pause", name)
        ctr_ok(node, "task", "resume", name)
        wait_for(lambda: "STOPPED" in node.ctr("task", "ls").stdout.decode(), 60, 0.2, "the task to stop")
        ctr_ok(node, "task", "delete", name)
        ctr_ok(node, "container", "delete", name)
        time.sleep(1)
    finally:
        events.terminate()
        seen = events.communicate(timeout=10)[0].decode(errors="replace")
    topics = [m.group(1) for m in re.finditer(r" (/tasks/[a-z-]+) ", seen)]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"], seen
    assert re.search(r'/tasks/exit \{"container_id":"evented","id":"evented",.*"exit_status":4', seen), seen
    assert_pods_gone(node)


def test_an_oom_kill_in_the_guest_is_a_task_oom_event(node):
    """The container's memory limit holds in the guest cgroup; the kill is
    pushed to containerd as /tasks/oom (the agent watches memory.events)."""
    events = subprocess.Popen(["ctr", "-a", str(node.socket), "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        result = node.ctr("run", "--rm", "--runtime", RUNTIME, "--memory-limit", str(64 << 20), IMAGE, "oom1",
                          "sh", "-c", '(x=$(head -c 200000000 /dev/zero | tr "\\0" x)); echo "after $?"; sleep 1')
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"after 137\n", result.stdout
        time.sleep(1)
    finally:
        events.terminate()
        seen = events.communicate(timeout=10)[0].decode(errors="replace")
    assert re.search(r' /tasks/oom \{"container_id":"oom1"', seen), seen
    assert_pods_gone(node)
