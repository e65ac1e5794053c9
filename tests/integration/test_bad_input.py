"""Bad input at the CLI: each case is one clear line on stderr, exit status 1, a JSON
error record in --log, and nothing left behind (no state directory entry, no run
directory, no monitor or QEMU, no temp file, nothing new in the bundle).

Every case fails before a VM would boot, so the whole corpus is cheap. runc is the
reference for what is refused: ids (libcontainer's validateID: letters, digits, _ + - .,
not . or ..) and the spec checks; kata-py also caps the id at 255 characters (it is a
directory name), the config at 4 MiB and its nesting at 64 levels, refuses NUL in any
string, and keeps paths that name something inside the bundle from resolving out of it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest

from kata_py.errors import ConfigError
from kata_py.oci.state import validate_id
from tests.conftest import RUN_DIR, qemu_processes_under
from tests.oci_helpers import cli, monitors_under

BASE = {"ociVersion": "1.0.2", "process": {"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/bin"],
                                           "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"}, "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}


def config_with(**changes) -> dict:
    config = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return config


DELETE = object()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.bundle = tmp / "bundle"
        self.outside = tmp / "outside"
        self.private_tmp = tmp / "tmp"
        self.log = tmp / "log.json"
        for d in (self.bundle / "rootfs", self.outside, self.private_tmp):
            d.mkdir(parents=True)
        (self.outside / "secret").write_text("host file\n")
        self.write_config(BASE)

    def write_config(self, config) -> None:
        data = config if isinstance(config, bytes) else json.dumps(config).encode()
        (self.bundle / "config.json").write_bytes(data)

    def snapshot(self) -> dict:
        def names(d: Path) -> list[str]:
            return sorted(p.name for p in d.iterdir()) if d.exists() else []
        return {"root": names(self.root), "run": names(RUN_DIR), "tmp": names(self.private_tmp),
                "bundle": sorted(str(p.relative_to(self.bundle)) for p in self.bundle.rglob("*")),
                "dir": names(self.tmp)}

    def cli(self, *args, log: bool = True) -> subprocess.CompletedProcess:
        return cli(self.root, *args, log=self.log if log else None, env=dict(os.environ, TMPDIR=str(self.private_tmp)),
                   cwd=self.tmp)


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path)
    yield env
    # A case that was wrongly accepted has a container (and a VM): take it down.
    if env.root.is_dir():
        for entry in env.root.iterdir():
            env.cli("delete", "--force", entry.name, log=False)


def refused(env: Env, *args, match: str, log: bool = True) -> str:
    """Run a command that must be refused; check the whole contract; the message."""
    before = env.snapshot()
    if log and env.log.exists():
        env.log.unlink()
        before = env.snapshot()
    result = env.cli(*args, log=log)
    stderr = result.stderr.decode("utf-8", "replace")
    # exec fails with 255 as runc's does: its own status is the process's.
    assert result.returncode == (255 if "exec" in args else 1), (result.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), f"expected one line on stderr, got {stderr!r}"
    assert lines[0].startswith("kata-py: ") and match in lines[0], lines[0]
    assert len(lines[0]) < 400, "one line, not a dump"
    assert result.stdout == b""
    if log:
        records = [json.loads(line) for line in env.log.read_text().splitlines()]
        errors = [r for r in records if r["level"] == "error"]
        assert errors and errors[-1]["msg"] == lines[0][len("kata-py: "):], records
        before["dir"] = sorted(set(before["dir"]) | {env.log.name})
    assert env.snapshot() == before
    assert monitors_under(env.root) == []
    assert qemu_processes_under(RUN_DIR) == [] or not any(
        str(env.root) in Path(f"/proc/{pid}/cmdline").read_text() for pid in qemu_processes_under(RUN_DIR))
    return lines[0]


# -- config.json ------------------------------------------------------------------

SCHEMA_CASES = {
    # missing required members
    "missing ociVersion": (config_with(ociVersion=DELETE), "/ociVersion: required"),
    "missing root": (config_with(root=DELETE), "/root: required"),
    "missing root.path": (config_with(root__path=DELETE), "/root/path: required"),
    "missing process.cwd": (config_with(process__cwd=DELETE), "/process/cwd: required"),
    "missing process.args": (config_with(process__args=DELETE), "/process/args"),
    "empty process.args": (config_with(process__args=[]), "/process/args"),
    "missing mount destination": (config_with(mounts=[{"type": "proc", "source": "proc"}]),
                                  "/mounts/0/destination: required"),
    "missing namespace type": (config_with(linux__namespaces=[{}]), "/linux/namespaces/0/type: required"),
    # wrong types
    "args is a string": (config_with(process__args="/bin/true"), "/process/args: "),
    "root is a string": (config_with(root="rootfs"), "/root: "),
    "uid is a string": (config_with(process__user__uid="0"), "/process/user/uid: "),
    "terminal is a string": (config_with(process__terminal="yes"), "/process/terminal: "),
    "env is an object": (config_with(process__env={"PATH": "/bin"}), "/process/env: "),
    "mounts is an object": (config_with(mounts={"destination": "/x"}), "/mounts: "),
    "hostname is a number": (config_with(hostname=7), "/hostname: "),
    "annotation value is a number": (config_with(annotations={"a": 1}), "/annotations/a: "),
    "ociVersion is a number": (config_with(ociVersion=1), "/ociVersion: "),
    # out of range, not one of
    "uid is negative": (config_with(process__user__uid=-1), "/process/user/uid: "),
    "uid above 2^32": (config_with(process__user__uid=2**32), "/process/user/uid: "),
    "unknown namespace": (config_with(linux__namespaces=[{"type": "bogus"}]), "/linux/namespaces/0/type: "),
    "duplicate namespace": (config_with(linux__namespaces=[{"type": "pid"}, {"type": "pid"}]),
                            "/linux/namespaces/1: namespace 'pid' given twice"),
    # ociVersion
    "ociVersion 2.0.0": (config_with(ociVersion="2.0.0"), "/ociVersion: unsupported version"),
    "ociVersion 0.9.0": (config_with(ociVersion="0.9.0"), "/ociVersion: unsupported version"),
    "ociVersion banana": (config_with(ociVersion="banana"), "/ociVersion: unsupported version"),
    "ociVersion empty": (config_with(ociVersion=""), "/ociVersion: unsupported version"),
    # paths
    "relative cwd": (config_with(process__cwd="tmp"), "/process/cwd: must be an absolute path"),
    "relative mount destination": (config_with(mounts__0__destination="proc"),
                                   "/mounts/0/destination: must be an absolute path"),
    "escaping mount destination": (config_with(mounts__0__destination="/a/../../etc"),
                                   "/mounts/0/destination: must not contain '..'"),
    "mount destination /..": (config_with(mounts__0__destination="/.."), "/mounts/0/destination: "),
    "empty mount destination": (config_with(mounts__0__destination=""), "/mounts/0/destination: "),
    # NUL: the kernel would cut these strings short
    "NUL in args": (config_with(process__args=["/bin/tr\0ue"]), "/process/args/0: contains a NUL"),
    "NUL in env": (config_with(process__env=["A=\0"]), "/process/env/0: contains a NUL"),
    "NUL in mount destination": (config_with(mounts__0__destination="/pr\0oc"), "/mounts/0/destination: "),
    "NUL in root.path": (config_with(root__path="root\0fs"), "/root/path: contains a NUL"),
    "NUL in an annotation key": (config_with(annotations={"a\0b": "c"}), "/annotations: a key contains a NUL"),
    # nesting below the JSON parser's own limit, but far beyond any real config
    "nested 200 levels": (config_with(x=json.loads("[" * 200 + "]" * 200)), "nested more than 64 levels"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_malformed_config(env, case):
    config, match = SCHEMA_CASES[case]
    env.write_config(config)
    message = refused(env, "create", "--bundle", env.bundle, "c1", match=match)
    assert "config.json" in message


RAW_CASES = {
    "empty file": (b"", "invalid JSON at line 1 column 1"),
    "truncated": (json.dumps(BASE).encode()[:40], "invalid JSON at line 1"),
    "trailing garbage": (json.dumps(BASE).encode() + b"}", "invalid JSON"),
    "a list": (b"[1, 2]", "config.json /: expected an object, got list"),
    "a string": (b'"config"', "expected an object, got str"),
    "null": (b"null", "expected an object, got NoneType"),
    "invalid UTF-8": (json.dumps(BASE).encode().replace(b"/bin/true", b"/bin/\xff\xfe"), "not UTF-8"),
    "UTF-16": (json.dumps(BASE).encode("utf-16"), "not UTF-8"),
    "UTF-8 with a BOM": (b"\xef\xbb\xbf" + json.dumps(BASE).encode(), "invalid JSON"),
    "lone surrogate escape is fine JSON, but NUL is not": (
        json.dumps(config_with(hostname="a\0")).encode(), "/hostname: contains a NUL"),
    "NaN": (json.dumps(BASE).encode().replace(b'"uid": 0', b'"uid": NaN'), "NaN is not a JSON number"),
    "Infinity": (json.dumps(BASE).encode().replace(b'"uid": 0', b'"uid": -Infinity'), "not a JSON number"),
    "number out of range": (json.dumps(BASE).encode().replace(b'"uid": 0', b'"uid": 1e999'), "out of range"),
    "5000-digit integer": (json.dumps(BASE).encode().replace(b'"uid": 0', b'"uid": ' + b"9" * 5000), "invalid JSON"),
    "nested 100000 levels": (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deeply"),
    "larger than 4 MiB": (json.dumps(config_with(x="a" * (5 << 20))).encode(), "larger than 4 MiB"),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_malformed_config_bytes(env, case):
    data, match = RAW_CASES[case]
    env.write_config(data)
    refused(env, "create", "--bundle", env.bundle, "c1", match=match)


def test_config_json_that_is_not_a_regular_file(env):
    config = env.bundle / "config.json"
    config.unlink()
    refused(env, "create", "--bundle", env.bundle, "c1", match="no such file (is --bundle right?)")
    config.mkdir()
    refused(env, "create", "--bundle", env.bundle, "c1", match="config.json: ")
    config.rmdir()
    # A FIFO would block open() forever; a device would be read without end.
    os.mkfifo(config)
    refused(env, "create", "--bundle", env.bundle, "c1", match="not a regular file")
    config.unlink()
    config.symlink_to("/dev/zero")
    refused(env, "create", "--bundle", env.bundle, "c1", match="not a regular file")
    config.unlink()
    refused(env, "create", "--bundle", env.tmp / "no-such-bundle", "c1", match="no such file")


# -- the bundle's paths -------------------------------------------------------------

def test_rootfs_that_leaves_the_bundle(env):
    rootfs = env.bundle / "rootfs"
    rootfs.rmdir()
    rootfs.symlink_to(env.outside)
    refused(env, "create", "--bundle", env.bundle, "c1", match="/root/path: 'rootfs' resolves outside the bundle")
    rootfs.unlink()
    rootfs.symlink_to("/")
    refused(env, "create", "--bundle", env.bundle, "c1", match="resolves outside the bundle (/)")
    rootfs.unlink()
    rootfs.mkdir()
    env.write_config(config_with(root__path="../outside"))
    refused(env, "create", "--bundle", env.bundle, "c1", match="resolves outside the bundle")
    # An absolute root.path that names the bundle's own link is held to the same rule.
    (env.bundle / "link").symlink_to(env.outside)
    env.write_config(config_with(root__path=str(env.bundle / "link")))
    refused(env, "create", "--bundle", env.bundle, "c1", match="resolves outside the bundle")
    env.write_config(config_with(root__path="missing"))
    refused(env, "create", "--bundle", env.bundle, "c1", match="is not a directory")
    (env.bundle / "file").write_text("")
    env.write_config(config_with(root__path="file"))
    refused(env, "create", "--bundle", env.bundle, "c1", match="is not a directory")


@pytest.mark.parametrize("source", ["data", "{bundle}/data", "../outside", "./sub/../../outside/secret"])
def test_bind_source_that_leaves_the_bundle(env, source):
    (env.bundle / "data").symlink_to(env.outside)
    source = source.format(bundle=env.bundle)
    env.write_config(config_with(mounts=[{"destination": "/data", "type": "bind", "source": source,
                                          "options": ["rbind", "ro"]}]))
    refused(env, "create", "--bundle", env.bundle, "c1", match="/mounts/0/source: ")


# -- container ids ------------------------------------------------------------------

BAD_IDS = [
    ("a/b", "invalid container id"),
    ("../evil", "invalid container id"),
    ("..", "invalid container id"),
    (".", "invalid container id"),
    ("a\nb", "invalid container id"),
    ("c1\n", "invalid container id"),
    ("a b", "invalid container id"),
    ("a:b", "invalid container id"),
    ("-rf", "invalid container id"),
    (".hidden", "invalid container id"),
    ("é", "invalid container id"),
    ("x" * 256, "longer than 255 characters"),
    ("x" * 1025, "longer than 255 characters"),
    ("", "container id must not be empty"),
]


@pytest.mark.parametrize("container_id, match", BAD_IDS)
def test_bad_container_ids_at_create(env, container_id, match):
    message = refused(env, "create", "--bundle", env.bundle, "--", container_id, match=match)
    assert len(message) < 200


@pytest.mark.parametrize("command", [["state"], ["delete", "--force"], ["kill"], ["start"], ["exec"], ["pause"]])
def test_bad_container_ids_elsewhere(env, command):
    for container_id, match in (BAD_IDS[0], BAD_IDS[2], BAD_IDS[4], BAD_IDS[-2]):
        refused(env, *command, "--", container_id, *(["/bin/true"] if command == ["exec"] else []), match=match)


def test_nul_in_a_container_id():
    # argv cannot carry a NUL, so this one is checked where ids are validated.
    with pytest.raises(ConfigError, match="invalid container id"):
        validate_id("a\0b")


# -- flags --------------------------------------------------------------------------

def test_bad_flags(env):
    refused(env, "create", "--bundle", env.bundle, "--pid-file", env.tmp / "no-dir" / "pid", "c1",
            match="--pid-file")
    refused(env, "create", "--bundle", env.bundle, "--pid-file", env.tmp, "c1", match="--pid-file")
    refused(env, "create", "--bundle", env.bundle, "--console-socket", env.tmp / "nope.sock", "c1",
            match="--console-socket")
    refused(env, "create", "--bundle", env.bundle, "--console-socket", env.outside / "secret", "c1",
            match="not a Unix socket")
    refused(env, "create", "--bundle", env.bundle, "--preserve-fds", "3", "c1", match="--preserve-fds")
    refused(env, "run", "--bundle", env.bundle, "--pid-file", env.tmp / "no-dir" / "pid", "c1", match="--pid-file")
    refused(env, "--log", env.tmp / "no-dir" / "log", "state", "c1", match="--log", log=False)
    refused(env, "state", "c1", match="does not exist")
    refused(env, "delete", "c1", match="does not exist")
