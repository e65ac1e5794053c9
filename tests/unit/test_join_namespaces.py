"""create_container's `join`: a container's init enters the uts, ipc or pid
namespace of another container's init (a pod's containers share its sandbox
container's). The schema, and the agent's logic on the host with a recording
fake of setns/unshare/mount; tests/integration/test_agent_join.py checks the
result inside a real guest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kata_py.protocol import messages
from kata_py.protocol.schema import SchemaError, validate
from tests.schema_check import assert_agrees_with_jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from kata_agent import container as container_mod  # noqa: E402
from kata_agent.processes import Process, ProcessError, ProcessTable  # noqa: E402
from kata_agent.spawn import StepFailed  # noqa: E402
from kata_agent.syscalls import CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS  # noqa: E402

ARGS_SCHEMA = messages.REQUESTS["create_container"][0]


def _args(**extra) -> dict:
    return {"container_id": "b", "mount_tag": "pod", "rootfs_path": "c2-rootfs", **extra}


# -- the schema ------------------------------------------------------------------------

@pytest.mark.parametrize("join", [{}, {"uts": "a"}, {"ipc": "pause-1"}, {"pid": "A.b+c_d-e"},
                                  {"uts": "a", "ipc": "a", "pid": "a"}, {"uts": "a", "ipc": "x"}])
def test_join_names_container_ids_by_namespace_type(join):
    validate(_args(join=join), ARGS_SCHEMA, "/args")
    messages.check_request({"id": 1, "type": "create_container", "args": _args(join=join)})


@pytest.mark.parametrize("join, path", [
    ({"net": "a"}, "/args/join"),           # the guest's network namespace is the VM's, always
    ({"mount": "a"}, "/args/join"),         # a container's mounts are its own
    ({"user": "a"}, "/args/join"),
    ({"cgroup": "a"}, "/args/join"),
    ({"uts": ""}, "/args/join/uts"),
    ({"uts": "../a"}, "/args/join/uts"),
    ({"ipc": "a\n"}, "/args/join/ipc"),     # \Z: no trailing newline sneaks in
    ({"ipc": "-a"}, "/args/join/ipc"),
    ({"pid": "/proc/1/ns/pid"}, "/args/join/pid"),  # an agent id, not a path
    ({"pid": "a" * 257}, "/args/join/pid"),
    ({"pid": 7}, "/args/join/pid"),
    ({"pid": None}, "/args/join/pid"),
])
def test_join_refuses_other_types_and_malformed_ids(join, path):
    with pytest.raises(SchemaError) as info:
        messages.check_request({"id": 1, "type": "create_container", "args": _args(join=join)})
    assert info.value.path == path


@pytest.mark.parametrize("join", [["uts"], "a", 1, True])
def test_join_is_an_object(join):
    with pytest.raises(SchemaError) as info:
        validate(_args(join=join), ARGS_SCHEMA, "/args")
    assert info.value.path == "/args/join"


def test_rootfs_path_is_one_entry_of_the_export():
    for entry in ("rootfs", "c1-rootfs", "c12", "pause.rootfs"):
        validate(_args(rootfs_path=entry), ARGS_SCHEMA, "/args")
    for entry in ("", "a/b", "../c1", "/c1", "c1\n", "x" * 256):
        with pytest.raises(SchemaError):
            validate(_args(rootfs_path=entry), ARGS_SCHEMA, "/args")


def test_the_join_schema_agrees_with_jsonschema():
    samples = [_args(join=j) for j in ({}, {"uts": "a"}, {"uts": "a", "ipc": "b", "pid": "c"}, {"net": "a"},
                                       {"uts": ""}, {"uts": "a\n"}, {"pid": 1}, [], "a", {"uts": "a" * 257})]
    assert_agrees_with_jsonschema(ARGS_SCHEMA, samples, "create_container join")


# -- the agent: what the schema cannot check --------------------------------------------

@pytest.mark.parametrize("spec, match", [
    (_args(namespaces=["mount", "uts"], join={"uts": "a"}), "uts namespace is both new and joined"),
    (_args(namespaces=["pid"], join={"pid": "a", "ipc": "a"}), "pid namespace is both new and joined"),
    (_args(join={"ipc": "b"}), "cannot join its own ipc namespace"),
    (_args(join={"uts": "a"}, sysctl=[{"key": "kernel.hostname", "value": "x"}]), "kernel.hostname"),
    (_args(join={"uts": "a"}, sysctl=[{"key": "kernel.domainname", "value": "x"}]), "kernel.domainname"),
])
def test_contradictory_joins_are_invalid(spec, match):
    with pytest.raises(ProcessError, match=match) as info:
        container_mod.validate_spec(spec)
    assert info.value.code == "invalid"


def test_ipc_sysctls_may_go_to_a_joined_ipc_namespace():
    container_mod.validate_spec(_args(join={"ipc": "a", "pid": "a"}, sysctl=[{"key": "kernel.shmmax", "value": "1"}]))


def test_a_joined_type_is_not_made_even_by_default(monkeypatch):
    monkeypatch.setattr(container_mod, "Cgroup", _Cgroup)
    joiner = container_mod.Container("b", "/share", {"join": {"uts": "a", "ipc": "a"}})
    assert joiner.namespaces == {"mount", "cgroup"}
    assert joiner.join == {"uts": "a", "ipc": "a"}
    plain = container_mod.Container("c", "/share", {})
    assert plain.namespaces == {"mount", "uts", "ipc", "cgroup"} and plain.join == {}


# -- the agent: finding the namespaces to join ---------------------------------------

class _Cgroup:
    def __init__(self, container_id):
        self.path = f"/sys/fs/cgroup/{container_id}"
        self.entered = False

    def create(self):
        pass

    def apply(self, resources):
        pass

    def enter(self):
        self.entered = True

    def kill_and_remove(self, timeout):
        return True

    def remove(self):
        pass


class _Sys:
    """Records setns/unshare/mount and friends; `fail_setns` makes setns fail."""

    def __init__(self, fail_setns: int = 0) -> None:
        self.calls = []
        self.fail_setns = fail_setns

    def mount(self, source, target, fstype, flags=0, data=""):
        if target.startswith("/proc/self/fd/"):
            target = os.readlink(target)    # a destination pinned by openat2 (open during the call)
        self.calls.append(("mount", target, fstype))

    def openat2(self, *args):
        from kata_agent.syscalls import Syscalls

        return Syscalls().openat2(*args)

    def umount(self, target, flags=0):
        self.calls.append(("umount", target))

    def setns(self, fd, nstype):
        if self.fail_setns:
            raise OSError(self.fail_setns, os.strerror(self.fail_setns))
        self.calls.append(("setns", fd, nstype))

    def unshare(self, flags):
        self.calls.append(("unshare", flags))

    def sethostname(self, name):
        self.calls.append(("sethostname", name))

    def setdomainname(self, name):
        self.calls.append(("setdomainname", name))

    def pivot_root(self, new_root, put_old):
        self.calls.append(("pivot_root",))

    def chroot(self, path):
        self.calls.append(("chroot", path))


@pytest.fixture
def containers(tmp_path, monkeypatch):
    monkeypatch.setattr(container_mod, "CONTAINERS_DIR", str(tmp_path / "containers"))
    monkeypatch.setattr(container_mod, "Cgroup", _Cgroup)
    return container_mod.Containers(_Sys())


@pytest.fixture
def own_uts_process():
    """A child in a uts and an ipc namespace of its own (as a pod's sandbox
    container's init), and the process table entry the agent has for it."""
    child = subprocess.Popen(["unshare", "--uts", "--ipc", "sleep", "60"])
    table = ProcessTable()
    proc = Process("a-init", ["sleep"], [], "/", False, [], 0, 0)
    proc.pid = child.pid
    table.by_pid[child.pid] = proc
    # unshare(1) execs sleep once its namespaces are made: wait for that.
    for _ in range(500):
        if os.readlink(f"/proc/{child.pid}/ns/uts") != os.readlink("/proc/self/ns/uts"):
            break
        os.sched_yield()
    yield table, proc, child
    child.kill()
    child.wait()


def _with_init(containers, container_id: str, proc) -> container_mod.Container:
    container = container_mod.Container(container_id, "/share", {})
    container.init_pid = proc.pid if proc is not None else None
    container.init_process = proc
    containers.by_id[container_id] = container
    return container


def test_joining_a_missing_container_is_not_found(containers):
    with pytest.raises(ProcessError, match="cannot join the uts namespace of container 'nope': no such") as info:
        containers.open_joined({"uts": "nope"}, lambda proc: pytest.fail("no pidfd without a container"))
    assert info.value.code == "not_found"


def test_joining_a_container_without_a_running_init_is_a_state_error(containers, own_uts_process):
    table, proc, child = own_uts_process
    _with_init(containers, "created", None)     # created, its init not yet started
    with pytest.raises(ProcessError, match="'created': it has no running init process") as info:
        containers.open_joined({"ipc": "created"}, table.pidfd)
    assert info.value.code == "state"
    # An init that has exited and was reaped: its pid may be anyone's by now.
    _with_init(containers, "a", proc)
    del table.by_pid[proc.pid]
    with pytest.raises(ProcessError, match="'a': it has no running init process") as info:
        containers.open_joined({"uts": "a"}, table.pidfd)
    assert info.value.code == "state"


def test_joining_a_container_in_the_agents_own_namespace_is_invalid(containers, own_uts_process):
    table, _, _ = own_uts_process
    here = subprocess.Popen(["sleep", "60"])    # in the test's (the "agent's") namespaces
    try:
        proc = Process("h-init", ["sleep"], [], "/", False, [], 0, 0)
        proc.pid = here.pid
        table.by_pid[here.pid] = proc
        _with_init(containers, "h", proc)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ProcessError, match="it has no pid namespace of its own") as info:
            containers.open_joined({"pid": "h"}, table.pidfd)
        assert info.value.code == "invalid"
        assert set(os.listdir("/proc/self/fd")) == before, "a pidfd was left open"
    finally:
        here.kill()
        here.wait()


def test_check_join_opens_and_closes_a_pidfd_per_namespace(containers, own_uts_process):
    table, proc, child = own_uts_process
    _with_init(containers, "a", proc)
    before = set(os.listdir("/proc/self/fd"))
    containers.check_join(_args(join={"uts": "a", "ipc": "a"}), table.pidfd)
    assert set(os.listdir("/proc/self/fd")) == before
    fds = containers.open_joined({"uts": "a", "ipc": "a"}, table.pidfd)
    try:
        assert sorted(fds) == ["ipc", "uts"]
        for fd in fds.values():
            with open(f"/proc/self/fdinfo/{fd}") as f:
                assert f"Pid:\t{child.pid}" in f.read()      # a pidfd of that init
    finally:
        for fd in fds.values():
            os.close(fd)


# -- the agent: the joiner's init set-up --------------------------------------------

@pytest.fixture
def rootfs(tmp_path, monkeypatch):
    root = tmp_path / "share" / "rootfs"
    root.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)     # setup() ends with chdir("/")
    monkeypatch.setattr(container_mod.mountlib, "make_devices", lambda root, devices: None)
    return root


def _joiner(rootfs, **spec) -> container_mod.Container:
    return container_mod.Container("b", str(rootfs.parent), {"rootfs_path": "rootfs", "hostname": "b-own",
                                                             "domainname": "b-dom", **spec})


def test_a_joiner_enters_before_it_unshares_and_keeps_the_pods_hostname(containers, rootfs):
    container = _joiner(rootfs, namespaces=["mount", "cgroup"], join={"uts": "a", "ipc": "a"})
    uts_fd, ipc_fd = os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_RDONLY)
    setup, cleanup, around_fork = containers.init_setup(container, {"uts": uts_fd, "ipc": ipc_fd})
    assert around_fork is None      # no pid namespace: neither made nor joined
    setup()
    calls = containers.sys.calls
    assert container.cgroup.entered
    assert calls[:3] == [("setns", ipc_fd, CLONE_NEWIPC), ("setns", uts_fd, CLONE_NEWUTS),
                         ("unshare", CLONE_NEWNS | CLONE_NEWCGROUP)]
    assert not [c for c in calls if c[0] in ("sethostname", "setdomainname")], calls
    cleanup()
    cleanup()   # called again by the handler after a launch that failed early: harmless
    for fd in (uts_fd, ipc_fd):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_container_that_joins_no_uts_namespace_sets_its_names(containers, rootfs):
    container = _joiner(rootfs, namespaces=["mount", "uts"], join={"ipc": "a"})
    ipc_fd = os.open("/dev/null", os.O_RDONLY)
    setup, cleanup, _ = containers.init_setup(container, {"ipc": ipc_fd})
    setup()
    cleanup()
    calls = containers.sys.calls
    assert calls[0] == ("setns", ipc_fd, CLONE_NEWIPC)
    assert calls[1] == ("unshare", CLONE_NEWNS | CLONE_NEWUTS)
    assert ("sethostname", "b-own") in calls and ("setdomainname", "b-dom") in calls


def test_a_failed_setns_names_the_namespace_and_container(containers, rootfs):
    container = _joiner(rootfs, namespaces=["mount"], join={"uts": "pause"})
    containers.sys.fail_setns = 3   # ESRCH: the init exited since the pidfd was taken
    fd = os.open("/dev/null", os.O_RDONLY)
    setup, cleanup, _ = containers.init_setup(container, {"uts": fd})
    with pytest.raises(StepFailed) as info:
        setup()
    cleanup()
    assert info.value.step == "join the uts namespace of container 'pause'" and info.value.errno == 3


def test_a_pid_joiner_is_forked_into_the_joined_pid_namespace(containers, rootfs):
    container = _joiner(rootfs, namespaces=["mount"], join={"pid": "a"})
    pid_fd = os.open("/dev/null", os.O_RDONLY)
    setup, cleanup, around_fork = containers.init_setup(container, {"pid": pid_fd})
    undo = around_fork()
    assert containers.sys.calls == [("setns", pid_fd, CLONE_NEWPID)]
    undo()
    assert containers.sys.calls[-1][2] == CLONE_NEWPID and containers.sys.calls[-1][1] != pid_fd
    setup()
    # Entered in the parent before fork, never in the child (which cannot change its own).
    assert [c for c in containers.sys.calls[2:] if c[0] == "setns"] == []
    cleanup()


def test_a_pid_namespace_that_cannot_be_joined_is_a_state_error(containers, rootfs):
    container = _joiner(rootfs, namespaces=["mount"], join={"pid": "a"})
    containers.sys.fail_setns = 3
    fd = os.open("/dev/null", os.O_RDONLY)
    _, cleanup, around_fork = containers.init_setup(container, {"pid": fd})
    with pytest.raises(ProcessError, match="cannot join the pid namespace of container 'a'") as info:
        around_fork()
    cleanup()
    assert info.value.code == "state"


def test_an_exec_in_a_pid_joiner_enters_the_joined_pid_namespace(containers, own_uts_process):
    _, _, child = own_uts_process
    container = container_mod.Container("b", "/share", {"namespaces": ["mount"], "join": {"pid": "a"}})
    container.init_pid = child.pid
    setup, cleanup, around_fork = containers.join_setup(container)
    try:
        assert around_fork is not None      # a joined pid namespace is the init's too
        around_fork()
        assert containers.sys.calls[0][2] == CLONE_NEWPID
    finally:
        cleanup()
