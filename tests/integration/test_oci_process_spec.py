"""The spec's process-level fields and linux.seccomp, applied by the agent in
a real guest and read back from inside the container: user and groups,
umask, rlimits, oomScoreAdj, the five capability sets, noNewPrivileges, and a
seccomp profile that denies mkdir. Then `exec`: what it takes from the
container's process, `--cap`, and a --process of its own.

One container (one VM) serves every check; its init reports first, then each
exec reports for itself.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.agent_child import cap_hex, cap_mask, status_fields
from tests.bundles import DEFAULT_MOUNTS, make_bundle
from tests.oci_helpers import assert_nothing_left, cli

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("subreaper")]

UID, GID, GROUPS = 1000, 1000, [2000, 3000]
CAPS = {"bounding": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
        "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
        "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
        "inheritable": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
        "ambient": ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]}
NOFILE = 1234
OOM_SCORE_ADJ = 300
UMASK = 0o027
SECCOMP = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
           "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}

# /tmp is a tmpfs anyone may write: mkdir there fails only if the filter says so.
REPORT = ("cat /proc/self/status; echo ulimit=$(ulimit -n); echo umask=$(umask); echo id=$(id); "
          "echo oom=$(cat /proc/self/oom_score_adj); mkdir /tmp/x-$$ 2>&1; echo mkdir=$?; "
          "touch /tmp/file-$$ && echo touch=ok")
INIT = REPORT + "; echo pwd=$(pwd); echo spec_env=$SPEC_ENV; echo init-done; exec sleep 100000"


def expected_caps(caps: dict) -> dict:
    """/proc/self/status for a non-root process exec'd without file capabilities:
    permitted and effective are its ambient set (what the kernel keeps of it)."""
    ambient = cap_mask(caps.get("ambient", [])) & cap_mask(caps.get("permitted", [])) \
        & cap_mask(caps.get("inheritable", []))
    return {"CapInh": cap_hex(cap_mask(caps.get("inheritable", []))), "CapPrm": cap_hex(ambient),
            "CapEff": cap_hex(ambient), "CapBnd": cap_hex(cap_mask(caps.get("bounding", []))),
            "CapAmb": cap_hex(ambient)}


def parse(out: str) -> tuple[dict, dict]:
    extra = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and ":\t" not in line)
    return status_fields(out), extra


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    base = tmp_path_factory.mktemp("process-spec")
    process = {"terminal": False, "args": ["sh", "-c", INIT], "env": ["PATH=/bin", "SPEC_ENV=from the spec"],
               "cwd": "/etc",
               "user": {"uid": UID, "gid": GID, "additionalGids": GROUPS, "umask": UMASK},
               "capabilities": CAPS, "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE}],
               "noNewPrivileges": True, "oomScoreAdj": OOM_SCORE_ADJ}
    mounts = DEFAULT_MOUNTS + [{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                                "options": ["nosuid", "nodev", "mode=1777", "size=1m"]}]
    linux = {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")], "seccomp": SECCOMP}
    bundle = make_bundle(base / "bundle", [], process=process, mounts=mounts, linux=linux)
    root, out_path = base / "root", base / "out"
    with open(out_path, "wb") as out, open(base / "err", "wb") as err:
        result = cli(root, "run", "--detach", "--bundle", bundle, "ps1", stdout=out, stderr=err)
    assert result.returncode == 0, (base / "err").read_text()
    deadline = time.monotonic() + 120
    while b"init-done" not in out_path.read_bytes():
        assert time.monotonic() < deadline, out_path.read_text()
        time.sleep(0.2)
    yield {"root": root, "init": out_path.read_text(), "base": base}
    cli(root, "delete", "--force", "ps1")
    assert_nothing_left(root)


def exec_report(box, *options) -> tuple[dict, dict, str]:
    result = cli(box["root"], "exec", *options, "ps1", "sh", "-c", REPORT)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    return (*parse(out), out)


def test_the_init_process_gets_the_whole_spec(box):
    fields, extra = parse(box["init"])
    for name, value in expected_caps(CAPS).items():
        assert fields[name] == value, (name, box["init"])
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    assert fields["Uid"].split() == [str(UID)] * 4 and fields["Gid"].split() == [str(GID)] * 4
    assert sorted(map(int, fields["Groups"].split())) == GROUPS
    assert extra["ulimit"] == str(NOFILE)
    assert extra["umask"] == f"{UMASK:04o}"
    assert extra["oom"] == str(OOM_SCORE_ADJ)
    assert extra["id"].startswith(f"uid={UID} gid={GID} groups=")
    assert sorted(int(g) for g in extra["id"].split("groups=")[1].split(",")) == GROUPS
    assert "Operation not permitted" in box["init"] and extra["mkdir"] == "1"
    assert extra["touch"] == "ok"  # the filter denies mkdir, not writing to /tmp
    assert extra["pwd"] == "/etc" and extra["spec_env"] == "from the spec"


def test_exec_takes_the_containers_process_fields(box):
    fields, extra, out = exec_report(box, "--user", f"{UID}:{GID}", "-g", str(GROUPS[0]), "-g", str(GROUPS[1]))
    for name, value in expected_caps(CAPS).items():
        assert fields[name] == value, name
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    assert sorted(map(int, fields["Groups"].split())) == GROUPS
    assert extra["ulimit"] == str(NOFILE) and extra["oom"] == str(OOM_SCORE_ADJ)
    assert "Operation not permitted" in out and extra["mkdir"] == "1" and extra["touch"] == "ok"


def test_exec_cap_extends_the_bounding_set(box):
    fields, _, _ = exec_report(box, "--user", f"{UID}:{GID}", "--cap", "CAP_SYS_ADMIN")
    caps = dict(CAPS, bounding=CAPS["bounding"] + ["CAP_SYS_ADMIN"])
    # Added to bounding, effective and permitted (and ambient, which the kernel
    # keeps only for what is inheritable too: so not for CAP_SYS_ADMIN).
    for name, value in expected_caps(caps).items():
        assert fields[name] == value, name


def test_exec_with_its_own_process_json(box):
    # Its own capabilities (none) and no_new_privs off; the container's filter
    # still applies (loaded while the process may still load one).
    process = {"args": ["sh", "-c", REPORT], "cwd": "/", "env": ["PATH=/bin"],
               "user": {"uid": UID, "gid": GID}, "capabilities": {}, "noNewPrivileges": False}
    path = box["base"] / "process.json"
    path.write_text(json.dumps(process))
    result = cli(box["root"], "exec", "--process", path, "ps1")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    fields, extra = parse(out)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[name] == cap_hex(0), name
    assert fields["NoNewPrivs"] == "0" and fields["Seccomp"] == "2"
    assert extra["ulimit"] == str(NOFILE)  # rlimits not given: the container's
    assert extra["umask"] == "0022" and "Operation not permitted" in out and extra["mkdir"] == "1"


def test_exec_refuses_an_unknown_capability(box):
    result = cli(box["root"], "exec", "--cap", "CAP_BOGUS", "ps1", "true")
    assert result.returncode == 255  # runc: an exec that fails before it runs
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "CAP_BOGUS" in lines[0], lines
