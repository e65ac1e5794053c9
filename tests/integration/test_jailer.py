"""QEMU jailed (kata_py/vmm/jail.py), seen from the host for a running
container: an unprivileged uid and gid, no capabilities, no_new_privs, its
seccomp filter, namespaces of its own, a root that holds only what the VM
needs; and after delete nothing of the jail is left."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kata_py.harness import posture_probes
from kata_py.vmm import jail
from kata_py.vmm.host import QEMU_BINARY
from tests.bundles import make_bundle
from tests.oci_helpers import assert_nothing_left, cli, reap

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper", "force_delete_leftovers")]

NAMESPACES = ("mnt", "pid", "ipc", "uts")


def status_of(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def qemu_of(owner: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == owner and b"qemu-system" in argv[0]:
            return int(entry)
    raise AssertionError(f"no QEMU child of the sandbox owner {owner}")


def backend_of(owner: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == owner and b"-m kata_py.vsock " in cmdline:
            return int(entry)
    raise AssertionError(f"no vsock back end child of the sandbox owner {owner}")


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    base = tmp_path_factory.mktemp("jailer")
    root, bundle = base / "root", make_bundle(base / "bundle", ["sh", "-c", "exec sleep 1000"])
    result = cli(root, "run", "--detach", "--bundle", bundle, "--pid-file", base / "pid", "box", io=base / "io")
    assert result.returncode == 0, result.stderr
    owner = int((base / "pid").read_text())
    state = json.loads((root / "box" / "state.json").read_text())
    qemu = qemu_of(owner)
    yield {"root": root, "owner": owner, "qemu": qemu, "backend": backend_of(owner), "run_dir": Path(state["run_dir"]),
           "base": base}
    if (root / "box").exists():
        cli(root, "delete", "--force", "box")
    assert_nothing_left(root)


def test_qemu_runs_unprivileged_under_its_filter(box):
    status = status_of(box["qemu"])
    uids, gids = status["Uid"].split(), status["Gid"].split()
    assert len(set(uids)) == 1 and len(set(gids)) == 1, (uids, gids)      # real, effective, saved, fs alike
    assert int(uids[0]) == int(gids[0]) == jail.jail_id(box["qemu"]) != 0
    assert status["Groups"] == ""
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status[key])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    # QEMU is pid 1 of a pid namespace of its own, and the owner's child.
    assert status["NSpid"].split()[-1] == "1" and int(status["PPid"]) == box["owner"]


def test_qemu_has_namespaces_of_its_own_and_the_sandboxs_network(box):
    ours = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in (*NAMESPACES, "net")}
    theirs = {ns: os.readlink(f"/proc/{box['qemu']}/ns/{ns}") for ns in (*NAMESPACES, "net")}
    for ns in NAMESPACES:
        assert theirs[ns] != ours[ns], ns
    assert theirs["net"] == os.readlink(f"/proc/{box['owner']}/ns/net")


def test_qemus_root_holds_only_what_the_vm_needs(box):
    qemu = box["qemu"]
    root = Path(f"/proc/{qemu}/root")
    top = os.stat(f"{root}/")
    assert (top.st_dev, top.st_ino) != (os.stat("/").st_dev, os.stat("/").st_ino)
    # Every path in the jail's own (tmpfs) tree; what is mounted on it is a leaf.
    leaves, dirs = set(), set()
    for directory, subdirs, files in os.walk(root):
        inside = "/" + os.path.relpath(directory, root) if directory != str(root) else "/"
        for name in list(subdirs):
            path = os.path.join(directory, name)
            if os.lstat(path).st_dev != top.st_dev:
                leaves.add(os.path.normpath(os.path.join(inside, name)))
                subdirs.remove(name)
            else:
                dirs.add(os.path.normpath(os.path.join(inside, name)))
        for name in files:
            leaves.add(os.path.normpath(os.path.join(inside, name)))
    argv = argv_of(qemu)
    binary = jail.qemu_binary(QEMU_BINARY)
    needed = {binary, *jail.runtime_paths(binary), argv[argv.index("-kernel") + 1],
              "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}
    for option in ("-initrd",):
        if option in argv:
            needed.add(argv[argv.index(option) + 1])
    for i, arg in enumerate(argv):
        if arg == "-drive":
            needed.add(jail.split_options(argv[i + 1])[0].removeprefix("file="))
        if arg == "-chardev" and argv[i + 1].startswith("file,"):
            needed.add(jail.split_options(argv[i + 1])[2].removeprefix("path="))
    if "kvm" in argv[argv.index("-accel") + 1]:
        needed.add("/dev/kvm")
    assert leaves == needed
    # The directories are only the ways to those.
    assert all(any(leaf.startswith(d + "/") for leaf in leaves) for d in dirs), dirs
    # No share, no socket, nothing of the run directory but the console log.
    run_dir = box["run_dir"]
    assert [leaf for leaf in leaves if leaf.startswith(str(run_dir))] == [str(run_dir / "console.log")]
    assert not any(stat.S_ISSOCK(os.lstat(root / leaf.lstrip("/")).st_mode) for leaf in leaves)
    for node in ("null", "urandom"):
        assert stat.S_ISCHR(os.lstat(root / "dev" / node).st_mode)
    # The jail's root is read-only for QEMU, the libraries too.
    mounts = Path(f"/proc/{qemu}/mountinfo").read_text().splitlines()
    by_point = {line.split()[4]: line.split()[5].split(",") for line in mounts}
    assert "ro" in by_point["/"] and "ro" in by_point[binary]
    assert "rw" in by_point[str(run_dir / "console.log")]
    # Everything it talks to arrived as a file descriptor.
    assert not any("path=" in arg for arg in argv if arg.startswith("socket,"))


def test_the_vsock_back_end_is_jailed_too(box):
    """The back end maps the guest's RAM and parses its virtqueues: an
    unprivileged uid of its own, no capabilities, no_new_privs, its seccomp
    filter, pid 1 of its
    own pid namespace (the owner's child), new mount, ipc, uts and network
    namespaces, and an empty read-only root; and it serves the container."""
    backend = box["backend"]
    status = status_of(backend)
    uids, gids = status["Uid"].split(), status["Gid"].split()
    assert set(uids) == set(gids) == {str(jail.jail_id(backend))}, (uids, gids)
    assert status["Groups"] == ""
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status[key])
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert status["NSpid"].split()[-1] == "1" and int(status["PPid"]) == box["owner"]
    for ns in (*NAMESPACES, "net"):
        assert os.readlink(f"/proc/{backend}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    root = Path(f"/proc/{backend}/root")
    assert os.stat(f"{root}/").st_ino != os.stat("/").st_ino or os.stat(f"{root}/").st_dev != os.stat("/").st_dev
    assert sorted(p.name for p in root.iterdir()) == ["dev"] and list((root / "dev").iterdir()) == []
    mounts = Path(f"/proc/{backend}/mountinfo").read_text().splitlines()
    assert "ro" in {line.split()[4]: line.split()[5].split(",") for line in mounts}["/"]
    result = cli(box["root"], "exec", "box", "echo", "through-the-jailed-back-end")
    assert result.returncode == 0 and result.stdout == b"through-the-jailed-back-end\n", result


def test_the_posture_probes_find_this_qemu_and_it_holds(box):
    found = posture_probes.boundary_process(str(box["root"] / "box"), box["root"])
    assert found is not None and found[0] == box["qemu"], found


def test_state_ps_pause_and_resume_work_with_the_jailed_qemu(box):
    root = box["root"]
    assert json.loads(cli(root, "state", "box").stdout)["status"] == "running"
    ps = cli(root, "ps", "box")
    assert ps.returncode == 0 and b"sleep" in ps.stdout, ps.stderr
    assert cli(root, "pause", "box").returncode == 0
    assert status_of(box["qemu"])["State"].startswith("S")     # stopped vCPUs, the process still there
    assert json.loads(cli(root, "state", "box").stdout)["status"] == "paused"
    assert cli(root, "resume", "box").returncode == 0
    result = cli(root, "exec", "box", "echo", "alive")
    assert (result.returncode, result.stdout) == (0, b"alive\n"), result.stderr


def test_after_delete_nothing_of_the_jail_is_left(box):
    root, run_dir, qemu = box["root"], box["run_dir"], box["qemu"]
    uid = jail.jail_id(qemu)
    result = cli(root, "delete", "--force", "box")
    assert result.returncode == 0, result.stderr
    reap(box["owner"])
    assert not run_dir.exists()
    assert str(run_dir) not in Path("/proc/self/mountinfo").read_text()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                assert Path(f"/proc/{entry}/status").read_text().find(f"\t{uid}\t") < 0, f"pid {entry} runs as {uid}"
            except FileNotFoundError:
                continue
    assert_nothing_left(root)
