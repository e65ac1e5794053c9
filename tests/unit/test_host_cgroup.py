"""Each VM's QEMU in a host cgroup with memory and task limits: made, joined
by a forked child, and removed. Real cgroups on this host (root), under a
name of the test's own."""

import os
from pathlib import Path

import pytest

from kata_py.vmm import host_cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


def test_limits_join_and_removal():
    cg = host_cgroup.HostCgroup(f"test-{os.getpid()}", guest_mib=128, accel="tcg")
    cg.create()
    assert cg.paths, "no cgroup hierarchy was writable"
    try:
        memory_files = [p / f for p in cg.paths for f in ("memory.max", "memory.limit_in_bytes") if (p / f).exists()]
        assert memory_files and int(memory_files[0].read_text()) == (128 + 1024) << 20
        pids_files = [p / "pids.max" for p in cg.paths if (p / "pids.max").exists()]
        assert pids_files and pids_files[0].read_text().strip() == str(host_cgroup.PIDS_MAX)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            cg.join()
            os.write(w, Path("/proc/self/cgroup").read_bytes())
            os._exit(0)
        os.close(w)
        seen = os.read(r, 65536).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert f"/kata-py/{cg.name}" in seen
    finally:
        cg.remove()
    assert not any(p.exists() for p in cg.paths) and all(not p.exists() for p, _ in host_cgroup._directories(cg.name))


def test_stale_empty_cgroups_are_swept_fresh_ones_kept():
    stale = host_cgroup.HostCgroup(f"vm-stale-{os.getpid()}", guest_mib=128, accel="tcg")
    fresh = host_cgroup.HostCgroup(f"vm-fresh-{os.getpid()}", guest_mib=128, accel="tcg")
    stale.create()
    fresh.create()
    try:
        old = host_cgroup.time.time() - 2 * host_cgroup.STALE_AFTER
        for path in stale.paths:
            os.utime(path, (old, old))
        host_cgroup.sweep_stale()
        assert not any(p.exists() for p in stale.paths)
        assert all(p.exists() for p in fresh.paths)
    finally:
        stale.remove()
        fresh.remove()
