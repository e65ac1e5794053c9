"""The OCI CLI with a spec that names `linux.cgroupsPath`: the sandbox's host
processes (QEMU, its vsock back end, the owner) live in that cgroup, with the
spec's memory limit plus the VM's overhead, as Kata's sandbox_cgroup_only;
after delete, what kata-py made of it is gone and a parent that was there
before stays, also when the owner was SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from kata_py.oci.share import sandbox_dir_for
from kata_py.vmm import host_cgroup
from tests.bundles import make_bundle
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import assert_nothing_left, cli, cmdline

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]

ROOT = Path("/sys/fs/cgroup")
UNIFIED = (ROOT / "cgroup.controllers").exists()
LIMIT = 64 << 20
# v1: the hierarchies kata-py puts the sandbox in (cpu and cpuacct where mounted).
HIERARCHIES = [ROOT] if UNIFIED else [ROOT / c for c in ("memory", "pids", "cpu", "cpuacct")
                                      if (ROOT / c / "cgroup.procs").exists()]
MEMORY = ROOT if UNIFIED else ROOT / "memory"


@pytest.fixture
def parent():
    """/kpt-cg-<pid>: made beforehand in the memory hierarchy only (a parent
    that exists, like a pod's), so that kata-py makes it in the others."""
    name = f"kpt-cg-{os.getpid()}"
    (MEMORY / name).mkdir()
    yield name
    for hierarchy in HIERARCHIES:
        for path in (hierarchy / name / "c1", hierarchy / name):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass


def bundle_for(tmp_path: Path, parent: str) -> Path:
    return make_bundle(tmp_path / "bundle", ["sh", "-c", "while :; do sleep 1; done"],
                       linux={"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
                              "cgroupsPath": f"/{parent}/c1", "resources": {"memory": {"limit": LIMIT}}})


def cgroup_of(pid: int, hierarchy: Path) -> str:
    """The process's cgroup in one hierarchy, from /proc/PID/cgroup."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (UNIFIED and controllers == "") or (not UNIFIED and hierarchy.name in controllers.split(",")):
            return path
    raise AssertionError(f"{pid} is in no {hierarchy} cgroup")


def qemu_of(root: Path, container_id: str) -> int:
    run_dir = str(sandbox_dir_for(str(root), container_id)).encode()
    pids = [pid for pid in qemu_processes_under(RUN_DIR) if run_dir in cmdline(pid)]
    assert len(pids) == 1, pids
    return pids[0]


def expected_memory(qemu: int) -> int:
    argv = cmdline(qemu).split(b"\0")
    accel = argv[argv.index(b"-accel") + 1].decode().split(",")[0]
    return LIMIT + ((host_cgroup.OVERHEAD_MIB[accel] + host_cgroup.RUNTIME_MIB) << 20)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def assert_kata_py_made_nothing_left(parent: str) -> None:
    for hierarchy in HIERARCHIES:
        assert not (hierarchy / parent / "c1").exists(), hierarchy
        if hierarchy != MEMORY:
            assert not (hierarchy / parent).exists(), f"{hierarchy / parent}: made by kata-py, not removed"
    assert (MEMORY / parent).is_dir(), "a parent that existed before was removed"


def test_the_sandbox_lives_in_the_specs_cgroup_with_its_limit(tmp_path, parent):
    root = tmp_path / "root"
    result = cli(root, "create", "--bundle", bundle_for(tmp_path, parent), "c1", io=tmp_path / "io")
    assert result.returncode == 0, result.stderr
    owner = json.loads(cli(root, "state", "c1").stdout)["pid"]
    assert cli(root, "start", "c1").returncode == 0
    qemu = qemu_of(root, "c1")
    for hierarchy in HIERARCHIES:
        assert cgroup_of(qemu, hierarchy) == f"/{parent}/c1", hierarchy
        assert cgroup_of(owner, hierarchy) == f"/{parent}/c1", hierarchy
    backends = [pid for pid in children(owner) if b"kata_py.vsock" in cmdline(pid)]
    for backend in backends:        # none with the kernel's vhost-vsock
        assert cgroup_of(backend, MEMORY) == f"/{parent}/c1"
    limit_file = "memory.max" if UNIFIED else "memory.limit_in_bytes"
    assert int((MEMORY / parent / "c1" / limit_file).read_text()) == expected_memory(qemu)
    pids_dir = ROOT if UNIFIED else ROOT / "pids"
    assert (pids_dir / parent / "c1" / "pids.max").read_text().strip() == str(host_cgroup.PIDS_MAX)

    assert cli(root, "delete", "--force", "c1").returncode == 0
    assert_kata_py_made_nothing_left(parent)
    assert_nothing_left(root)


def test_after_a_killed_owner_delete_removes_what_kata_py_made(tmp_path, parent):
    root = tmp_path / "root"
    result = cli(root, "create", "--bundle", bundle_for(tmp_path, parent), "c1", io=tmp_path / "io")
    assert result.returncode == 0, result.stderr
    owner = json.loads(cli(root, "state", "c1").stdout)["pid"]
    qemu = qemu_of(root, "c1")
    assert cgroup_of(qemu, MEMORY) == f"/{parent}/c1"
    os.kill(owner, signal.SIGKILL)      # no cleanup of its own; QEMU dies with it
    deadline = time.monotonic() + 30
    while cmdline(qemu) and time.monotonic() < deadline:   # a zombie has none
        time.sleep(0.1)
    assert not cmdline(qemu)
    assert (MEMORY / parent / "c1").is_dir()        # left until the cleanup after it
    assert cli(root, "delete", "--force", "c1").returncode == 0
    assert_kata_py_made_nothing_left(parent)
    assert_nothing_left(root)
