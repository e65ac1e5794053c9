"""A pooled VM's warm-up container (factory/warmup.py) and the agent's
delete_container: after it, the guest holds nothing of the container (no
process, cgroup, mount, directory), the same id can be created again, and the
standby's share holds only the empty `rootfs` entry the next container gets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from kata_py.errors import KataError
from kata_py.factory.warmup import CONTAINER_ID, ENTRY, warm_up
from kata_py.sandbox.process import run_process
from kata_py.sandbox.sandbox import Share

pytestmark = pytest.mark.vm

# What a container leaves in the guest while it exists, read in the agent's own
# namespaces: its share mount, its cgroup, its directory, its processes.
TRACES = ("grep -c ' /run/kata/containers/' /proc/mounts; ls /sys/fs/cgroup; "
          "ls -A /run/kata/containers 2>/dev/null; echo ps:; ps -o args")


def guest_output(loop_thread, sandbox, command: str) -> str:
    r, w = os.pipe()
    status = loop_thread.run(run_process(sandbox, ["sh", "-c", command], stdin_fd=None, stdout_fd=w,
                                         stderr_fd=w))
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    return out if status == 0 else f"exit {status}: {out}"


@pytest.fixture
def shared(vms):
    directory = Path(tempfile.mkdtemp(prefix="kata-py-warmup-"))
    (directory / "rootfs").mkdir()
    sandbox = vms.start(shares=[Share("rootfs", directory)])
    yield sandbox, directory
    for entry in directory.iterdir():
        entry.rmdir()
    directory.rmdir()


def test_warm_up_leaves_nothing_and_can_run_again(shared, loop_thread):
    sandbox, directory = shared
    before = guest_output(loop_thread, sandbox, TRACES)
    for _ in range(2):  # a second run proves the id, cgroup and mount point were released
        loop_thread.run(warm_up(sandbox, directory), timeout=120)
        after = guest_output(loop_thread, sandbox, TRACES)
        assert CONTAINER_ID not in after and "sleep 600" not in after, after
        # No share mount, cgroup or container directory: the same as before.
        assert after.split("ps:")[0] == before.split("ps:")[0], (before, after)
        assert sorted(p.name for p in directory.iterdir()) == ["rootfs"]
    assert not (directory / ENTRY).exists()


def test_delete_of_an_unknown_container_is_an_error(vms):
    sandbox = vms.start()
    with pytest.raises(KataError, match="no container"):
        vms.lt.run(sandbox.agent.request("delete_container", {"container_id": "nope"}))
