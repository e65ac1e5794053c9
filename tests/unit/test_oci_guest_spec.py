"""OCI config -> create_container request, and the container share's host
side (real bind mounts, in a forked child's private mount namespace)."""

import json
import os
from pathlib import Path

import pytest

from kata_py.errors import ConfigError
from kata_py.oci import share as share_mod
from kata_py.sandbox import share as sandbox_share
from kata_py.oci.guest_spec import create_container_args
from kata_py.protocol.messages import REQUESTS
from kata_py.protocol.schema import validate


class ListShare:
    """Records what would be shared."""

    def __init__(self) -> None:
        self.added = []

    def add(self, source, readonly=False, recursive=True, name=None):
        self.added.append((source, readonly, recursive))
        return f"m{len(self.added) - 1}"


def config(**linux):
    return {
        "ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": True}, "hostname": "h",
        "domainname": "example.org",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind", "ro"]},
                   {"destination": "/etc/hosts", "source": "hosts", "options": ["bind"]},
                   {"destination": "/dev/fuse", "type": "bind", "source": "/dev/null", "options": ["bind"]}],
        "linux": dict({"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
                                      {"type": "ipc"}]}, **linux),
    }


def test_translation(tmp_path):
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    recorder = ListShare()
    args = create_container_args("c-1", config(
        sysctl={"net.ipv4.ip_forward": "1"}, maskedPaths=["/proc/kcore"], readonlyPaths=["/proc/sys"],
        rootfsPropagation="rslave", uidMappings=[{"containerID": 0, "hostID": 1000, "size": 10}],
        devices=[{"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "fileMode": 0o600}]),
        str(tmp_path), recorder, no_pivot=True)
    validate(args, REQUESTS["create_container"][0], "/args")
    # Network is the VM's own; a mount namespace always.
    assert args["namespaces"] == ["ipc", "mount", "pid"]
    assert args["mounts"][0] == {"destination": "/proc", "type": "proc", "source": "proc", "options": []}
    assert args["mounts"][1] == {"destination": "/data", "type": "bind", "from": "share", "source": "m0",
                                 "options": ["rbind", "ro"]}
    assert args["mounts"][2]["from"] == "share" and args["mounts"][2]["source"] == "m1"
    assert args["mounts"][3]["from"] == "guest" and args["mounts"][3]["source"] == "/dev/null"
    assert recorder.added == [("/tmp", True, True), (str(tmp_path / "hosts"), False, False)]
    assert args["uid_mappings"] == [{"container_id": 0, "host_id": 1000, "size": 10}]
    assert args["devices"] == [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "file_mode": 0o600}]
    assert args["no_pivot"] is True and args["readonly"] is True and args["rootfs_path"] == "rootfs"
    assert (args["domainname"], args["rootfs_propagation"], args["sysctl"]) == \
        ("example.org", "rslave", [{"key": "net.ipv4.ip_forward", "value": "1"}])


def test_user_namespace_needs_mappings(tmp_path):
    (tmp_path / "hosts").write_text("")
    cfg = config()
    cfg["linux"]["namespaces"].append({"type": "user"})
    with pytest.raises(ConfigError, match="uidMappings"):
        create_container_args("c-1", cfg, str(tmp_path), ListShare())


def test_missing_bind_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="/mounts/2/source"):
        create_container_args("c-1", config(), str(tmp_path), ListShare())  # no bundle/hosts


def test_sandbox_dirs_are_fixed_by_root_and_id(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_RUN_DIR", str(tmp_path))
    for where in (share_mod.owner_dir_for, share_mod.sandbox_dir_for):
        a = where("/state", "c1")
        assert a == where("/state/", "c1") and a.parent == tmp_path
        assert a != where("/state", "c2") and a != where("/other", "c1")
    assert len(share_mod.sandbox_id_for("/state", "x" * 1024)) <= 32


def test_planned_share_names_binds_as_the_export_will(tmp_path):
    """create plans the binds; the owner binds them in the same order under
    the same names (a ContainerShare names them m0, m1, ... too)."""
    from kata_py.sandbox.single import PlannedShare

    (tmp_path / "hosts").write_text("")
    (tmp_path / "d").mkdir()
    cfg = config()
    cfg["mounts"].append({"destination": "/d", "type": "bind", "source": str(tmp_path / "d"),
                          "options": ["rbind", "ro"]})
    planned = PlannedShare()
    args = create_container_args("c-1", cfg, str(tmp_path), planned)
    shared = [m for m in args["mounts"] if m.get("from") == "share"]
    assert [m["source"] for m in shared] == [b["name"] for b in planned.binds] == ["m0", "m1", "m2"]
    assert planned.binds[2] == {"source": str(tmp_path / "d"), "name": "m2", "readonly": True, "recursive": True}


def _in_private_namespace(fn) -> dict:
    """Run fn() in a forked child with its own mount namespace; return its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            sandbox_share.enter_private_mount_namespace()
            result = {"ok": fn()}
        except BaseException as exc:  # report, never return into pytest
            result = {"error": repr(exc)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_share_binds_are_private_confined_and_removable(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("hello")
    single = tmp_path / "single"
    single.write_text("one file")
    (tmp_path / "secret").write_text("not shared")
    path = tmp_path / "run" / "share-x"

    def inside():
        sh = sandbox_share.ContainerShare(path)
        rootfs = sh.add(str(data), name=share_mod.ROOTFS_ENTRY)
        ro = sh.add(str(data), readonly=True)
        one = sh.add(str(single))
        seen = {"rootfs": (path / rootfs / "f").read_text(), "file": (path / one).read_text(),
                "entries": sorted(os.listdir(path))}
        try:
            (path / ro / "new").write_text("x")
            seen["ro_write"] = "allowed"
        except OSError as exc:
            seen["ro_write"] = exc.errno
        sandbox_share.remove_share_dir(path)
        seen["removed"] = not path.exists()
        seen["source_intact"] = (data / "f").read_text()
        return seen

    seen = _in_private_namespace(inside)
    assert seen == {"rootfs": "hello", "file": "one file", "entries": ["m0", "m1", "rootfs"], "ro_write": 30,
                    "removed": True, "source_intact": "hello"}
    # The binds never existed in this (the host's) namespace; sources untouched.
    assert not path.exists() and (data / "f").read_text() == "hello" and single.read_text() == "one file"


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_leftover_share_dir_is_removed_without_touching_sources(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep").write_text("x")
    path = tmp_path / "share-y"

    def inside():
        sh = sandbox_share.ContainerShare(path)
        sh.add(str(data), name="rootfs")
        # As if the monitor had been killed: the namespace goes, the entries stay.
        return True

    _in_private_namespace(inside)
    assert sorted(os.listdir(path)) == ["rootfs"] and os.listdir(path / "rootfs") == []
    sandbox_share.remove_share_dir(path)
    assert not path.exists() and (data / "keep").exists()


def test_features_report_what_the_agent_implements():
    from kata_py.cli.features import features

    linux = features()["linux"]
    assert {"pid", "user", "mount", "cgroup"} <= set(linux["namespaces"])
    assert linux["capabilities"][0] == "CAP_CHOWN" and "CAP_SYS_ADMIN" in linux["capabilities"]
    assert linux["seccomp"]["enabled"] and "SCMP_ACT_ERRNO" in linux["seccomp"]["actions"]
    assert "SCMP_ARCH_X86_64" in linux["seccomp"]["archs"]
    assert {"rbind", "nosuid", "rslave"} <= set(features()["mountOptions"])
