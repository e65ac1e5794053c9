"""Docker (Debian's docker.io 20.10, a private dockerd: tests/docker_node.py)
drives kata-py registered by contrib/docker/daemon.json as shipped. dockerd
hands kata-py to containerd's runc shim (io.containerd.runc.v2) as its binary.

The kernel test runs the plain documented command (Docker's default bridge
network); the port test checks that network. The others pass `--network none`
so that each checks one thing."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LOGS
from tests.docker_node import DAEMON_JSON, IMAGE, DockerNode
from tests.engines import image_tar, leftover_processes
from tests.terminal import drive_tty
from tests.network_helpers import link_names

pytestmark = pytest.mark.vm

RUN = ("run", "--runtime=kata-py")


@pytest.fixture(scope="module")
def docker(request, tmp_path_factory):
    failed_before = request.session.testsfailed
    node = DockerNode()
    try:
        node.import_image(image_tar(tmp_path_factory.mktemp("docker-image")))
        yield node
    finally:
        if request.session.testsfailed > failed_before:
            node.keep_logs(LOGS / "test_docker")
        forced = node.stop()
    # Whatever the tests did, stopping the daemon left nothing behind and did
    # not have to force anything (a shim or a monitor that outlived dockerd).
    assert forced == []
    assert leftover_processes() == []
    assert node.mounts() == [] and not node.directory.exists()
    assert not Path(node.netns_path).exists()


@pytest.fixture(autouse=True)
def marked(docker):
    # explain() in an assertion reports what the daemon and kata-py said during this test.
    docker.mark()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return value


def test_daemon_network_stays_in_its_namespace(docker):
    # docker0 and Docker's NAT chain exist in the node's namespace, and the
    # host's links are as they were before the daemon started.
    assert "docker0" in link_names(docker.netns)
    assert docker.in_netns("iptables", "-t", "nat", "-S", "DOCKER").returncode == 0
    assert ("docker0" in link_names(None)) == docker.host_had_docker0


def test_contrib_daemon_json_registers_the_runtime(docker):
    """The daemon runs on the shipped snippet alone, and reads it as intended."""
    assert json.loads(DAEMON_JSON.read_text()) == {"runtimes": {"kata-py": {"path": "/usr/local/bin/kata-py"}}}
    info = docker("info", "--format", "{{json .Runtimes}}")
    assert info.returncode == 0, docker.explain(info)
    assert json.loads(info.stdout)["kata-py"]["path"] == "/usr/local/bin/kata-py"


def test_run_prints_the_guest_kernel(docker, image):
    result = docker(*RUN, "--rm", IMAGE, "uname", "-r")
    assert result.returncode == 0, docker.explain(result)
    assert result.stdout.decode().strip() == image.kernel_release != os.uname().release


@pytest.mark.parametrize("code", [0, 7, 137])
def test_exit_codes_propagate(docker, code):
    # A pid namespace's init ignores SIGKILL sent from inside it (as under
    # runc), so a child of it dies of the signal and the init passes it on.
    script = "sh -c 'kill -9 $$'; exit $?" if code == 137 else f"exit {code}"
    result = docker(*RUN, "--rm", "--network", "none", IMAGE, "sh", "-c", script)
    assert result.returncode == code, docker.explain(result)
    assert docker("ps", "--all", "--quiet").stdout.strip() == b""


def test_detached_logs_exec_stop_rm_leave_nothing(docker):
    mounts_before = sorted(docker.mounts())
    result = docker(*RUN, "-d", "--name", "kp-bg", "--network", "none", IMAGE, "sh", "-c",
                    # `sleep & wait`: the trap runs at once on TERM, not after the sleep.
                    "trap 'echo got-term; exit 0' TERM; echo started; sleep 1000 & wait")
    assert result.returncode == 0, docker.explain(result)
    container_id = result.stdout.decode().strip()
    try:
        wait_for(lambda: b"started" in docker("logs", "kp-bg").stdout, 60, "the container's first output")
        execed = docker("exec", "kp-bg", "sh", "-c", "echo via-exec; exit 3")
        assert (execed.returncode, execed.stdout) == (3, b"via-exec\n"), docker.explain(execed)

        # Where Docker keeps kata-py's state: the --root it gave the runtime.
        root = docker.runtime_root(container_id)
        assert (root / container_id).is_dir(), sorted(root.iterdir())
        # The daemon's environment reached kata-py: the session's checks see this container.
        assert leftover_processes() != []

        started = time.monotonic()
        stopped = docker("stop", "--time", "30", "kp-bg")
        assert stopped.returncode == 0, docker.explain(stopped)
        assert time.monotonic() - started < 30, "TERM did not reach the container (stop fell back to KILL)"
        assert b"got-term" in docker("logs", "kp-bg").stdout
        assert docker("inspect", "--format", "{{.State.ExitCode}}", "kp-bg").stdout.strip() == b"0"
        removed = docker("rm", "kp-bg")
        assert removed.returncode == 0, docker.explain(removed)
    finally:
        docker("rm", "--force", "kp-bg")
    # Once the init exits, the shim runs `kill --all <id> 9` on the stopped
    # container (its pid namespace's strays), which runc answers with success.
    assert "failed to kill init's children" not in docker.explain(), docker.explain()
    assert not (root / container_id).exists(), sorted(root.iterdir())
    assert docker.monitors(container_id) == {}
    assert leftover_processes() == []
    assert sorted(docker.mounts()) == mounts_before
    assert [m for m in docker.mounts() if container_id in m] == []


def test_stop_kills_a_container_that_ignores_term(docker):
    # sleep as PID 1 of its pid namespace has no TERM handler: the kernel
    # drops the signal, and stop must end it with KILL after the timeout.
    result = docker(*RUN, "-d", "--name", "kp-stubborn", "--network", "none", IMAGE, "sleep", "1000")
    assert result.returncode == 0, docker.explain(result)
    container_id = result.stdout.decode().strip()
    try:
        stopped = docker("stop", "--time", "1", "kp-stubborn")
        assert stopped.returncode == 0, docker.explain(stopped)
        state = docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "kp-stubborn")
        assert state.stdout.decode().split() == ["exited", "137"], docker.explain(state)
        removed = docker("rm", "kp-stubborn")
        assert removed.returncode == 0, docker.explain(removed)
    finally:
        docker("rm", "--force", "kp-stubborn")
    assert docker.monitors(container_id) == {}
    assert leftover_processes() == []


def _stdio_of(pids) -> str:
    out = []
    for pid in pids:
        links = []
        for fd in (0, 1, 2):
            try:
                links.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
            except OSError:
                pass
        out.append(f"{pid}: {' '.join(links)}")
    return "; ".join(out)


# An interactive shell: the terminal is a real one with the client's size,
# input reaches it, and its exit status comes back.
SHELL_SESSION = [
    (b"", b"# "),
    (b"tty; test -t 0 && echo stdin-is-a-tty\r", b"stdin-is-a-tty"),
    (b"stty size\r", b"33 97"),
    (b"echo $((6*7))-computed\r", b"42-computed"),
    (b"exit 5\r", b"exit 5"),
]


def drive_or_explain(docker, argv: list[str], container: str) -> tuple[int, bytes]:
    try:
        return drive_tty(argv, SHELL_SESSION, env=docker.env, rows=33, cols=97)
    except TimeoutError as exc:
        # Say where it hung before the container is cleared away. No docker
        # command first: while the shim waits on kata-py's create (or exec),
        # dockerd holds the container's lock and `docker inspect` waits too.
        # A monitor whose stdout is still a pipe holds the one go-runc reads
        # the runtime's output from until EOF, so the runtime call never
        # returns to the shim.
        monitors = docker.monitors()
        stdio = _stdio_of(monitors)
        killed = docker.kill_monitors()
        docker("rm", "--force", container, timeout=120)
        pytest.fail(f"{exc}\nkata-py monitors' stdio: {stdio}\nkilled to clear it: {killed}\n"
                    + docker.explain())


def test_run_interactive_through_a_pty(docker):
    argv = docker.argv(*RUN, "--rm", "-it", "--name", "kp-tty", "--network", "none", IMAGE, "sh")
    status, seen = drive_or_explain(docker, argv, "kp-tty")
    assert status == 5, seen
    assert b"/dev/pts/" in seen, seen
    assert docker("ps", "--all", "--quiet").stdout.strip() == b""
    assert leftover_processes() == []


def test_exec_interactive_through_a_pty(docker):
    result = docker(*RUN, "-d", "--name", "kp-exec-tty", "--network", "none", IMAGE, "sleep", "1000")
    assert result.returncode == 0, docker.explain(result)
    try:
        status, seen = drive_or_explain(docker, docker.argv("exec", "-it", "kp-exec-tty", "sh"), "kp-exec-tty")
        assert status == 5, seen
        assert b"/dev/pts/" in seen, seen
    finally:
        removed = docker("rm", "--force", "kp-exec-tty")
    assert removed.returncode == 0, docker.explain(removed)
    assert leftover_processes() == []


def test_memory_and_cpus_reach_the_guest_cgroup(docker):
    result = docker(*RUN, "--rm", "--network", "none", "--memory", "256m", "--cpus", "1", IMAGE,
                    "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max")
    assert result.returncode == 0, docker.explain(result)
    assert result.stdout.decode().splitlines() == [str(256 << 20), "100000 100000"]


FETCH = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=10) as reply:
            sys.stdout.write(reply.read().decode())
            break
    except OSError as exc:   # not listening yet, or the guest still booting
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]}: {exc}")
        time.sleep(0.5)
"""


def test_published_port_reaches_httpd_in_the_guest(docker, image):
    links_before = link_names(docker.netns)
    result = docker(*RUN, "-d", "--name", "kp-web", "-p", "18080:8080", IMAGE, "sh", "-c",
                    "mkdir -p /www && uname -r > /www/index.html && exec httpd -f -p 8080 -h /www")
    assert result.returncode == 0, docker.explain(result)
    container_id = result.stdout.decode().strip()
    try:
        # From the node (its namespace), through Docker's published port:
        # docker-proxy / NAT, docker0, the container's veth, and the VM's NIC.
        fetched = docker.in_netns(sys.executable, "-c", FETCH, "http://127.0.0.1:18080/", 90)
        assert fetched.returncode == 0, fetched.stderr.decode() + "\n" + docker.explain()
        # Served by the guest kernel's container, not by anything on the host.
        assert fetched.stdout.decode().strip() == image.kernel_release != os.uname().release
        address = docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", "kp-web").stdout.decode().strip()
        assert address, "Docker gave the container no address"
        shown = docker("exec", "kp-web", "ip", "-o", "-4", "addr", "show", "eth0")
        assert f"inet {address}/" in shown.stdout.decode(), docker.explain(shown)
        # The monitor (the container's pid) lives in the namespace libnetwork set up.
        pid = docker("inspect", "--format", "{{.State.Pid}}", "kp-web").stdout.decode().strip()
        assert int(pid) in docker.monitors(container_id)
        assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat(docker.netns_path).st_ino
    finally:
        removed = docker("rm", "--force", "kp-web")
    assert removed.returncode == 0, docker.explain(removed)
    assert docker.monitors(container_id) == {}
    # The node's namespace has what it had: the veth went with the container.
    assert link_names(docker.netns) == links_before
