"""containerd 1.6's CRI drives kata-py as kubelet would: gRPC on containerd's
socket (`cri_api`), the `kata-py` runtime handler from contrib/containerd/
config.toml as shipped, a bridge CNI network. containerd runs in a private
"node" network namespace (tests/cri_node.py); nothing touches the host's."""

import os
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from tests.conftest import LOGS, RUN_DIR
from tests.cri_node import (CONTRIB_CONFIG, GATEWAY, HANDLER, NETNS_DIR, PAUSE_IMAGE, RUNC_ROOT, SUBNET, TAP_PREFIX,
                            Node, cni_namespaces, described, links_in, mounts_under, processes_where, running_node,
                            wait_for)
from tests.engines import IMAGE, kata_binary, leftover_processes

pytestmark = pytest.mark.vm

EXITED = 2          # cri_api.v1.api_pb2.CONTAINER_EXITED
RUNNING = 1         # cri_api.v1.api_pb2.CONTAINER_RUNNING
POD_READY = 0       # cri_api.v1.api_pb2.SANDBOX_READY
EXIT_DETECTION_LIMIT = 10.0     # containerd retries a failed exit handling with a back-off from 1 s up
EXIT_DETECTION_TARGET = 2.0


def run_dir_entries() -> set[str]:
    found = set()
    if RUN_DIR.is_dir():
        for dirpath, dirnames, filenames in os.walk(RUN_DIR):
            found.update(os.path.join(dirpath, name) for name in dirnames + filenames)
    return found


def shims_of(node: Node) -> list[str]:
    needle = str(node.socket).encode()
    return described(processes_where(lambda _, argv: argv[0].endswith(b"containerd-shim-runc-v2")
                                     and needle in argv))


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


@pytest.fixture(scope="module")
def node(image):
    with running_node() as made:
        yield made
    assert shims_of(made) == []
    assert not made.directory.exists()


@pytest.fixture
def cri(request, node):
    """The node, with every pod a test made removed afterwards; a failed test
    keeps containerd's log and kata-py's JSON logs under tests/logs/<test>/."""
    yield node
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        keep = LOGS / request.node.name
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        shutil.copy(node.log_path, keep / "containerd.log")
        tasks = node.directory / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
        for log in tasks.glob("*/log.json"):
            shutil.copy(log, keep / f"kata-py-{log.parent.name[:12]}.json")
    problems = node.remove_everything()
    if problems:
        # So that the next test starts with no VM of this one left.
        node.force_remove()
    assert problems == [], "\n".join(problems) + explain(node)


def explain(node: Node) -> str:
    return "\ncontainerd's errors:\n" + node.log_tail(30, only_errors=True)


def test_node_runs_the_shipped_handler(node):
    dump = node.config_dump()
    assert f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]' in dump
    assert 'BinaryName = "/usr/local/bin/kata-py"' in dump
    assert f'sandbox_image = "{PAUSE_IMAGE}"' in dump
    assert 'bin_dir = "/usr/lib/cni"' in dump and f'conf_dir = "{node.directory / "cni"}"' in dump
    assert 'BinaryName = "/usr/local/bin/kata-py"' in CONTRIB_CONFIG.read_text()
    # The handler runs this tree's kata-py.
    assert os.path.realpath("/usr/local/bin/kata-py") == os.path.realpath(kata_binary())
    # containerd (and so CNI and the shims) live in the node's namespace, not the host's.
    assert netns_inode(f"/proc/{node.proc.pid}/ns/net") == netns_inode(str(NETNS_DIR / node.netns))
    assert netns_inode(f"/proc/{node.proc.pid}/ns/net") != netns_inode("/proc/self/ns/net")
    assert node.image_present(IMAGE) and node.image_present(PAUSE_IMAGE)


def exited(node: Node, container_id: str, timeout: float):
    def poll():
        status = node.container_status(container_id)
        return status if status.state == EXITED else None
    try:
        return wait_for(poll, timeout, what="CONTAINER_EXITED")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last status {node.container_status(container_id)}" + explain(node)) from None


def test_container_exit_code_is_seen_promptly(cri, record_property):
    pod_id, pod_config = cri.run_pod("exit3")
    assert cri.pod_status(pod_id).status.state == POD_READY
    container_id = cri.create_container(pod_id, pod_config, "exit3", ["sh", "-c", "echo bye; exit 3"])
    cri.start_container(container_id)
    started = time.monotonic()
    status = exited(cri, container_id, 20)
    detected = time.monotonic() - started
    record_property("exit_detection_s", round(detected, 3))
    print(f"exit detected {detected:.2f} s after StartContainer returned (target {EXIT_DETECTION_TARGET} s)")
    assert status.exit_code == 3, status
    assert status.finished_at >= status.started_at > 0
    assert detected < EXIT_DETECTION_LIMIT, f"{detected:.2f} s" + explain(cri)
    # Its stdout reached the pod's log in the CRI's format: "<time> stdout F bye".
    log = (cri.pods_dir / "exit3" / "exit3.log").read_text().split()
    assert log[1:] == ["stdout", "F", "bye"], log


def test_stop_and_remove_leave_nothing(cri):
    netns_before = cni_namespaces()
    files_before = run_dir_entries()
    mounts_before = set(mounts_under([cri.directory, RUN_DIR]))
    ports_before = set(cri.bridge_ports())
    wait_for(lambda: leftover_processes() == [], 30, 0.2, "earlier tests' VMs to go")

    pod_id, pod_config = cri.run_pod("long")
    pod_netns = cri.pod_netns_path(pod_id)
    assert pod_netns and os.path.exists(pod_netns), cri.pod_info(pod_id)
    # A pid namespace's init has no default action for SIGTERM: the trap is what ends it.
    container_id = cri.create_container(pod_id, pod_config, "long",
                                        ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait $!"])
    cri.start_container(container_id)
    assert cri.container_status(container_id).state == RUNNING
    # What is looked for afterwards is there while the pod runs.
    assert cri.runc_root_entries([pod_id, container_id]) == [str(RUNC_ROOT / pod_id), str(RUNC_ROOT / container_id)]
    assert len(leftover_processes()) >= 2 and shims_of(cri) != []
    assert set(mounts_under([cri.directory, RUN_DIR])) - mounts_before != set()
    assert run_dir_entries() - files_before != set()
    assert len(set(cri.bridge_ports()) - ports_before) == 1
    assert cri.our_cni_namespaces(netns_before) == [os.path.basename(pod_netns)]

    before_stop = time.monotonic()
    cri.stop_container(container_id, timeout=10)
    stop_took = time.monotonic() - before_stop
    status = cri.container_status(container_id)
    assert status.state == EXITED, status
    # Exit 0 from the trap: SIGTERM reached the workload, not the SIGKILL after the grace period.
    assert status.exit_code == 0, (status, stop_took)
    cri.stop_pod(pod_id)
    cri.remove_container(container_id)
    cri.remove_pod(pod_id)

    wait_for(lambda: leftover_processes() == [] and shims_of(cri) == [], 30, 0.2,
             "the monitors, QEMUs and shims to exit")
    assert leftover_processes() == []
    assert shims_of(cri) == []
    assert set(mounts_under([cri.directory, RUN_DIR])) - mounts_before == set()
    assert not os.path.exists(pod_netns)
    assert cri.our_cni_namespaces(netns_before) == []
    assert cri.taps() == [] and set(cri.bridge_ports()) - ports_before == set()
    assert cri.runc_root_entries([pod_id, container_id]) == []
    assert run_dir_entries() - files_before == set()


def test_pod_ip_answers_from_the_node(cri, image):
    pod_id, pod_config = cri.run_pod("web")
    pod_ip = cri.pod_status(pod_id).status.network.ip
    assert pod_ip.startswith(SUBNET.rsplit(".", 1)[0] + ".") and pod_ip != GATEWAY, pod_ip
    # The sandbox's pid (kata-py's monitor) is in the pod's namespace, so the
    # workloads, whose specs name /proc/<that pid>/ns/net, get the pod's network.
    info = cri.pod_info(pod_id)
    assert netns_inode(f"/proc/{info['pid']}/ns/net") == netns_inode(cri.pod_netns_path(pod_id))
    container_id = cri.create_container(
        pod_id, pod_config, "web",
        ["sh", "-c", "mkdir -p /www && uname -r > /www/index.html && exec httpd -f -p 8080 -h /www"])
    cri.start_container(container_id)
    # The tap goes in the pod's namespace, next to its veth; the node's holds none.
    assert [n for n in links_in(cri.pod_netns_path(pod_id)) if n.startswith(TAP_PREFIX)] == ["kp-tap0"]
    assert cri.taps() == []

    # Fetched from inside the node's namespace, as kubelet's probes would.
    fetch = ("import sys, urllib.request\n"
             "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n")
    deadline = time.monotonic() + 60
    while True:
        fetched = subprocess.run(["nsenter", f"--net={NETNS_DIR / cri.netns}", sys.executable, "-c", fetch,
                                  f"http://{pod_ip}:8080/"], capture_output=True, timeout=30)
        if fetched.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert fetched.returncode == 0, fetched.stderr.decode()[-500:] + explain(cri)
    # Served by the guest kernel's container, through the node's bridge.
    assert fetched.stdout.decode().strip() == image.kernel_release != os.uname().release

    # One namespace is carried by one VM: a second workload container is
    # refused, with kata-py's reason in the error kubelet would get.
    second = cri.create_container(pod_id, pod_config, "second", ["sleep", "1000"])
    with pytest.raises(grpc.RpcError) as refused:
        cri.start_container(second)
    assert "carried by another kata-py VM already" in refused.value.details(), refused.value.details()
