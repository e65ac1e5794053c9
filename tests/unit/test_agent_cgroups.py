"""OCI linux.resources -> cgroup v2 files (the guest agent's conversions), and a
Cgroup against a fake cgroup directory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from kata_agent.cgroups import Cgroup, CgroupError, resource_files  # noqa: E402


def test_conversions_follow_runc_for_v2():
    files = dict(resource_files({
        "memory": {"limit": 1 << 26, "reservation": 1 << 25, "swap": 1 << 27},
        "cpu": {"shares": 1024, "quota": 150000, "period": 100000, "cpus": "0-1", "mems": "0"},
        "pids": {"limit": 64}, "blockIO": {"weight": 500}}))
    assert files == {"memory.max": str(1 << 26), "memory.low": str(1 << 25), "memory.swap.max": str(1 << 26),
                     "cpu.weight": "39", "cpu.max": "150000 100000", "cpuset.cpus": "0-1", "cpuset.mems": "0",
                     "pids.max": "64", "io.weight": "default 500"}


def test_unlimited_values():
    files = dict(resource_files({"memory": {"limit": -1, "swap": -1}, "cpu": {"quota": -1}, "pids": {"limit": 0}}))
    assert files == {"memory.max": "max", "memory.swap.max": "max", "cpu.max": "max 100000", "pids.max": "max"}


def test_swap_below_memory_is_refused():
    with pytest.raises(CgroupError):
        resource_files({"memory": {"limit": 100, "swap": 50}})


def test_apply_enter_and_stats_on_a_fake_tree(tmp_path):
    group = Cgroup("c1", root=str(tmp_path))
    group.create()
    group.apply({"pids": {"limit": 9}})
    assert (tmp_path / "c1" / "pids.max").read_text() == "9"
    for name, text in {"cpu.stat": "usage_usec 10\nuser_usec 6\nsystem_usec 4\n", "memory.current": "4096\n",
                       "memory.max": "max\n", "memory.events": "oom 1\noom_kill 1\n", "pids.current": "2\n",
                       "memory.stat": "anon 100\nfile 200\n"}.items():
        (tmp_path / "c1" / name).write_text(text)
    stats = group.stats()
    assert stats["cpu"] == {"usage_usec": 10, "user_usec": 6, "system_usec": 4}
    assert stats["memory"]["usage"] == 4096 and stats["memory"]["limit"] is None
    assert stats["memory"]["oom_kill"] == 1 and stats["pids"] == {"current": 2, "limit": 9}
    group.enter()
    assert (tmp_path / "c1" / "cgroup.procs").read_text() == "0"
