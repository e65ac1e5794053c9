"""The agent's spec-mount logic against a recording fake of mount(2): option
parsing, symlink-safe destinations, binds remounted with their flags, masked
and read-only paths, devices. No VM; the integration tests read the result
back from /proc/self/mountinfo inside a real guest."""

import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from kata_agent import mounts  # noqa: E402
from kata_agent.syscalls import (MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY,  # noqa: E402
                                 MS_REC, MS_RELATIME, MS_REMOUNT, MS_SLAVE, Syscalls)


def named(path: str) -> str:
    """What a /proc/self/fd path the agent mounts on stands for (the fd is open during the call)."""
    return os.readlink(path) if path.startswith("/proc/self/fd/") else path


class RecordingSys:
    """mount(2) recorded, on the paths the pinned fds stand for; openat2 is the real one."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls = []
        self.fail_on = fail_on
        self.real = Syscalls()

    def openat2(self, *args):
        return self.real.openat2(*args)

    def mount(self, source, target, fstype, flags=0, data=""):
        source, target = named(source), named(target)
        if self.fail_on and target.endswith(self.fail_on):
            raise OSError(13, "denied")
        self.calls.append((source, target, fstype, flags, data))


def test_options_split_into_flags_propagation_and_data():
    flags, propagation, data = mounts.parse_options(
        ["nosuid", "noexec", "nodev", "relatime", "ro", "rslave", "size=65536k", "mode=755", "tmpcopyup"])
    assert flags == MS_NOSUID | MS_NOEXEC | MS_NODEV | MS_RELATIME | MS_RDONLY
    assert propagation == [MS_SLAVE | MS_REC]
    assert data == "size=65536k,mode=755"


def test_later_options_win():
    flags, _, _ = mounts.parse_options(["ro", "rw", "nosuid", "suid", "rbind"])
    assert flags == MS_BIND | MS_REC


def test_secure_join_keeps_symlinks_inside_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "escape").symlink_to("/")
    (root / "up").symlink_to("../../../..")
    (root / "etc" / "rel").symlink_to("../etc")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert mounts.secure_join(r, "/escape/etc/passwd") == f"{r}/etc/passwd"
    assert mounts.secure_join(r, "/up/tmp") == f"{r}/tmp"
    assert mounts.secure_join(r, "/../../x") == f"{r}/x"
    assert mounts.secure_join(r, "/etc/rel/rel/hosts") == f"{r}/etc/hosts"
    assert mounts.secure_join(r, "/") == r
    assert mounts.secure_join(r, "/new/dir") == f"{r}/new/dir"
    with pytest.raises(mounts.MountError, match="symbolic links"):
        mounts.secure_join(r, "/loop/x")


def test_filesystem_mount_and_propagation(tmp_path):
    fake = RecordingSys()
    target = mounts.mount_one(fake, str(tmp_path), {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                                                    "options": ["nosuid", "size=1m", "rprivate"]}, "shm")
    assert target == f"{tmp_path}/dev/shm" and os.path.isdir(target)
    assert fake.calls == [("shm", target, "tmpfs", MS_NOSUID, "size=1m"), ("", target, "", MS_PRIVATE | MS_REC, "")]


def test_cgroup_v1_becomes_cgroup2(tmp_path):
    fake = RecordingSys()
    mounts.mount_one(fake, str(tmp_path), {"destination": "/sys/fs/cgroup", "type": "cgroup",
                                           "options": ["ro", "nosuid"]}, "cgroup")
    assert fake.calls[0][2:] == ("cgroup2", MS_RDONLY | MS_NOSUID, "")


def test_readonly_file_bind_is_remounted(tmp_path):
    source = tmp_path / "hosts"
    source.write_text("x")
    root = tmp_path / "root"
    root.mkdir()
    fake = RecordingSys()
    target = mounts.mount_one(fake, str(root), {"destination": "/etc/hosts", "type": "bind",
                                                "options": ["rbind", "ro", "nosuid"]}, str(source))
    assert os.path.isfile(target)  # a file mount point for a file source
    assert fake.calls[0] == (str(source), target, "", MS_BIND | MS_REC, "")
    source_, target_, _, flags, _ = fake.calls[1]
    assert target_ == target and flags & (MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID) == \
        MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID


def test_failure_names_the_destination(tmp_path):
    with pytest.raises(mounts.MountError, match="/proc"):
        mounts.mount_one(RecordingSys(fail_on="proc"), str(tmp_path), {"destination": "/proc", "type": "proc"},
                         "proc")


def test_masking(tmp_path):
    (tmp_path / "proc" / "acpi").mkdir(parents=True)
    (tmp_path / "proc" / "kcore").write_text("")
    fake = RecordingSys()
    for path in ("/proc/acpi", "/proc/kcore", "/proc/missing"):
        mounts.mask_path(fake, str(tmp_path), path)
    assert fake.calls == [("tmpfs", f"{tmp_path}/proc/acpi", "tmpfs", MS_RDONLY, ""),
                          ("/dev/null", f"{tmp_path}/proc/kcore", "", MS_BIND, "")]


def test_readonly_path(tmp_path):
    (tmp_path / "proc" / "sys").mkdir(parents=True)
    fake = RecordingSys()
    mounts.readonly_path(fake, str(tmp_path), "/proc/sys")
    mounts.readonly_path(fake, str(tmp_path), "/proc/missing")
    target = f"{tmp_path}/proc/sys"
    assert fake.calls[0] == (target, target, "", MS_BIND | MS_REC, "")
    assert fake.calls[1][3] & (MS_REMOUNT | MS_BIND | MS_RDONLY) == MS_REMOUNT | MS_BIND | MS_RDONLY
    assert len(fake.calls) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_devices(tmp_path):
    (tmp_path / "dev").mkdir()
    mounts.make_devices(str(tmp_path), [{"path": "/dev/mydev", "type": "c", "major": 1, "minor": 3,
                                         "file_mode": 0o600, "uid": 1000, "gid": 1000},
                                        {"path": "/dev/fifo0", "type": "p"}])
    null = os.stat(tmp_path / "dev" / "null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert os.readlink(tmp_path / "dev" / "fd") == "/proc/self/fd"
    mine = os.stat(tmp_path / "dev" / "mydev")
    assert stat.S_IMODE(mine.st_mode) == 0o600 and (mine.st_uid, mine.st_gid) == (1000, 1000)
    assert stat.S_ISFIFO(os.stat(tmp_path / "dev" / "fifo0").st_mode)


class WhereSys(RecordingSys):
    """Records where mount(2) would really land: the kernel follows a plain
    path's symlinks at the time of the call."""

    def mount(self, source, target, fstype, flags=0, data=""):
        self.calls.append(os.path.realpath(named(target)))


@pytest.mark.parametrize("link", ["outside", "/"])
def test_a_destination_swapped_for_a_symlink_after_the_check_stays_inside_root(tmp_path, monkeypatch, link):
    """The mount-target race: `vol/lnk` is a directory when the destination is
    resolved and a symlink out of the root when the mount is made."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "vol" / "lnk").mkdir(parents=True)
    outside.mkdir()
    made = mounts.make_mount_point

    def swap_after(target, file_source):
        made(target, file_source)
        (root / "vol" / "lnk").rmdir()
        os.symlink(str(outside) if link == "outside" else "/", root / "vol" / "lnk")

    monkeypatch.setattr(mounts, "make_mount_point", swap_after)
    fake = WhereSys()
    try:
        mounts.mount_one(fake, str(root), {"destination": "/vol/lnk", "type": "tmpfs"}, "tmpfs")
    except mounts.MountError:
        assert link == "outside"    # resolved in the root: <root>/<tmp_path>/outside does not exist
    assert all(where == str(root) or where.startswith(f"{root}/") for where in fake.calls), fake.calls
    assert link == "outside" or fake.calls == [str(root)]
