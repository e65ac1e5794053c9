"""The agent's pre-forked process in a real guest (agent/kata_agent/zygote.py):
forked while the VM waits, it becomes the first container's process (its
pid is the one the agent reports, pid 1 of the container's pid namespace,
running the process asked for, with its stdio); the next container is
forked as before and works the same."""

from __future__ import annotations

import re
import time

import pytest

from tests.bundles import make_rootfs
from tests.integration.test_agent_join import OWN, TAG, Pod
from kata_py.sandbox.sandbox import Share

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm(module_vms, tmp_path_factory):
    export = tmp_path_factory.mktemp("zygote-export")
    for name in ("a", "b"):
        make_rootfs(export / f"{name}-rootfs")
    return module_vms.start(memory_mib=256, shares=[Share(TAG, export)])


def _console_pids(sandbox, pattern: str, at_least: int = 1) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        found = [int(pid) for pid in re.findall(pattern, sandbox.console_log.read_text(errors="replace"))]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_the_first_containers_process_is_the_pre_forked_one(vm, loop_thread):
    p = Pod(vm, loop_thread)
    [forked] = _console_pids(vm, r"pre-forked pid (\d+) for a container's first process")
    p.create("a", "zygote-a", OWN)
    p.request("create_process", {"process_id": "a-init", "argv": ["sleep", "1001"], "env": ["PATH=/bin"],
                                 "container_id": "a", "init": True})
    assert p.request("start_process", {"process_id": "a-init"})["pid"] == forked
    assert _console_pids(vm, r"container a: its first process is the pre-forked pid (\d+)") == [forked]
    # It is what it was asked to be, pid 1 of the container's own pid namespace.
    assert p.sh("a", "cat /proc/1/cmdline | tr '\\0' ' '") == "sleep 1001"
    assert p.sh("a", "hostname") == "zygote-a"
    # The next container's process is forked: another pid, and it works the same.
    p.create("b", "zygote-b", OWN)
    p.request("create_process", {"process_id": "b-init", "argv": ["sleep", "1002"], "env": ["PATH=/bin"],
                                 "container_id": "b", "init": True})
    assert p.request("start_process", {"process_id": "b-init"})["pid"] != forked
    assert p.sh("b", "cat /proc/1/cmdline | tr '\\0' ' '") == "sleep 1002"
    assert p.sh("a", "readlink /proc/self/ns/pid") != p.sh("b", "readlink /proc/self/ns/pid")
    assert "container b: its first process is the pre-forked" not in vm.console_log.read_text(errors="replace")
    for name in ("a", "b"):
        p.request("signal_process", {"process_id": f"{name}-init", "signal": 9})
        p.request("wait_process", {"process_id": f"{name}-init"}, timeout=60)
        p.request("delete_container", {"container_id": name})
    # No container left (as a pooled VM after its warm-up container): forked
    # again, for the next container.
    again = _console_pids(vm, r"pre-forked pid (\d+) for a container's first process", at_least=2)[1:]
    assert len(again) == 1 and again[0] != forked, again
    p.create("a", "zygote-a2", OWN)
    p.request("create_process", {"process_id": "a2-init", "argv": ["sleep", "1003"], "env": ["PATH=/bin"],
                                 "container_id": "a", "init": True})
    assert p.request("start_process", {"process_id": "a2-init"})["pid"] == again[0]
    assert p.sh("a", "cat /proc/1/cmdline | tr '\\0' ' '") == "sleep 1003"


def test_with_prefork_off_the_agent_forks_at_create(module_vms, tmp_path, loop_thread):
    """`kata_agent.prefork=off` (what KATA_PY_GUEST_PREFORK=off puts on the
    kernel's command line): nothing forked ahead, and the container runs."""
    from kata_py.protocol.messages import PREFORK_PARAM

    make_rootfs(tmp_path / "a-rootfs")
    sandbox = module_vms.start(memory_mib=256, shares=[Share(TAG, tmp_path)], kernel_args=[f"{PREFORK_PARAM}=off"])
    p = Pod(sandbox, loop_thread)
    p.create("a", "noprefork", OWN)
    p.request("create_process", {"process_id": "a-init", "argv": ["sleep", "1001"], "env": ["PATH=/bin"],
                                 "container_id": "a", "init": True})
    p.request("start_process", {"process_id": "a-init"})
    assert p.sh("a", "cat /proc/1/cmdline | tr '\\0' ' '") == "sleep 1001"
    console = sandbox.console_log.read_text(errors="replace")
    assert "listening on vsock port" in console and "pre-forked" not in console, console
