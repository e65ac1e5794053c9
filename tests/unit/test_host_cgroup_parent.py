"""The sandbox's host processes in the cgroup the runtime is given (OCI
linux.cgroupsPath, a pod's cgroup): the path as cgroupfs and systemd name it,
the limits written in v1 and v2 layouts (fake cgroup roots), only what
kata-py made removed, by the VM's name too (the cleanup after a killed
owner), and processes adopted and moved back out. One real test on this
host's cgroups (root)."""

import os
import shutil
import signal
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from kata_py.errors import ConfigError, HostCgroupError
from tests.unit.test_host_cgroup import cgroups_of_a_joined_child
from kata_py.sandbox.single import Launch
from kata_py.vmm import host_cgroup
from kata_py.vmm.host_cgroup import HostCgroup, HostLimits, cgroup_path

MIB = 1 << 20
EXTRA = (host_cgroup.OVERHEAD_MIB["tcg"] + host_cgroup.RUNTIME_MIB) * MIB


# -- the path ------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("/kpt/c1", "kpt/c1"),
    ("/kubepods/besteffort/pod1/abc", "kubepods/besteffort/pod1/abc"),
    ("//a/./b/", "a/b"),
    ("relative/c1", "relative/c1"),            # under each hierarchy's root too
    ("/a:b", "a:b"),                           # absolute: a path, whatever it holds
    ("kubepods-besteffort-pod12.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"),
    ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
    (":libpod:abc", "system.slice/libpod-abc.scope"),
    ("-.slice:kp:abc", "kp-abc.scope"),
    ("machine.slice:x:inner.slice", "machine.slice/inner.slice"),
])
def test_cgroups_path_forms(value, expected):
    assert cgroup_path(value) == PurePosixPath(expected)


@pytest.mark.parametrize("value", ["", "/", "//.", "/a/../b", "..", "/a\0b", "nota:slice:x", "a--b.slice:p:n",
                                   "-a.slice:p:n", "a-.slice:p:n", "x.slice:p:", "x.slice:p:a/b", "x" * 5000])
def test_a_path_that_names_no_cgroup_of_ours_is_refused(value):
    with pytest.raises(ConfigError, match="linux.cgroupsPath"):
        cgroup_path(value)


def test_limits_from_resources():
    assert HostLimits.from_resources({"memory": {"limit": 64 * MIB, "swap": -1},
                                      "cpu": {"quota": 50000, "period": 100000, "shares": 512}}) == \
        HostLimits(memory=64 * MIB, cpu_quota=50000, cpu_period=100000, cpu_shares=512)
    # Unlimited, absent, or not a number: the cgroup's defaults.
    assert HostLimits.from_resources({"memory": {"limit": -1}, "cpu": {"quota": True, "shares": "9"}}) == HostLimits()
    assert HostLimits.from_resources(None) == HostLimits() == HostLimits.from_resources({"cpu": None})


def test_shares_map_onto_v2_weights_as_runc_maps_them():
    assert [host_cgroup.shares_to_weight(s) for s in (0, 2, 1024, 262144, 1 << 30)] == [1, 1, 39, 10000, 10000]


# -- fake roots ----------------------------------------------------------------------
@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake cgroup root, run directory and /proc; rmdir as the kernel does
    it (a cgroup's files go with it, a child keeps it)."""
    monkeypatch.setenv("KATA_PY_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(host_cgroup, "ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(host_cgroup, "PROC", tmp_path / "proc")

    def rmdir(path: Path, timeout: float) -> bool:
        if path.is_dir():
            if (path / "busy").exists():        # stands for a process still in it
                return False
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        return True

    monkeypatch.setattr(host_cgroup, "_rmdir", rmdir)
    return tmp_path


def v1_root(root: Path, controllers=("memory", "pids", "cpu", "cpuacct")) -> Path:
    for controller in controllers:
        (root / controller).mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    return root


def v2_root(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.procs").write_text("")
    return root


def record(fake: Path, name: str) -> Path:
    return fake / "run" / f"{name}.cgroups"


LIMITS = HostLimits(memory=64 * MIB, cpu_quota=50000, cpu_period=100000, cpu_shares=512)


def test_v1_limits_in_each_hierarchy_and_only_what_was_made_is_removed(fake):
    root = v1_root(fake / "cgroup")
    (root / "memory" / "kpt").mkdir()       # a parent that exists already (the pod's, say)
    cg = HostCgroup("vm-a", guest_mib=192, accel="tcg", path="/kpt/c1", limits=LIMITS)
    cg.create()
    assert cg.paths == [root / c / "kpt" / "c1" for c in ("memory", "pids", "cpu", "cpuacct")]
    assert (root / "memory/kpt/c1/memory.limit_in_bytes").read_text() == str(64 * MIB + EXTRA)
    assert (root / "pids/kpt/c1/pids.max").read_text() == str(host_cgroup.PIDS_MAX)
    assert {f: (root / "cpu/kpt/c1" / f).read_text() for f in ("cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares")} \
        == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000", "cpu.shares": "512"}
    made = {str(root / c / p) for c in ("pids", "cpu", "cpuacct") for p in ("kpt", "kpt/c1")} | \
        {str(root / "memory/kpt/c1")}
    assert set(host_cgroup.json.loads(record(fake, "vm-a").read_text())["made"]) == made
    cg.remove()
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == \
        sorted([root / c for c in ("memory", "pids", "cpu", "cpuacct")] + [root / "memory/kpt"])
    assert not record(fake, "vm-a").exists()


def test_a_cfs_period_is_written_before_its_quota(fake):
    v1_root(fake / "cgroup")
    files = host_cgroup._chosen_directories(PurePosixPath("a"), 1, LIMITS)
    cpu = next(f for h, _, f in files if h.name == "cpu")
    assert list(cpu) == ["cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares"]


def test_v2_controllers_are_handed_down_and_limits_written(fake):
    root = v2_root(fake / "cgroup")
    cg = HostCgroup("vm-b", guest_mib=256, accel="kvm", path="kubepods.slice:cri-containerd:abc", limits=LIMITS)
    cg.create()
    leaf = root / "kubepods.slice" / "cri-containerd-abc.scope"
    assert cg.paths == [leaf]
    # Each controller on its own, in every parent down to the leaf, not in it.
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (root / "kubepods.slice" / "cgroup.subtree_control").read_text() == "+cpu"
    assert not (leaf / "cgroup.subtree_control").exists()
    extra = (host_cgroup.OVERHEAD_MIB["kvm"] + host_cgroup.RUNTIME_MIB) * MIB
    assert {f: (leaf / f).read_text() for f in ("memory.max", "pids.max", "cpu.max", "cpu.weight")} == \
        {"memory.max": str(64 * MIB + extra), "pids.max": str(host_cgroup.PIDS_MAX),
         "cpu.max": "50000 100000", "cpu.weight": str(host_cgroup.shares_to_weight(512))}
    cg.remove()
    assert not (root / "kubepods.slice").exists() and not record(fake, "vm-b").exists()


def test_without_a_memory_limit_the_vms_ram_counts_and_no_cpu_limit_is_set(fake):
    root = v2_root(fake / "cgroup")
    cg = HostCgroup("vm-c", guest_mib=512, accel="tcg", path="/pod/c", limits=HostLimits())
    cg.create()
    assert (root / "pod/c/memory.max").read_text() == str(512 * MIB + EXTRA)
    assert not (root / "pod/c/cpu.max").exists() and not (root / "pod/c/cpu.weight").exists()
    cg.remove()


def test_without_a_path_nothing_changes(fake):
    root = v1_root(fake / "cgroup")
    cg = HostCgroup("vm-d", guest_mib=128, accel="tcg")
    cg.create()
    assert cg.paths == [root / "memory/kata-py/vm-d", root / "pids/kata-py/vm-d"]
    assert (root / "memory/kata-py/vm-d/memory.limit_in_bytes").read_text() == str((128 + 1024) * MIB)
    assert not (root / "cpu/kata-py").exists() and not (fake / "run").exists()


def test_the_cleanup_after_a_killed_owner_finds_what_was_made_by_name(fake):
    root = v2_root(fake / "cgroup")
    (root / "pod").mkdir()
    HostCgroup("vm-e", guest_mib=128, accel="tcg", path="/pod/c/leaf").create()    # its owner then dies
    assert (root / "pod/c/leaf").is_dir()
    host_cgroup.remove_host_cgroups("vm-e")
    assert not (root / "pod/c").exists() and (root / "pod").is_dir()
    assert not record(fake, "vm-e").exists()
    host_cgroup.remove_host_cgroups("vm-e")        # idempotent


def test_a_busy_cgroup_stays_recorded_for_a_later_cleanup(fake):
    root = v2_root(fake / "cgroup")
    cg = HostCgroup("vm-f", guest_mib=128, accel="tcg", path="/busy/leaf")
    cg.create()
    (root / "busy/leaf/busy").write_text("")
    cg.remove()
    assert host_cgroup.json.loads(record(fake, "vm-f").read_text())["made"] == [str(root / "busy/leaf"),
                                                                                 str(root / "busy")]
    (root / "busy/leaf/busy").unlink()
    host_cgroup.remove_host_cgroups("vm-f")
    assert not (root / "busy").exists() and not record(fake, "vm-f").exists()


def test_a_parent_others_made_cgroups_in_is_left_to_them(fake):
    root = v2_root(fake / "cgroup")
    cg = HostCgroup("vm-n", guest_mib=128, accel="tcg", path="/shared/leaf")
    cg.create()
    (root / "shared/conmon").mkdir()        # an engine's own cgroup beside ours
    cg.remove()
    assert not (root / "shared/leaf").exists() and (root / "shared/conmon").is_dir()
    assert not record(fake, "vm-n").exists()


def test_a_recorded_path_outside_the_cgroup_root_is_never_removed(fake):
    v2_root(fake / "cgroup")
    outside = fake / "precious"
    outside.mkdir()
    record(fake, "vm-g").parent.mkdir(parents=True)
    record(fake, "vm-g").write_text(host_cgroup.json.dumps({"made": [str(outside)]}))
    host_cgroup.remove_host_cgroups("vm-g")
    assert outside.is_dir()


def test_a_failure_half_way_leaves_nothing_made(fake):
    root = v1_root(fake / "cgroup")
    (root / "pids" / "kpt").write_text("")      # not a directory: no cgroup can be made under it
    cg = HostCgroup("vm-h", guest_mib=128, accel="tcg", path="/kpt/c1", limits=LIMITS)
    with pytest.raises(HostCgroupError, match=r"host cgroup cannot be made: .*/pids/kpt/c1: ") as info:
        cg.create()
    assert isinstance(info.value.__cause__, OSError)
    assert not (root / "memory" / "kpt").exists() and (root / "pids" / "kpt").is_file()
    assert not record(fake, "vm-h").exists() and cg.paths == []


def test_a_missing_hierarchy_is_still_an_error(fake):
    v1_root(fake / "cgroup", controllers=("memory", "cpu"))
    with pytest.raises(HostCgroupError, match="no pids cgroup hierarchy"):
        HostCgroup("vm-i", guest_mib=128, accel="tcg", path="/kpt/c1").create()


def test_an_adopted_process_is_moved_back_before_removal(fake):
    root = v1_root(fake / "cgroup", controllers=("memory", "pids"))
    for controller in ("memory", "pids"):
        (root / controller / "orig").mkdir()
    (fake / "proc" / "4242").mkdir(parents=True)
    (fake / "proc" / "4242" / "cgroup").write_text("9:name=systemd:/\n8:pids:/orig\n4:memory:/orig\n0::/\n")
    cg = HostCgroup("vm-j", guest_mib=128, accel="tcg", path="/kpt/c1")
    cg.create()
    assert cg.adopt(4242)
    assert (root / "memory/kpt/c1/cgroup.procs").read_text() == "4242"
    cg.remove()
    assert (root / "memory/orig/cgroup.procs").read_text() == "4242"
    assert (root / "pids/orig/cgroup.procs").read_text() == "4242"
    assert not (root / "memory/kpt").exists()


def test_only_a_cgroup_of_the_runtimes_choosing_adopts(fake):
    v1_root(fake / "cgroup")
    cg = HostCgroup("vm-k", guest_mib=128, accel="tcg")
    cg.create()
    assert not cg.adopt(os.getpid())


# -- the OCI CLI's plan --------------------------------------------------------------
def test_the_launch_carries_the_cgroup_and_a_pooled_vm_is_not_taken(tmp_path):
    from kata_py.oci.container import _poolable

    launch = Launch(agent_id="a", create={}, process={}, rootfs="/r", cgroups_path="/kpt/c1",
                    host_resources={"memory": {"limit": 64 * MIB}})
    launch.write(str(tmp_path / "launch.json"))
    again = Launch.read(str(tmp_path / "launch.json"))
    assert again.cgroups_path == "/kpt/c1" and again.host_resources == {"memory": {"limit": 64 * MIB}}
    assert _poolable({"linux": {"cgroupsPath": "/kpt/c1"}}) is False
    assert _poolable({"linux": {}}) is True


# -- this host's cgroups ---------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_on_this_host_qemu_would_join_and_a_process_is_adopted_and_let_go():
    parent = f"kpt-unit-{os.getpid()}"
    cg = HostCgroup(f"vm-unit-{os.getpid()}", guest_mib=128, accel="tcg", path=f"/{parent}/c1",
                    limits=HostLimits(memory=32 * MIB, cpu_shares=256))
    cg.create()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        memory = [p for p in cg.paths if (p / "memory.limit_in_bytes").exists() or (p / "memory.max").exists()]
        assert memory and int(next((memory[0] / f).read_text() for f in ("memory.limit_in_bytes", "memory.max")
                                   if (memory[0] / f).exists())) == 32 * MIB + EXTRA
        before = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert cg.adopt(sleeper.pid)
        assert f"/{parent}/c1" in Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f"/{parent}/c1" in cgroups_of_a_joined_child(cg)
        cg.remove()
        assert Path(f"/proc/{sleeper.pid}/cgroup").read_text() == before    # moved back where it was
    finally:
        cg.remove()
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    assert not any((host_cgroup.ROOT / c / parent).exists() for c in ("", "memory", "pids", "cpu", "cpuacct"))


def test_what_an_earlier_vm_of_the_name_made_stays_recorded(fake):
    root = v2_root(fake / "cgroup")
    HostCgroup("vm-l", guest_mib=128, accel="tcg", path="/old/leaf").create()     # nobody cleaned up after it
    cg = HostCgroup("vm-l", guest_mib=128, accel="tcg", path="/new/leaf")
    cg.create()
    cg.remove()
    assert not (root / "old").exists() and not (root / "new").exists()
    assert not record(fake, "vm-l").exists()


def test_co_mounted_cpu_and_cpuacct_are_one_hierarchy(fake):
    root = v1_root(fake / "cgroup", controllers=("memory", "pids", "cpu,cpuacct"))
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    cg = HostCgroup("vm-m", guest_mib=128, accel="tcg", path="/kpt/c1", limits=LIMITS)
    cg.create()
    assert cg.paths == [root / "memory/kpt/c1", root / "pids/kpt/c1", root / "cpu/kpt/c1"]
    assert (root / "cpu,cpuacct/kpt/c1/cpu.shares").read_text() == "512"
    cg.remove()
    assert not (root / "cpu,cpuacct/kpt").exists()


def test_a_parent_that_goes_meanwhile_is_made_again_and_recorded(fake, monkeypatch):
    root = v2_root(fake / "cgroup")
    (root / "pod").mkdir()
    real_mkdir = Path.mkdir
    gone = []

    def mkdir(self, *args, **kwargs):
        if self == root / "pod" / "leaf" and not gone:
            gone.append(self)
            shutil.rmtree(root / "pod")     # the last sandbox that had made it ended
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    cg = HostCgroup("vm-o", guest_mib=128, accel="tcg", path="/pod/leaf")
    cg.create()
    assert cg.made == [root / "pod", root / "pod/leaf"]
    assert host_cgroup.json.loads(record(fake, "vm-o").read_text())["made"] == [str(root / "pod"),
                                                                                str(root / "pod/leaf")]
