"""create_container's `join` in a real guest, driven on the agent directly: a
pod's containers in one VM, each with its own rootfs entry of one export,
share the uts, ipc and pid namespaces of the first (the pod's sandbox
container) as CRI asks, and a container that joins nothing shares none."""

from __future__ import annotations

import asyncio
import signal

import pytest

from kata_py.oci.busybox import DEFAULT_MOUNTS
from kata_py.sandbox.agent_client import AgentRequestError, open_stream
from kata_py.sandbox.sandbox import Share
from tests.bundles import make_rootfs

pytestmark = pytest.mark.vm

TAG = "pod"
NAMES = ("a", "b", "c", "d", "e", "x", "y")
OWN = ["cgroup", "ipc", "mount", "pid", "uts"]


@pytest.fixture(scope="module")
def pod(module_vms, tmp_path_factory):
    """One VM exporting one directory: an entry `<name>-rootfs` per container."""
    export = tmp_path_factory.mktemp("pod-export")
    for name in NAMES:
        make_rootfs(export / f"{name}-rootfs")
    return module_vms.start(memory_mib=256, shares=[Share(TAG, export)])


class Pod:
    def __init__(self, sandbox, loop_thread) -> None:
        self.sb = sandbox
        self.lt = loop_thread
        self.count = 0

    def request(self, request_type: str, args: dict, timeout: float = 120) -> dict:
        return self.lt.run(self.sb.agent.request(request_type, args, timeout=timeout))

    def create(self, name: str, hostname: str, namespaces: list[str], join: dict | None = None) -> None:
        args = {"container_id": name, "mount_tag": TAG, "rootfs_path": f"{name}-rootfs", "hostname": hostname,
                "namespaces": namespaces, "mounts": DEFAULT_MOUNTS}
        if join is not None:
            args["join"] = join
        self.request("create_container", args)

    def start_init(self, name: str, argv: list[str]) -> str:
        process_id = f"{name}-init"
        self.request("create_process", {"process_id": process_id, "argv": argv, "env": ["PATH=/bin"],
                                        "container_id": name, "init": True})
        self.request("start_process", {"process_id": process_id})
        return process_id

    def sh(self, name: str, command: str) -> str:
        """Run `sh -c command` in the container (an exec); its output, stderr too."""
        self.count += 1
        process_id = f"{name}-exec-{self.count}"

        async def go():
            agent = self.sb.agent
            await agent.request("create_process", {"process_id": process_id, "argv": ["sh", "-c", command + " 2>&1"],
                                                   "env": ["PATH=/bin"], "container_id": name,
                                                   "streams": ["stdout"]})
            reader, writer = await open_stream(self.sb.transport, process_id, "stdout")
            try:
                await agent.request("start_process", {"process_id": process_id})
                out = await asyncio.wait_for(reader.read(), 60)
                status = await agent.request("wait_process", {"process_id": process_id}, timeout=60)
            finally:
                writer.close()
            return out.decode(), status
        out, status = self.lt.run(go())
        assert status == {"exit_code": 0, "signal": None}, (name, command, status, out)
        return out.strip()

    def alive(self, process_id: str) -> bool:
        """Whether a process still runs: signal 0 reaches it (the agent
        answers `state` for one that has exited)."""
        try:
            self.request("signal_process", {"process_id": process_id, "signal": 0})
        except AgentRequestError as exc:
            assert exc.code == "state", exc
            return False
        return True


def _ns(p: Pod, name: str, kind: str) -> str:
    return p.sh(name, f"readlink /proc/self/ns/{kind}")


def test_a_pods_containers_share_its_uts_ipc_and_pid_namespaces(pod, loop_thread):
    p = Pod(pod, loop_thread)
    # A: the pod's sandbox container, with namespaces of its own.
    p.create("a", "pod-a", OWN)
    a_init = p.start_init("a", ["sleep", "1001"])
    # B joins all three; its own hostname is not set: the pod's wins.
    p.create("b", "b-own", ["cgroup", "mount"], join={"uts": "a", "ipc": "a", "pid": "a"})
    b_init = p.start_init("b", ["sleep", "1002"])
    # C joins nothing; D joins A's uts and ipc but has a pid namespace of its own.
    p.create("c", "c-own", OWN)
    c_init = p.start_init("c", ["sleep", "1003"])
    p.create("d", "d-own", ["cgroup", "mount", "pid"], join={"uts": "a", "ipc": "a"})
    d_init = p.start_init("d", ["sleep", "1004"])

    assert p.sh("a", "hostname") == "pod-a"
    assert p.sh("b", "hostname") == "pod-a"
    assert p.sh("d", "hostname") == "pod-a"
    assert p.sh("c", "hostname") == "c-own"

    ipc = {name: _ns(p, name, "ipc") for name in "abcd"}
    assert ipc["a"] == ipc["b"] == ipc["d"] != ipc["c"], ipc
    uts = {name: _ns(p, name, "uts") for name in "abcd"}
    assert uts["a"] == uts["b"] == uts["d"] != uts["c"], uts
    # An exec in B lands in the pid namespace B's init joined, as in A.
    pid = {name: _ns(p, name, "pid") for name in "abcd"}
    assert pid["a"] == pid["b"] and len({pid["a"], pid["c"], pid["d"]}) == 3, pid

    # B sees A's processes: A's init is pid 1 of the namespace they share.
    ps_b = p.sh("b", "ps -o pid,args")
    assert "sleep 1001" in ps_b and "sleep 1002" in ps_b, ps_b
    assert p.sh("b", "tr '\\000' ' ' < /proc/1/cmdline") == "sleep 1001"
    proc_b = p.sh("b", "ls /proc")
    assert "1" in proc_b.split(), proc_b
    # C and D see only their own.
    for name, own in (("c", "sleep 1003"), ("d", "sleep 1004")):
        ps = p.sh(name, "ps -o args")
        assert own in ps and "sleep 1001" not in ps and "sleep 1002" not in ps, (name, ps)
    # B's /dev/mqueue is a mount of the ipc namespace it shares: a queue A makes
    # there shows in B, and not in C.
    p.sh("a", "touch /dev/mqueue/from-a")
    assert p.sh("b", "ls /dev/mqueue") == "from-a"
    assert p.sh("c", "ls /dev/mqueue") == ""

    # A joiner that goes leaves the pod's namespaces as they were.
    p.request("delete_container", {"container_id": "b"})
    assert p.request("wait_process", {"process_id": b_init}) == {"exit_code": None, "signal": signal.SIGKILL}
    assert p.alive(a_init)
    assert p.sh("a", "hostname; tr '\\000' ' ' < /proc/1/cmdline") == "pod-a\nsleep 1001"
    assert _ns(p, "a", "ipc") == ipc["a"]

    # E joins the pid namespace too, just before A's init is killed.
    p.create("e", "e-own", ["cgroup", "mount"], join={"uts": "a", "ipc": "a", "pid": "a"})
    e_init = p.start_init("e", ["sleep", "1005"])
    p.request("signal_process", {"process_id": a_init, "signal": signal.SIGKILL})
    assert p.request("wait_process", {"process_id": a_init}) == {"exit_code": None, "signal": signal.SIGKILL}
    # The uts and ipc namespaces outlive the init that made them while a
    # process holds them: D keeps running in them.
    assert p.alive(d_init)
    assert p.sh("d", "hostname") == "pod-a"
    assert _ns(p, "d", "ipc") == ipc["a"] and _ns(p, "d", "uts") == uts["a"]
    assert p.sh("d", "ls /dev/mqueue") == "from-a"
    # A pid namespace does not: when its pid 1 exits the kernel kills every
    # process in it, E's init too (a pod that shares its process namespace
    # lives as long as its sandbox container's init, as under runc).
    assert p.request("wait_process", {"process_id": e_init}) == {"exit_code": None, "signal": signal.SIGKILL}
    # A container that exists but whose init has exited cannot be joined.
    with pytest.raises(AgentRequestError, match="container 'a': it has no running init process") as info:
        p.create("x", "x", ["mount"], join={"uts": "a"})
    assert info.value.code == "state"
    assert p.alive(c_init) and p.alive(d_init)

    for name in ("a", "c", "d", "e"):
        p.request("delete_container", {"container_id": name})


def test_joining_what_cannot_be_joined_fails_cleanly(pod, loop_thread):
    p = Pod(pod, loop_thread)
    with pytest.raises(AgentRequestError, match="container 'nope': no such container") as info:
        p.create("y", "y", ["mount"], join={"uts": "nope"})
    assert info.value.code == "not_found"
    # Nothing of y was made: the same id is created afterwards.
    p.create("y", "y", OWN)
    # A container whose init has not started has no namespaces to join yet.
    with pytest.raises(AgentRequestError, match="container 'y': it has no running init process") as info:
        p.create("x", "x", ["mount"], join={"ipc": "y"})
    assert info.value.code == "state"
    with pytest.raises(AgentRequestError, match="ipc namespace is both new and joined") as info:
        p.create("x", "x", ["ipc", "mount"], join={"ipc": "y"})
    assert info.value.code == "invalid"
    # A container without a pid namespace of its own: joining would mean the guest's.
    y_init = p.start_init("y", ["sleep", "1006"])
    p.create("x", "x", ["mount", "uts"])
    p.start_init("x", ["sleep", "1007"])
    with pytest.raises(AgentRequestError, match="it has no pid namespace of its own") as info:
        p.create("z", "z", ["mount"], join={"pid": "x"})
    assert info.value.code == "invalid"
    assert p.alive(y_init)
    for name in ("x", "y"):
        p.request("delete_container", {"container_id": name})
