"""The spec's `linux` section and mounts, applied by the agent inside the guest
and read back from inside the container: namespaces (pid, user with id maps,
uts, ipc), mounts with their options, bind mounts of host paths, devices,
masked and read-only paths, a read-only root, sysctl, hostname/domainname.

One container (one VM) serves the checks; each check is an `exec`, which also
proves that exec joins every namespace the init made.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.bundles import DEFAULT_MOUNTS, make_bundle
from tests.oci_helpers import assert_nothing_left, cli

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper")]

HOST_UID = 1000  # container uid 0 is this uid in the guest (and on the shared files)
INIT = "echo init-ready; exec sleep 1000"


# -- containers of their own (before the shared one starts: they check nothing is left)


def test_no_pivot_runs_in_its_rootfs(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "cat /marker; echo pid=$$; ls /run/kata 2>&1 | head -1"])
    (bundle / "rootfs" / "marker").write_text("in the rootfs\n")
    root = tmp_path / "root"
    result = cli(root, "run", "--no-pivot", "--bundle", bundle, "np")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["in the rootfs", "pid=1"]
    assert "No such file" in lines[2]  # the agent's own files are not in view
    assert_nothing_left(root)


def test_unknown_bind_source_fails_cleanly(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", ["true"], mounts=DEFAULT_MOUNTS + [
        {"destination": "/x", "type": "bind", "source": str(tmp_path / "missing"), "options": ["bind"]}])
    root = tmp_path / "root"
    result = cli(root, "run", "--bundle", bundle, "bad")
    assert result.returncode == 1
    assert "missing" in result.stderr.decode() and len(result.stderr.decode().strip().splitlines()) == 1
    assert_nothing_left(root)


# -- one container for the checks below


@pytest.fixture(scope="module")
def spec_box(tmp_path_factory):
    base = tmp_path_factory.mktemp("spec")
    data = base / "data"
    data.mkdir()
    (data / "from-host").write_text("host data\n")
    writable = base / "writable"
    writable.mkdir()
    os.chown(writable, HOST_UID, HOST_UID)  # the mapped root may write here
    single = base / "single-file"
    single.write_text("one host file\n")
    mounts = DEFAULT_MOUNTS + [
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "ro", "nosuid"]},
        {"destination": "/writable", "type": "bind", "source": str(writable), "options": ["bind"]},
        {"destination": "/etc/single", "type": "bind", "source": str(single), "options": ["bind", "ro"]},
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "noexec", "size=2m", "mode=1770"]},
    ]
    linux = {
        "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "cgroup", "user")],
        "uidMappings": [{"containerID": 0, "hostID": HOST_UID, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": HOST_UID, "size": 65536}],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware", "/proc/does-not-exist"],
        "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        "sysctl": {"kernel.msgmax": "4242", "kernel.shmmni": "1234"},
        "devices": [{"path": "/dev/mydev", "type": "c", "major": 1, "minor": 5, "fileMode": 0o640,
                     "uid": 0, "gid": 0},
                    {"path": "/dev/myfifo", "type": "p", "fileMode": 0o600}],
    }
    bundle = make_bundle(base / "bundle", ["sh", "-c", INIT], readonly=True, mounts=mounts, linux=linux,
                         hostname="spec-host", domainname="example.org")
    root = base / "root"
    logs = base / "io"
    logs.mkdir()
    with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
        result = cli(root, "run", "--detach", "--bundle", bundle, "spec", stdout=out, stderr=err)
    assert result.returncode == 0, (logs / "err").read_text()
    yield {"root": root, "bundle": bundle, "writable": writable, "data": data, "logs": logs}
    cli(root, "delete", "--force", "spec")
    assert_nothing_left(root)


def sh(box, script: str) -> str:
    result = cli(box["root"], "exec", "spec", "sh", "-c", script)
    assert result.returncode == 0, (script, result.stdout, result.stderr)
    return result.stdout.decode()


def mountinfo(box) -> dict[str, dict]:
    """mount point -> {"options": per-mount options, "fstype", "super": superblock options}."""
    found = {}
    for line in sh(box, "cat /proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, _source, super_options = right.split()[:3]
        found[fields[4]] = {"options": set(fields[5].split(",")), "fstype": fstype,
                            "super": set(super_options.split(","))}
    return found


def test_pid_namespace_init_is_pid_1_and_no_agent_is_visible(spec_box):
    out = sh(spec_box, "echo self=$$; cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o pid,args")
    lines = out.splitlines()
    assert lines[1].strip() == "sleep 1000"
    pids = [line.split(None, 1) for line in lines[3:]]
    assert pids[0] == ["1", "sleep 1000"]
    assert all("python" not in cmd and "kata" not in cmd for _, cmd in pids), out


def test_user_namespace_maps_root_to_1000(spec_box):
    out = sh(spec_box, "id; cat /proc/self/uid_map /proc/self/gid_map; echo made-here > /writable/by-root")
    lines = out.splitlines()
    assert lines[0].startswith("uid=0(root) gid=0(root)")
    assert lines[1].split() == ["0", str(HOST_UID), "65536"] and lines[2].split() == ["0", str(HOST_UID), "65536"]
    # Written by the container's root, owned by uid 1000 in the guest, and so on the share.
    made = spec_box["writable"] / "by-root"
    assert made.read_text() == "made-here\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (HOST_UID, HOST_UID)


def test_cgroup_namespace_is_rooted_at_the_containers_cgroup(spec_box):
    assert sh(spec_box, "cat /proc/self/cgroup") == "0::/\n"
    assert "pids.max" in sh(spec_box, "ls /sys/fs/cgroup").split()


def test_uts_and_ipc_namespaces_and_sysctl(spec_box):
    out = sh(spec_box, "hostname; cat /proc/sys/kernel/domainname /proc/sys/kernel/msgmax /proc/sys/kernel/shmmni")
    assert out.split() == ["spec-host", "example.org", "4242", "1234"]


def test_spec_mounts_with_their_options(spec_box):
    mounts = mountinfo(spec_box)
    assert mounts["/proc"]["fstype"] == "proc"
    assert mounts["/dev"]["fstype"] == "tmpfs" and {"nosuid"} <= mounts["/dev"]["options"]
    assert "size=65536k" in mounts["/dev"]["super"] and "mode=755" in mounts["/dev"]["super"]
    assert mounts["/dev/pts"]["fstype"] == "devpts" and {"nosuid", "noexec"} <= mounts["/dev/pts"]["options"]
    assert mounts["/dev/shm"]["fstype"] == "tmpfs" and \
        {"nosuid", "nodev", "noexec"} <= mounts["/dev/shm"]["options"]
    assert mounts["/dev/mqueue"]["fstype"] == "mqueue"
    assert mounts["/sys"]["fstype"] == "sysfs" and "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["fstype"] == "cgroup2" and "ro" in mounts["/sys/fs/cgroup"]["options"]
    scratch = mounts["/scratch"]
    assert scratch["fstype"] == "tmpfs" and {"nosuid", "nodev", "noexec", "rw"} <= scratch["options"]
    assert {"size=2048k", "mode=1770"} <= scratch["super"]
    assert {"ro", "nosuid"} <= mounts["/data"]["options"]
    assert "ro" in mounts["/etc/single"]["options"] and "rw" in mounts["/writable"]["options"]
    assert "ro" in mounts["/"]["options"]  # root.readonly


def test_bind_mounts_of_host_paths(spec_box):
    out = sh(spec_box, "cat /data/from-host /etc/single; "
                       "echo x > /data/new 2>/dev/null && echo data-writable || echo data-ro")
    assert out == "host data\none host file\ndata-ro\n"
    assert not (spec_box["data"] / "new").exists()


def test_readonly_root_masked_and_readonly_paths(spec_box):
    out = sh(spec_box, "touch /newfile 2>&1; { echo 1 > /proc/sys/kernel/msgmax; } 2>&1; "
                       "echo kcore=$(wc -c < /proc/kcore); echo keys=$(cat /proc/keys | wc -c); "
                       "echo firmware=$(ls -A /sys/firmware | wc -l); touch /sys/firmware/x 2>&1; "
                       "echo t > /scratch/t && cat /scratch/t")
    assert "Read-only file system" in out.splitlines()[0]
    assert "Read-only file system" in out.splitlines()[1]
    assert "kcore=0" in out and "keys=0" in out and "firmware=0" in out
    assert out.count("Read-only file system") == 3 and out.endswith("t\n")
    # The tmpfs belongs to the container's root (mode 1770 lets only it write).
    assert sh(spec_box, "stat -c '%u %g %a' /scratch").split() == ["0", "0", "1770"]
    assert not (spec_box["bundle"] / "rootfs" / "newfile").exists()


def test_default_and_spec_devices(spec_box):
    out = sh(spec_box, "ls -ln /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /dev/mydev; "
                       "ls -ln /dev/myfifo; readlink /dev/fd; readlink /dev/ptmx; head -c 4 /dev/zero | wc -c")
    lines = out.splitlines()
    by_name = {line.split()[-1]: line.split() for line in lines[:8]}
    assert by_name["/dev/null"][0] == "crw-rw-rw-" and by_name["/dev/null"][4:6] == ["1,", "3"]
    assert by_name["/dev/mydev"][0] == "crw-r-----" and by_name["/dev/mydev"][4:6] == ["1,", "5"]
    assert by_name["/dev/myfifo"][0] == "prw-------"
    assert lines[8:11] == ["/proc/self/fd", "pts/ptmx", "4"]


def test_no_device_node_reached_the_hosts_rootfs(spec_box):
    dev = spec_box["bundle"] / "rootfs" / "dev"
    assert not [p for p in dev.iterdir() if stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISFIFO(p.lstat().st_mode)]
