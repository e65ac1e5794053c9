"""config.json loading and validation, VM sizing, process objects, CLI parsing (no VM)."""

import json
import os
from pathlib import Path

import pytest

from kata_py.cli.main import build_parser
from kata_py.errors import ConfigError
from kata_py.oci.process_spec import (GUEST_OVERHEAD_MIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB, agent_container_id,
                                      parse_user, process_args, vm_size)
from kata_py.oci.spec import default_spec, load_bundle, validate_config

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema/config-schema.json").exists()
    and "KATA_PY_OCI_SCHEMA_DIR" not in os.environ,
    reason="the OCI runtime-spec schemas (golang-github-opencontainers-specs-dev) are installed by ci/setup.sh")


def minimal_config(**changes) -> dict:
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["PATH=/bin"],
                    "cwd": "/"},
        "root": {"path": "rootfs"},
    }
    config.update(changes)
    return config


def bundle(tmp_path: Path, config=None, raw: bytes | None = None) -> Path:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_bytes(raw if raw is not None else json.dumps(config or minimal_config()).encode())
    return tmp_path


def error_of(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_good_bundle(tmp_path):
    bundle_dir, config, rootfs = load_bundle(bundle(tmp_path))
    assert bundle_dir == tmp_path.resolve() and rootfs == (tmp_path / "rootfs").resolve()
    assert config["process"]["args"] == ["sh"]


def test_runc_spec_default_is_valid():
    validate_config(default_spec())


def test_missing_config(tmp_path):
    assert "config.json: no such file" in error_of(tmp_path)
    assert "config.json: no such file" in error_of(tmp_path / "not-there")


def test_bad_json_names_line_and_column(tmp_path):
    message = error_of(bundle(tmp_path, raw=b'{\n  "ociVersion": "1.0.2",\n  "root": {"path": "rootfs",}\n}\n'))
    assert "invalid JSON at line 3 column" in message


@pytest.mark.parametrize("raw,expected", [
    (b"[1, 2]", "config.json /: expected an object"),
    (b'{"ociVersion": "\xff"}', "not UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_json_that_is_not_a_config(tmp_path, raw, expected):
    assert expected in error_of(bundle(tmp_path, raw=raw))


def without(config: dict, *path):
    *parents, last = path
    target = config
    for key in parents:
        target = target[key]
    del target[last]
    return config


@pytest.mark.parametrize("mutate,json_path", [
    (lambda c: without(c, "ociVersion"), "/ociVersion"),
    (lambda c: without(c, "root", "path"), "/root/path"),
    (lambda c: without(c, "process", "cwd"), "/process/cwd"),
    (lambda c: c["process"].update(args="sh"), "/process/args"),
    (lambda c: c["process"].update(terminal="yes"), "/process/terminal"),
    (lambda c: c["process"]["user"].update(uid="zero"), "/process/user/uid"),
    (lambda c: c["process"]["user"].update(uid=-1), "/process/user/uid"),
    (lambda c: c.update(mounts=[{"destination": "/x", "source": "s", "options": "ro"}]), "/mounts/0/options"),
    (lambda c: c.update(hooks={"prestart": [{"args": ["x"]}]}), "/hooks/prestart/0/path"),
    (lambda c: c["process"].update(args=[]), "/process/args"),
    (lambda c: c["process"].update(cwd="relative"), "/process/cwd"),
    (lambda c: c.update(mounts=[{"destination": "/a/../../etc", "source": "s"}]), "/mounts/0/destination"),
    (lambda c: c.update(linux={"namespaces": [{"type": "pid"}, {"type": "pid"}]}), "/linux/namespaces/1"),
    (lambda c: without(c, "root"), "/root"),
])
def test_schema_and_semantic_errors_name_the_json_path(tmp_path, mutate, json_path):
    config = minimal_config()
    mutate(config)
    message = error_of(bundle(tmp_path, config))
    assert message.startswith(f"config.json {json_path}:"), message


@pytest.mark.parametrize("version,ok", [("1.0.2", True), ("1.0.0", True), ("1.2.0", True),
                                        ("2.0.0", False), ("0.9.0", False)])
def test_oci_version_major(tmp_path, version, ok):
    path = bundle(tmp_path, minimal_config(ociVersion=version))
    if ok:
        load_bundle(path)
    else:
        assert error_of(path).startswith("config.json /ociVersion: unsupported version")


def test_rootfs_symlink_out_of_the_bundle_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "bundle"
    inside.mkdir()
    (inside / "config.json").write_text(json.dumps(minimal_config()))
    (inside / "rootfs").symlink_to(outside)
    message = error_of(inside)
    assert message.startswith("config.json /root/path:") and "outside the bundle" in message
    # A relative path that climbs out is refused the same way.
    (inside / "config.json").write_text(json.dumps(minimal_config(root={"path": "../outside"})))
    assert "outside the bundle" in error_of(inside)


def test_rootfs_symlink_inside_the_bundle_and_absolute_paths_are_fine(tmp_path):
    (tmp_path / "real-rootfs").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(minimal_config(root={"path": "link"})))
    (tmp_path / "link").symlink_to("real-rootfs")
    assert load_bundle(tmp_path)[2] == (tmp_path / "real-rootfs").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "config.json").write_text(json.dumps(minimal_config(root={"path": str(elsewhere)})))
    assert load_bundle(tmp_path)[2] == elsewhere.resolve()


def test_rootfs_must_be_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(minimal_config()))
    assert "is not a directory" in error_of(tmp_path)
    (tmp_path / "rootfs").write_text("")
    assert "is not a directory" in error_of(tmp_path)


# -- VM size from linux.resources


@pytest.mark.parametrize("resources,memory,cpus", [
    (None, MIN_MEMORY_MIB, 1),
    ({}, MIN_MEMORY_MIB, 1),
    ({"memory": {"limit": 16 << 20}}, max(MIN_MEMORY_MIB, 16 + GUEST_OVERHEAD_MIB), 1),
    ({"memory": {"limit": 512 << 20}}, 512 + GUEST_OVERHEAD_MIB, 1),
    ({"memory": {"limit": (512 << 20) + 1}}, 513 + GUEST_OVERHEAD_MIB, 1),  # rounded up, never down
    ({"memory": {"limit": -1}}, MIN_MEMORY_MIB, 1),                       # -1: unlimited
    ({"cpu": {"quota": 50000, "period": 100000}}, MIN_MEMORY_MIB, 1),
    ({"cpu": {"quota": 150000, "period": 100000}}, MIN_MEMORY_MIB, 2),
    ({"cpu": {"quota": 200000}}, MIN_MEMORY_MIB, 2),                      # the default period is 100 ms
    ({"cpu": {"quota": -1, "period": 100000}}, MIN_MEMORY_MIB, 1),
])
def test_vm_size(resources, memory, cpus, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    config = minimal_config(linux={"resources": resources} if resources is not None else {})
    assert vm_size(config) == (memory, cpus)


def test_vm_size_caps(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert vm_size(minimal_config(linux={"resources": {"cpu": {"quota": 6400000, "period": 100000}}}))[1] == 2
    with pytest.raises(ConfigError) as info:
        vm_size(minimal_config(linux={"resources": {"memory": {"limit": MAX_MEMORY_MIB << 20}}}))
    assert str(info.value).startswith("config.json /linux/resources/memory/limit:")


# -- process objects


def test_process_args():
    args = process_args({"args": ["sh", "-c", "x"], "env": ["A=1"], "cwd": "/tmp",
                         "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6]},
                         "consoleSize": {"height": 40, "width": 120}})
    assert args == {"argv": ["sh", "-c", "x"], "env": ["A=1"], "cwd": "/tmp",
                    "user": {"uid": 1000, "gid": 100, "additional_gids": [5, 6]}, "rows": 40, "cols": 120,
                    "security": {}}
    assert process_args({"args": ["true"]})["user"] == {"uid": 0, "gid": 0, "additional_gids": []}


def test_agent_container_id_is_short_and_stable():
    long_id = "x" * 255
    assert agent_container_id(long_id) == agent_container_id(long_id)
    assert len(agent_container_id(long_id)) <= 32 and agent_container_id("a") != agent_container_id("b")


def test_parse_user():
    assert parse_user("1000") == {"uid": 1000, "gid": 0}
    assert parse_user("1000:100") == {"uid": 1000, "gid": 100}
    for bad in ("root", "1000:staff", "", ":1", "-1"):
        with pytest.raises(ConfigError):
            parse_user(bad)


# -- the command line, as runc parses it


def test_exec_command_keeps_its_own_options():
    # runc stops parsing flags at the first positional: `sh -c` belongs to sh.
    args = build_parser().parse_args(["exec", "--detach", "c1", "sh", "-c", "echo hi", "-d"])
    assert (args.command, args.container_id, args.argv, args.detach) == ("exec", "c1", ["sh", "-c", "echo hi", "-d"],
                                                                         True)
    args = build_parser().parse_args(["exec", "--process", "p.json", "c1"])
    assert (args.command, args.argv, args.process) == ("exec", [], "p.json")


def test_exec_process_spec(tmp_path):
    from kata_py.cli.exec import process_spec

    parser = build_parser()
    spec = process_spec(parser.parse_args(["exec", "-e", "A=1", "--cwd", "/tmp", "-u", "5:6", "c1", "env"]))
    assert spec["args"] == ["env"] and "A=1" in spec["env"] and spec["cwd"] == "/tmp"
    assert spec["user"] == {"uid": 5, "gid": 6}
    path = tmp_path / "process.json"
    path.write_text(json.dumps({"args": ["id"], "cwd": "/", "env": ["B=2"], "terminal": False}))
    spec = process_spec(parser.parse_args(["exec", "--process", str(path), "-e", "C=3", "c1"]))
    assert spec["args"] == ["id"] and spec["env"] == ["B=2", "C=3"]
    for bad in ([], ["--process", str(tmp_path / "missing.json")]):
        with pytest.raises(ConfigError):
            process_spec(parser.parse_args(["exec", *bad, "c1"]))
    path.write_text(json.dumps({"cwd": "/"}))
    with pytest.raises(ConfigError):
        process_spec(parser.parse_args(["exec", "--process", str(path), "c1"]))


@pytest.mark.parametrize("argv", [["kill", "c1"], ["kill", "c1", "KILL"], ["delete", "-f", "c1"],
                                  ["create", "-b", "/b", "--pid-file", "p", "--console-socket", "s", "c1"],
                                  ["run", "-d", "--bundle", "/b", "c1"], ["state", "c1"], ["pause", "c1"],
                                  ["resume", "c1"], ["start", "c1"], ["list", "-q"]])
def test_runc_style_arguments_parse(argv):
    args = build_parser().parse_args(["--root", "/r", "--log", "/l", "--log-format", "json"] + argv)
    assert args.command == argv[0] and args.root == "/r"
