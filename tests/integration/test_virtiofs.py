"""The container's files over virtio-fs (the default) and over 9p (selected):
what the guest mounts, that the binds behave on both (read-write through,
read-only refused), that each VM's virtiofsd lives in the sandbox's host
cgroup and is gone once the container is deleted, and that a bad selection is
refused before anything is made."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.bundles import make_bundle
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import assert_nothing_left, cli, cmdline

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]

CGROUP_ROOT = Path("/sys/fs/cgroup")

# The container's root and both binds, as the guest's kernel names their filesystems,
# then a write through each bind.
SCRIPT = ("awk '$2 == \"/\" || $2 == \"/rw\" || $2 == \"/ro\" {print $2, $3}' /proc/mounts; "
          "echo through > /rw/written && echo rw-ok; "
          "echo x > /ro/refused 2>/dev/null || echo ro-refused; "
          "cat /ro/host-file")


def virtiofsd_processes() -> dict[int, bytes]:
    """This test session's virtiofsd processes (their export is under its run directory)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = cmdline(int(entry))
        if argv.startswith(b"/usr/lib/qemu/virtiofsd\0") and str(RUN_DIR).encode() in argv:
            found[int(entry)] = argv
    return found


def bundle_with_binds(tmp_path: Path, args: list[str], **extra) -> Path:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "host-file").write_text("from the host\n")
    bundle = make_bundle(tmp_path / "bundle", args, **extra)
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] += [{"destination": "/rw", "type": "bind", "source": str(rw), "options": ["rbind", "rw"]},
                         {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["rbind", "ro"]}]
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def run_script(tmp_path: Path, env: dict | None = None) -> list[str]:
    bundle = bundle_with_binds(tmp_path, ["sh", "-c", SCRIPT])
    root = tmp_path / "root"
    result = cli(root, "run", "--bundle", bundle, "fs", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rw" / "written").read_text() == "through\n"
    assert not (tmp_path / "ro" / "refused").exists()
    assert_nothing_left(root)
    return result.stdout.decode().splitlines()


def test_rootfs_and_binds_are_virtio_fs_by_default(tmp_path):
    lines = run_script(tmp_path)
    assert lines == ["/ virtiofs", "/rw virtiofs", "/ro virtiofs", "rw-ok", "ro-refused", "from the host"]


def test_9p_when_selected(tmp_path):
    before = set(virtiofsd_processes())
    lines = run_script(tmp_path, env=dict(os.environ, KATA_PY_SHARED_FS="9p"))
    assert lines == ["/ 9p", "/rw 9p", "/ro 9p", "rw-ok", "ro-refused", "from the host"]
    assert set(virtiofsd_processes()) <= before


def test_bad_selection_is_refused_with_nothing_left(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", ["true"])
    root = tmp_path / "root"
    result = cli(root, "run", "--bundle", bundle, "bad", env=dict(os.environ, KATA_PY_SHARED_FS="nfs"))
    assert result.returncode != 0
    message = result.stderr.decode().strip()
    assert len(message.splitlines()) == 1 and "KATA_PY_SHARED_FS" in message and "virtio-fs" in message, message
    assert_nothing_left(root)


def test_virtiofsd_lives_in_the_sandbox_cgroup_and_goes_with_it(tmp_path):
    parent = f"kpt-vfs-{os.getpid()}"
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", "while :; do sleep 1; done"],
                         linux={"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                                               {"type": "uts"}],
                                "cgroupsPath": f"/{parent}/c1"})
    root = tmp_path / "root"
    before = set(virtiofsd_processes())
    try:
        assert cli(root, "run", "--detach", "--bundle", bundle, "c1", io=tmp_path / "io").returncode == 0
        ours = {pid: argv for pid, argv in virtiofsd_processes().items() if pid not in before}
        # The daemon and its child in the pid namespace it sandboxes itself in.
        assert len(ours) == 2, ours
        qemu = [pid for pid in qemu_processes_under(RUN_DIR) if f"/{parent}/c1".encode() in
                Path(f"/proc/{pid}/cgroup").read_bytes()]
        assert len(qemu) == 1, qemu
        for pid in ours:
            assert Path(f"/proc/{pid}/cgroup").read_text() == Path(f"/proc/{qemu[0]}/cgroup").read_text()
        # Its socket is in the VM's run directory, the one QEMU is given.
        sockets = list(RUN_DIR.rglob("fs-rootfs.sock"))
        assert len(sockets) == 1 and (sockets[0].parent / "console.log").exists(), sockets
        argv = cmdline(qemu[0]).split(b"\0")
        assert any(a.startswith(b"vhost-user-fs-device") for a in argv), argv
        chardev = next(a for a in argv if a.startswith(b"socket,id=char-fs-rootfs"))
        fd = re.search(rb"(?:^|,)fd=(\d+)", chardev)
        if fd:      # a jailed QEMU gets the connection, made outside, as an fd
            assert os.readlink(f"/proc/{qemu[0]}/fd/{int(fd.group(1))}").startswith("socket:"), chardev
        else:
            assert b"fs-rootfs.sock" in chardev, chardev
        assert cli(root, "delete", "--force", "c1").returncode == 0
        assert not set(ours) & set(virtiofsd_processes())
        assert not list(RUN_DIR.rglob("fs-rootfs.sock"))
        assert_nothing_left(root)
    finally:
        cli(root, "delete", "--force", "c1")     # after a failed check: the cgroups can go only then
        for hierarchy in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()]:
            for path in (hierarchy / parent / "c1", hierarchy / parent):
                try:
                    path.rmdir()
                except (FileNotFoundError, NotADirectoryError):
                    pass


def test_the_share_reads_without_readahead(tmp_path):
    """The agent turns readahead off on its virtio-fs mount (agent/kata_agent/
    mounts.py: a readahead completing after its inode is gone crashed the
    guest kernel); the container's root is that mount."""
    # The guest's only anonymous-device backing device is the virtio-fs
    # mount's (its submounts, one per host filesystem, share it); vda is 254:0.
    script = "cat /sys/class/bdi/0:*/read_ahead_kb"
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script])
    root = tmp_path / "root"
    result = cli(root, "run", "--bundle", bundle, "ra")
    assert (result.returncode, result.stdout) == (0, b"0\n"), result.stderr
    assert_nothing_left(root)
