"""The agent's process finalisation (credentials.py) on the host, as root, in
forked children: what the exec'd program sees of its user, groups, umask,
rlimits, oom_score_adj, capabilities and no_new_privs, and the refusals of
validate()."""

from __future__ import annotations

import os

import pytest

from kata_py.protocol import messages
from tests.agent_child import BUSYBOX, cap_hex, cap_mask, credentials, run, status_fields

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sets credentials: needs root")

REPORT = ('cat /proc/self/status; echo "umask=$(umask)"; echo "nofile=$(ulimit -n) $(ulimit -Hn)"; '
          'echo "oom=$(cat /proc/self/oom_score_adj)"')


def report(security: dict) -> tuple[dict, dict]:
    """(/proc/self/status fields, the extra key=value lines) of a shell run with `security`."""
    status, out = run([BUSYBOX, "sh", "-c", REPORT], security)
    assert status == 0, out
    extra = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and ":\t" not in line)
    return status_fields(out), extra


def own_status() -> dict:
    with open("/proc/self/status") as f:
        return status_fields(f.read())


def test_a_non_root_process_gets_every_field():
    caps = {"bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
            "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
            "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
            "inheritable": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
            "ambient": ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]}
    security = {"user": {"uid": 1000, "gid": 1001, "additional_gids": [2000, 3000]}, "umask": 0o027,
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 1234}],
                "capabilities": caps, "no_new_privileges": True, "oom_score_adj": 300}
    fields, extra = report(security)
    assert fields["Uid"].split() == ["1000"] * 4 and fields["Gid"].split() == ["1001"] * 4
    assert sorted(fields["Groups"].split()) == ["2000", "3000"]
    assert extra == {"umask": "0027", "nofile": "1000 1234", "oom": "300"}
    # A non-root exec without file capabilities: permitted = effective = ambient.
    assert fields["CapInh"] == cap_hex(cap_mask(caps["inheritable"]))
    assert fields["CapPrm"] == fields["CapEff"] == fields["CapAmb"] == cap_hex(cap_mask(caps["ambient"]))
    assert fields["CapBnd"] == cap_hex(cap_mask(caps["bounding"]))
    assert fields["NoNewPrivs"] == "1"


def test_root_without_capabilities_keeps_what_it_had():
    fields, extra = report({"umask": 0o077})
    mine = own_status()
    for name in ("CapPrm", "CapEff", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Uid", "Gid"):
        assert fields[name] == mine[name], name
    assert extra["umask"] == "0077"


def test_root_gets_its_bounding_set_at_exec():
    # For uid 0 the kernel sets permitted and effective to inheritable | bounding at
    # exec (no file capabilities needed); ambient is cleared.
    caps = {"bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID"], "effective": ["CAP_CHOWN"],
            "permitted": ["CAP_CHOWN"], "inheritable": ["CAP_KILL"], "ambient": []}
    fields, _ = report({"capabilities": caps})
    expected = cap_mask(caps["bounding"]) | cap_mask(caps["inheritable"])
    assert fields["CapPrm"] == fields["CapEff"] == cap_hex(expected)
    assert fields["CapBnd"] == cap_hex(cap_mask(caps["bounding"]))
    assert fields["CapInh"] == cap_hex(cap_mask(caps["inheritable"]))
    assert fields["NoNewPrivs"] == "0"


def test_missing_sets_are_empty():
    fields, _ = report({"user": {"uid": 1000, "gid": 1000}, "capabilities": {"bounding": ["CAP_KILL"]}})
    assert fields["CapBnd"] == cap_hex(cap_mask(["CAP_KILL"]))
    for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert fields[name] == cap_hex(0), name


def test_ambient_without_inheritable_is_left_out():
    # The kernel refuses to raise it; runc only warns, so the process still runs.
    caps = {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "ambient": ["CAP_KILL"]}
    fields, _ = report({"user": {"uid": 1000, "gid": 1000}, "capabilities": caps})
    assert fields["CapAmb"] == fields["CapPrm"] == cap_hex(0)


def test_a_soft_limit_equal_to_a_low_hard_limit():
    _, extra = report({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 64},
                                   {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]})
    assert extra["nofile"] == "64 64"


def test_a_failing_step_is_named():
    # inheritable must stay within the bounding set (or the old inheritable set).
    from kata_agent.spawn import SpawnError

    caps = {"bounding": ["CAP_KILL"], "inheritable": ["CAP_CHOWN"]}
    with pytest.raises(SpawnError) as info:
        run([BUSYBOX, "true"], {"capabilities": caps})
    assert info.value.errno == 1 and "capset" in info.value.strerror


@pytest.mark.parametrize("security,message", [
    ({"capabilities": {"bounding": ["CAP_NOT_A_CAP"]}}, "unknown capability 'CAP_NOT_A_CAP'"),
    ({"capabilities": {"ambient": ["chown"]}}, "unknown capability 'chown'"),
    ({"capabilities": {"sideways": []}}, "unknown sets"),
    ({"capabilities": {"effective": ["CAP_KILL"], "permitted": []}}, "effective has capabilities that permitted lacks"),
    ({"rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]}, "unknown rlimit type"),
    ({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]}, "above its hard limit"),
    ({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}] * 2}, "given twice"),
    ({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1}]}, "soft"),
    ({"umask": 0o10000}, "umask"),
    ({"oom_score_adj": 1001}, "oom_score_adj"),
    ({"no_new_privileges": "yes"}, "no_new_privileges"),
    ({"user": {"uid": 0}}, "user.gid"),
    ({"user": {"uid": 0, "gid": 0, "additional_gids": [-1]}}, "additional_gids"),
    ({"sideways": 1}, "unknown process fields"),
])
def test_validate_refuses_clearly(security, message):
    with pytest.raises(ValueError, match=message):
        credentials.validate(security)
    with pytest.raises(ValueError, match=message):
        credentials.finalize(security)


def test_every_name_the_protocol_admits_is_known():
    assert list(messages.RLIMIT_TYPES) == list(credentials.RLIMITS)
    assert list(messages.CAP_SETS) == list(credentials.CAP_SETS)
    assert set(credentials.KEYS) == set(messages.PROCESS_SECURITY) | {"user"}
    assert credentials.CAP_NUMBERS["CAP_CHOWN"] == 0 and credentials.CAP_NUMBERS["CAP_CHECKPOINT_RESTORE"] == 40
    assert credentials.CAP_NUMBERS["CAP_SYS_ADMIN"] == 21 and credentials.CAP_NUMBERS["CAP_NET_RAW"] == 13


def test_nothing_is_imported_in_the_child(monkeypatch):
    # After the container's chroot no module can be imported: the finalizer
    # must not try (a stub import that fails stands in for the missing stdlib).
    import builtins

    finish = credentials.finalize({"user": {"uid": 1000, "gid": 1000}, "umask": 0o022, "oom_score_adj": 10,
                                   "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 100}],
                                   "capabilities": {"bounding": ["CAP_KILL"]}, "no_new_privileges": True})
    pid = os.fork()
    if pid == 0:
        def no_import(*args, **kwargs):
            os._exit(3)
        builtins.__import__ = no_import
        try:
            finish.early()
            finish()
        except BaseException:
            os._exit(2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
