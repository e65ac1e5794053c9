"""The guest agent's parts behind the API, run on the host: a container's
files read and written inside its root (openat2 RESOLVE_IN_ROOT), the OOM
counter wait, and one 9p tag shared by several containers."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from kata_agent import container as container_mod  # noqa: E402
from kata_agent import files  # noqa: E402
from kata_agent import mounts as mountlib  # noqa: E402
from kata_agent.cgroups import Cgroup  # noqa: E402
from kata_agent.processes import ProcessError  # noqa: E402
from kata_agent.syscalls import Syscalls  # noqa: E402

O_PATH = getattr(os, "O_PATH", 0o10000000)


@pytest.fixture
def root(tmp_path):
    """A container root beside a secret it must never reach."""
    (tmp_path / "secret").write_text("guest's own")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text("container's passwd")
    os.symlink("/secret", rootfs / "abs")
    os.symlink("../../../../secret", rootfs / "climb")
    os.symlink("/etc", rootfs / "etc-link")
    os.mkfifo(rootfs / "fifo")
    fd = os.open(rootfs, O_PATH | os.O_DIRECTORY)
    yield rootfs, fd
    os.close(fd)


def test_files_round_trip_in_chunks_and_make_parents(root):
    rootfs, fd = root
    sys_ = Syscalls()
    files.write_chunk(sys_, fd, "/data/deep/f", b"hello ", truncate=True, parents=True)
    files.write_chunk(sys_, fd, "/data/deep/f", b"world", offset=6)
    assert (rootfs / "data" / "deep" / "f").read_bytes() == b"hello world"
    assert files.read_chunk(sys_, fd, "/data/deep/f", 0, 5) == (b"hello", 11, False)
    assert files.read_chunk(sys_, fd, "/data/deep/f", 5, 100) == (b" world", 11, True)
    files.write_chunk(sys_, fd, "/data/deep/f", b"new", truncate=True)
    assert files.read_chunk(sys_, fd, "/data/deep/f", 0, 100) == (b"new", 3, True)


def test_paths_resolve_inside_the_root(root, tmp_path):
    rootfs, fd = root
    sys_ = Syscalls()
    # Absolute symlinks and .. stop at the container's root.
    assert files.read_chunk(sys_, fd, "/etc-link/passwd", 0, 100)[0] == b"container's passwd"
    assert files.read_chunk(sys_, fd, "/../../etc/passwd", 0, 100)[0] == b"container's passwd"
    for path in ("/abs", "/climb"):
        with pytest.raises(ProcessError) as caught:
            files.read_chunk(sys_, fd, path, 0, 100)
        assert caught.value.code == "not_found"
    files.write_chunk(sys_, fd, "/abs", b"planted")       # lands in the root's /secret
    assert (rootfs / "secret").read_bytes() == b"planted"
    assert (tmp_path / "secret").read_text() == "guest's own"
    # mkdir -p through a symlinked directory stays inside too.
    files.write_chunk(sys_, fd, "/etc-link/sub/x", b"1", parents=True)
    assert (rootfs / "etc" / "sub" / "x").read_bytes() == b"1"


def test_only_regular_files(root):
    _, fd = root
    sys_ = Syscalls()
    for path in ("/fifo", "/etc"):
        with pytest.raises(ProcessError, match="not a regular file|Is a directory"):
            files.read_chunk(sys_, fd, path, 0, 10)
    with pytest.raises(ProcessError):
        files.write_chunk(sys_, fd, "/fifo", b"x")
    with pytest.raises(ProcessError, match="directory"):
        files.write_chunk(sys_, fd, "/etc/", b"x")
    with pytest.raises(ProcessError, match="absolute"):
        files.read_chunk(sys_, fd, "etc/passwd", 0, 10)


def test_oom_wait_returns_at_once_when_above_and_ends_with_its_container(tmp_path):
    cgroup = Cgroup("c", root=str(tmp_path))
    cgroup.create()
    (tmp_path / "c" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 3\noom_kill 3\n")
    assert cgroup.wait_count("memory.events", "oom_kill", 2, alive=lambda: True) == 3
    alive = threading.Event()
    alive.set()
    threading.Timer(0.3, alive.clear).start()
    started = time.monotonic()
    assert cgroup.wait_count("memory.events", "oom_kill", 3, alive=alive.is_set, interval=0.1) is None
    assert time.monotonic() - started < 2
    assert Cgroup("gone", root=str(tmp_path)).wait_count("memory.events", "oom_kill", 0, lambda: True) is None


class _Sys:
    """Records the mounts; a 9p mount 'brings' the export's entries."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mount(self, source, target, fstype, flags=0, data=""):
        self.calls.append(("mount", source, target, fstype))
        for entry in ("c1", "c2", "c3"):
            os.makedirs(f"{target}/{entry}", exist_ok=True)

    def umount(self, target, flags=0):
        self.calls.append(("umount", target))


class _Cgroup:
    def __init__(self, name):
        self.path = name

    def create(self):
        pass

    def apply(self, resources):
        pass

    def kill_and_remove(self, timeout):
        return True

    def remove(self):
        pass


def test_containers_on_one_tag_share_its_one_mount(tmp_path, monkeypatch):
    monkeypatch.setattr(container_mod, "CONTAINERS_DIR", str(tmp_path))
    monkeypatch.setattr(container_mod, "Cgroup", _Cgroup)
    # "sandbox" is a 9p device's tag (sysfs names it); "other", unnamed there, is virtio-fs's.
    devices = tmp_path / "9pnet_virtio"
    (devices / "virtio3").mkdir(parents=True)
    (devices / "virtio3" / "mount_tag").write_bytes(b"sandbox\0")
    (devices / "bind").write_text("")
    monkeypatch.setattr(mountlib, "NINEP_DEVICES", str(devices))
    sys_ = _Sys()
    table = container_mod.Containers(sys_)
    table.create("a", "sandbox", {"rootfs_path": "c1"})
    table.create("b", "sandbox", {"rootfs_path": "c2"})
    table.create("w", "other", {"rootfs_path": "c1"})
    share = f"{tmp_path}/a/share"
    assert sys_.calls == [("mount", "sandbox", share, "9p"), ("mount", share, f"{tmp_path}/b/share", ""),
                          ("mount", "other", f"{tmp_path}/w/share", "virtiofs")]
    # The first holder goes; a third container binds the one still holding the tag.
    table.delete("a")
    table.create("c", "sandbox", {"rootfs_path": "c3"})
    assert sys_.calls[-1] == ("mount", f"{tmp_path}/b/share", f"{tmp_path}/c/share", "")
    table.delete("b")
    table.delete("c")
    table.create("d", "sandbox", {"rootfs_path": "c1"})
    assert sys_.calls[-1] == ("mount", "sandbox", f"{tmp_path}/d/share", "9p")
