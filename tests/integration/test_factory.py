"""The VM factory: `create` takes a booted VM from the pool, a pooled VM is
never handed to two containers, and nothing of one container is left in the
VM the next one gets (each VM serves once and is destroyed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from kata_py.factory import client
from kata_py.sandbox import pool
from kata_py.sandbox.pool_wire import decode, encode, recv_line
from tests.bundles import make_bundle
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import assert_nothing_left, cli, reap

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper")]

POOL = 2
# A VM-wide kernel setting (no namespace holds it): it would survive into the
# next container if a VM were ever reused.
MARK = "echo 13 > /proc/sys/vm/swappiness; cat /proc/sys/kernel/random/boot_id; cat /proc/sys/vm/swappiness"


def factory_status() -> dict:
    status = pool.request({"op": "status"})
    assert status is not None, "the factory is not running"
    return status


def wait_pool_full(timeout: float = 300) -> dict:
    status = client.wait_ready(timeout)
    assert status["ready"] == status["size"], status
    return status


def pool_vms() -> list[int]:
    return [pid for pid in qemu_processes_under(RUN_DIR)
            if b"kata-py-pool-" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def factory():
    result = cli(Path("/nonexistent-root"), "factory", "start", "--size", str(POOL), "--memory", "128",
                 "--wait", "300")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] == POOL
    yield
    assert cli(Path("/nonexistent-root"), "factory", "stop").returncode == 0
    deadline = time.monotonic() + 60
    while pool_vms() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pool_vms() == []
    shutil.rmtree(pool.factory_dir())  # its logs; nothing is mounted there any more


def run_marked(tmp_path: Path, name: str) -> tuple[list[str], str]:
    bundle = make_bundle(tmp_path / name, ["sh", "-c", MARK])
    root = tmp_path / f"root-{name}"
    result = cli(root, "--log", tmp_path / f"{name}.log", "run", "--bundle", bundle, name)
    assert result.returncode == 0, result.stderr
    assert_nothing_left(root)
    return result.stdout.decode().split(), (tmp_path / f"{name}.log").read_text()


def test_create_takes_a_pooled_vm_and_no_state_carries_over(factory, tmp_path):
    before = wait_pool_full()
    first, log1 = run_marked(tmp_path, "first")
    assert "using pooled VM" in log1
    assert first[1] == "13"
    wait_pool_full()
    second, log2 = run_marked(tmp_path, "second")
    assert "using pooled VM" in log2
    # Another kernel (boot id), and the first container's setting is not there.
    assert second[0] != first[0] and second[1] == "13"
    status = factory_status()
    assert status["handed_out"] == before["handed_out"] + 2
    # The swappiness each container saw before writing is the guest's default:
    # read it in a third container without writing.
    wait_pool_full()
    bundle = make_bundle(tmp_path / "third", ["cat", "/proc/sys/vm/swappiness"])
    result = cli(tmp_path / "root-third", "run", "--bundle", bundle, "third")
    assert result.returncode == 0 and result.stdout == b"60\n", result


def test_concurrent_containers_get_different_vms(factory, tmp_path):
    wait_pool_full()
    boot_ids, pids = [], []
    roots = []
    for name in ("a", "b"):
        bundle = make_bundle(tmp_path / name, ["sh", "-c", "cat /proc/sys/kernel/random/boot_id; exec sleep 1000"])
        root = tmp_path / f"root-{name}"
        roots.append(root)
        with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
            # Files, not pipes: the detached container's monitor keeps its stdio.
            result = cli(root, "run", "--detach", "--bundle", bundle, "--pid-file", tmp_path / f"{name}.pid", name,
                         stdout=out, stderr=err)
        assert result.returncode == 0, result.stderr
        pids.append(int((tmp_path / f"{name}.pid").read_text()))
    run_dirs = {json.loads((root / name / "state.json").read_text())["run_dir"] for root, name in zip(roots, "ab")}
    assert len(run_dirs) == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all((tmp_path / f"{n}.out").read_bytes() for n in "ab"):
        time.sleep(0.2)
    for name in "ab":
        boot_ids.append((tmp_path / f"{name}.out").read_text().strip())
    assert boot_ids[0] != boot_ids[1] and all(boot_ids)
    for root, name, pid in zip(roots, "ab", pids):
        assert cli(root, "delete", "--force", name).returncode == 0
        reap(pid)
    for root in roots:      # once both are gone: each container's owner has a run directory
        assert_nothing_left(root)


def test_a_standby_serves_one_claim_only(factory):
    wait_pool_full()
    reply = pool.request({"op": "claim", "memory_mib": 128, "cpus": 1})
    assert reply["ok"], reply
    first = socket.socket(socket.AF_UNIX)
    first.connect(reply["socket"])
    first.sendall(encode({"op": "claim", "owner": os.getpid()}))
    info = decode(recv_line(first))
    assert info["ok"] and info["pid"] == reply["pid"]
    # The socket is gone once claimed: no second container can reach this VM.
    second = socket.socket(socket.AF_UNIX)
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        second.connect(reply["socket"])
    second.close()
    # Too big for the pool: refused, the pool untouched.
    assert not pool.request({"op": "claim", "memory_mib": 4096, "cpus": 1})["ok"]
    # Letting go ends that VM and its standby.
    vm_count = len(pool_vms())
    first.close()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{info['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{info['pid']}").exists()
    assert not Path(info["run_dir"]).exists() and not Path(info["share_dir"]).exists()
    assert len(pool_vms()) <= vm_count


def test_killed_monitor_of_a_pooled_container_leaks_nothing(factory, tmp_path):
    wait_pool_full()
    bundle = make_bundle(tmp_path / "k", ["sleep", "1000"])
    root = tmp_path / "root-k"
    with open(tmp_path / "k.out", "wb") as out:
        result = cli(root, "--log", tmp_path / "k.log", "run", "--detach", "--bundle", bundle, "--pid-file",
                     tmp_path / "k.pid", "k", stdout=out, stderr=out)
    assert result.returncode == 0, (tmp_path / "k.out").read_text()
    assert "using pooled VM" in (tmp_path / "k.log").read_text()
    state = json.loads((root / "k" / "state.json").read_text())
    monitor = int((tmp_path / "k.pid").read_text())
    os.kill(monitor, signal.SIGKILL)
    reap(monitor)
    deadline = time.monotonic() + 60
    while Path(state["run_dir"]).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(state["run_dir"]).exists()  # its standby ended the VM
    assert json.loads(cli(root, "state", "k").stdout)["status"] == "stopped"
    assert cli(root, "delete", "k").returncode == 0
    assert_nothing_left(root)


@pytest.mark.parametrize("victim", ["qemu", "standby"])
def test_a_pooled_vm_killed_under_its_container_ends_it_cleanly(factory, tmp_path, victim):
    """Faults on the pooled path: the VM's QEMU, or the standby that keeps it,
    SIGKILLed while the container runs. The monitor ends, `state` says
    stopped, and delete leaves nothing (no VM, standby, share or run dir)."""
    wait_pool_full()
    bundle = make_bundle(tmp_path / victim, ["sleep", "1000"])
    root = tmp_path / f"root-{victim}"
    with open(tmp_path / f"{victim}.out", "wb") as out:
        result = cli(root, "--log", tmp_path / f"{victim}.log", "run", "--detach", "--bundle", bundle,
                     "--pid-file", tmp_path / f"{victim}.pid", victim, stdout=out, stderr=out)
    assert result.returncode == 0, (tmp_path / f"{victim}.out").read_text()
    log = (tmp_path / f"{victim}.log").read_text()
    assert "using pooled VM" in log
    standby = int(log.split("using pooled VM of standby ")[1].split()[0])
    state = json.loads((root / victim / "state.json").read_text())
    monitor = int((tmp_path / f"{victim}.pid").read_text())
    qemus = qemu_processes_under(Path(state["run_dir"]))
    assert len(qemus) == 1
    os.kill(qemus[0] if victim == "qemu" else standby, signal.SIGKILL)
    reap(monitor, timeout=60)
    assert json.loads(cli(root, "state", victim).stdout)["status"] == "stopped"
    assert cli(root, "delete", victim).returncode == 0
    deadline = time.monotonic() + 60
    while (Path(f"/proc/{standby}").exists() or qemu_processes_under(Path(state["run_dir"]))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{standby}").exists() and not qemu_processes_under(Path(state["run_dir"]))
    assert_nothing_left(root)


def test_status_and_stop_without_a_factory(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_RUN_DIR", str(tmp_path))
    result = cli(tmp_path / "root", "factory", "status")
    assert result.returncode == 0 and json.loads(result.stdout) == {"running": False}
    result = cli(tmp_path / "root", "factory", "stop")
    assert result.returncode == 1 and b"not running" in result.stderr
