"""linux.resources in the guest: the container's cgroup v2 limits, `update`,
`events --stats`, and an OOM kill inside the VM reported by `events`."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from kata_py.cli.events import stats_event
from tests.bundles import make_bundle
from tests.conftest import KATA
from tests.oci_helpers import cli

pytestmark = pytest.mark.vm

MIB = 1 << 20


@pytest.fixture(scope="module")
def limited(tmp_path_factory, image):
    tmp = tmp_path_factory.mktemp("resources")
    root = tmp / "root"
    bundle = make_bundle(tmp / "bundle", ["sleep", "100000"], linux={
        "namespaces": [{"type": "mount"}],
        "resources": {"memory": {"limit": 64 * MIB}, "pids": {"limit": 64},
                      "cpu": {"shares": 512, "quota": 50000, "period": 100000}}})
    result = cli(root, "run", "--detach", "--bundle", bundle, "lim", io=tmp / "io", timeout=300)
    assert result.returncode == 0, result.stderr
    yield root
    cli(root, "delete", "--force", "lim")


def read(root, *paths) -> list[str]:
    result = cli(root, "exec", "lim", "cat", *paths)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().split("\n")[:-1]


def test_limits_reach_the_guest_cgroup(limited):
    memory_max, pids_max, cpu_max, cpu_weight = read(limited, *(f"/sys/fs/cgroup/{f}" for f in (
        "memory.max", "pids.max", "cpu.max", "cpu.weight")))
    assert int(memory_max) == 64 * MIB
    assert pids_max == "64"
    assert cpu_max == "50000 100000"
    assert cpu_weight == str(1 + ((512 - 2) * 9999) // 262142)
    # No cgroup namespace in this spec: the path is the guest's, and what the
    # container has at /sys/fs/cgroup is its own cgroup (bound there, as runc does).
    assert read(limited, "/proc/self/cgroup")[0].startswith("0::/c-")


def test_update_changes_limits_live(limited):
    assert cli(limited, "update", "--pids-limit", "100", "--cpu-quota", "20000", "lim").returncode == 0
    assert read(limited, "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/cpu.max") == ["100", "20000 100000"]
    resources = json.dumps({"pids": {"limit": 90}})
    result = cli(limited, "update", "--resources", "-", "lim", input=resources.encode())
    assert result.returncode == 0, result.stderr
    assert read(limited, "/sys/fs/cgroup/pids.max") == ["90"]
    # Beyond the VM's memory: refused clearly, nothing changed.
    result = cli(limited, "update", "--memory", str(64 << 30), "lim")
    assert result.returncode == 1 and b"recreate it with the larger limit" in result.stderr
    assert int(read(limited, "/sys/fs/cgroup/memory.max")[0]) == 64 * MIB


def test_pids_limit_holds_a_fork_bomb(limited):
    assert cli(limited, "update", "--pids-limit", "16", "lim").returncode == 0
    bomb = "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done 2>/dev/null; wait"
    subprocess.Popen(KATA + ["--root", str(limited), "exec", "--detach", "lim", "sh", "-c", bomb],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(120)
    time.sleep(3)
    current = int(read(limited, "/sys/fs/cgroup/pids.current")[0])
    assert current <= 16
    assert cli(limited, "update", "--pids-limit", "64", "lim").returncode == 0


def test_events_stats_and_oom(limited):
    result = cli(limited, "events", "--stats", "lim")
    assert result.returncode == 0, result.stderr
    event = json.loads(result.stdout)
    assert event["type"] == "stats" and event["id"] == "lim"
    assert event["data"]["memory"]["usage"]["limit"] == 64 * MIB
    assert event["data"]["pids"]["current"] >= 1 and event["data"]["cpu"]["usage"]["total"] > 0
    before = event["data"]["memory"]["raw"]["oom_kill"]

    stream = subprocess.Popen(KATA + ["--root", str(limited), "events", "--interval", "1", "lim"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # tmpfs pages are charged to the writer and cannot be reclaimed without
        # swap: 96 MiB into /dev/shm under a 64 MiB limit is an OOM kill.
        hog = cli(limited, "exec", "lim", "dd", "if=/dev/zero", "of=/dev/shm/hog", "bs=1M", "count=96")
        assert hog.returncode == 137, hog
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = stream.stdout.readline()
            if not line:
                break
            seen.append(json.loads(line))
            if any(e["type"] == "oom" for e in seen):
                break
        assert any(e["type"] == "oom" and e["id"] == "lim" for e in seen), seen
    finally:
        stream.kill()
        stream.wait()
    cli(limited, "exec", "lim", "rm", "-f", "/dev/shm/hog")
    after = json.loads(cli(limited, "events", "--stats", "lim").stdout)["data"]["memory"]["raw"]["oom_kill"]
    assert after > before


def test_stats_event_shape():
    raw = {"cpu": {"usage_usec": 2, "user_usec": 1, "system_usec": 1},
           "memory": {"usage": 5, "limit": None, "swap_usage": 0, "oom": 0, "oom_kill": 0, "anon": 1, "file": 2},
           "pids": {"current": 3, "limit": None}}
    event = stats_event("x", raw)
    assert event["data"]["cpu"]["usage"]["total"] == 2000
    assert event["data"]["memory"]["usage"] == {"usage": 5, "limit": 0}
    assert event["data"]["pids"] == {"current": 3, "limit": 0}
