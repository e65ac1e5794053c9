"""The agent's pre-forked process for a container's first process
(agent/kata_agent/zygote.py), on the host with the recording syscall double
of test_join_namespaces: it holds nothing of the agent's, it becomes the
container's process when it fits (same pid, the process's own argv, stdio,
barrier and seccomp filter), is used once, and anything that does not fit,
or a pre-forked process that is gone, forks as before.
tests/integration/test_agent_zygote.py checks it in a real guest."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.unit.test_join_namespaces import _Cgroup, _Sys, container_mod

from kata_agent import processes as processes_mod  # noqa: E402  (the agent's path is set by the import above)
from kata_agent import seccomp  # noqa: E402
from kata_agent.processes import ProcessTable  # noqa: E402
from kata_agent.syscalls import CLONE_NEWPID  # noqa: E402
from kata_agent.zygote import Zygote  # noqa: E402


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """(containers, table, zygote): a zygote armed as the agent arms it, in a
    thread of its own."""
    monkeypatch.setattr(container_mod, "CONTAINERS_DIR", str(tmp_path / "containers"))
    monkeypatch.setattr(container_mod, "Cgroup", _Cgroup)
    monkeypatch.setattr(container_mod.mountlib, "make_devices", lambda root, devices: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "share" / "rootfs").mkdir(parents=True)
    containers = container_mod.Containers(_Sys())
    zygote = Zygote(containers)
    arming = threading.Thread(target=zygote.arm)
    arming.start()
    arming.join()
    yield containers, ProcessTable(), zygote
    if zygote.pid is not None:
        pid = zygote.pid
        zygote.close()
        assert os.waitpid(pid, 0)[1] == 0      # it exits on end of file, having done nothing


def make_container(tmp_path, **spec) -> container_mod.Container:
    spec = {"rootfs_path": "rootfs", "namespaces": ["mount", "pid", "uts", "ipc", "cgroup"], **spec}
    container = container_mod.Container("c1", str(tmp_path / "share"), spec)
    container.mount_tag = "share"
    return container


def launch(table, zygote, container, argv, hold=False):
    """What the agent's handler does for a container's first process: returns
    (pid, what it printed on stdout, its exit status)."""
    proc = table.create("init", argv, ["PATH=/usr/bin:/bin"], "/", False, ["stdout"])
    proc.container_id, proc.init, proc.seccomp = container.id, True, container.seccomp
    ours, theirs = socket.socketpair()
    table.attach("init", "stdout", theirs)
    table._relay = lambda proc, target, args, out: threading.Thread(target=target, args=args, daemon=True).start()
    handover = lambda: zygote.take(container, proc)    # noqa: E731
    if hold:
        pid = table.prepare("init", handover=handover)
        table.start("init")
    else:
        pid = table.start("init", handover=handover)
    output = b""
    while chunk := ours.recv(4096):
        output += chunk
    return pid, output, os.waitpid(pid, 0)[1]


def test_the_pre_forked_process_holds_nothing_of_the_agent(agent):
    containers, _, zygote = agent
    assert containers.sys.calls == [("unshare", CLONE_NEWPID)]     # its pid namespace, made for it
    held = sorted(int(fd) for fd in os.listdir(f"/proc/{zygote.pid}/fd"))
    assert held[:3] == [0, 1, 2] and len(held) == 4, held           # stdio, and its end of the pair


@pytest.mark.parametrize("hold", [False, True])
def test_it_becomes_the_containers_first_process_once(agent, tmp_path, hold):
    containers, table, zygote = agent
    forked = zygote.pid
    container = make_container(tmp_path)
    pid, output, status = launch(table, zygote, container, ["sh", "-c", "echo ran as $$; exit 3"], hold)
    assert pid == forked
    assert output == f"ran as {forked}\n".encode()
    assert os.WEXITSTATUS(status) == 3
    assert zygote.pid is None and zygote.take(container, table.get("init")) is None   # used once


def test_the_program_it_execs_holds_only_its_stdio(agent, tmp_path):
    """Not the status pipe (the agent would wait for its end of file as long
    as the program runs), nor the barrier or the pair's end."""
    _, table, zygote = agent
    forked = zygote.pid
    pid, output, _ = launch(table, zygote, make_container(tmp_path), ["sh", "-c", "ls /proc/$$/fd | tr '\\n' ' '"],
                            hold=True)
    assert (pid, output) == (forked, b"0 1 2 ")


def test_its_recipe_carries_the_seccomp_filter(agent, tmp_path):
    containers, table, zygote = agent
    forked = zygote.pid
    container = make_container(tmp_path)
    container.seccomp = seccomp.build({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]})
    pid, output, _ = launch(table, zygote, container,
                            ["sh", "-c", f"mkdir {tmp_path}/made 2>/dev/null || echo refused"])
    assert (pid, output) == (forked, b"refused\n")
    assert not (tmp_path / "made").exists()


@pytest.mark.parametrize("spec", [{"join": {"pid": "pause"}}, {"namespaces": ["mount", "uts"]},
                                  {"namespaces": ["mount", "pid", "user"]}])
def test_what_does_not_fit_is_forked_and_the_zygote_kept(agent, tmp_path, spec):
    _, table, zygote = agent
    forked = zygote.pid
    assert zygote.take(make_container(tmp_path, **spec), None) is None
    assert zygote.pid == forked


def test_a_pre_forked_process_that_is_gone_falls_back_to_fork(agent, tmp_path, monkeypatch):
    _, table, zygote = agent
    forked = zygote.pid
    os.kill(forked, 9)
    os.waitpid(forked, 0)
    forks = []
    real_spawn = processes_mod.spawn

    def counting(*args, via=None, **options):
        forks.append(via is None)
        return real_spawn(*args, via=via, **options)
    monkeypatch.setattr(processes_mod, "spawn", counting)
    pid, output, status = launch(table, zygote, make_container(tmp_path), ["sh", "-c", "echo forked"])
    assert forks == [False, True]       # handed over first, then forked
    assert pid != forked and output == b"forked\n" and status == 0
    assert forked not in table.by_pid


def test_kata_py_guest_prefork_off_reaches_the_guest_kernels_command_line(monkeypatch):
    from kata_py.protocol.messages import PREFORK_PARAM
    from kata_py.sandbox.sandbox import Sandbox

    monkeypatch.setenv("KATA_PY_GUEST_PREFORK", "off")
    assert Sandbox(None, kernel_args=["x=1"]).kernel_args == ["x=1", f"{PREFORK_PARAM}=off"]
    monkeypatch.delenv("KATA_PY_GUEST_PREFORK")
    assert Sandbox(None, kernel_args=["x=1"]).kernel_args == ["x=1"]


def _wait_armed(zygote, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while zygote.pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return zygote.pid


def test_it_is_forked_again_once_no_container_is_left(agent, tmp_path):
    """A pooled VM's warm-up container uses the first one; the container the
    VM is claimed for gets the next."""
    containers, table, zygote = agent
    first = zygote.pid
    container = make_container(tmp_path)
    launch(table, zygote, container, ["true"])
    containers.by_id["c1"] = container
    zygote.rearm_when_idle()
    assert zygote.pid is None and not zygote._arming       # a container is left
    del containers.by_id["c1"]
    zygote.rearm_when_idle()
    second = _wait_armed(zygote)
    assert second not in (None, first)


def test_disabled_it_is_never_forked(tmp_path):
    zygote = Zygote(container_mod.Containers(_Sys()), enabled=False)
    zygote.arm_in_background()
    zygote.rearm_when_idle()
    assert zygote.pid is None and not zygote._arming
