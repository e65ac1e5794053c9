"""OCI process security fields and linux.seccomp -> the agent's fields, and
what an exec'd process takes from its container (runc's exec rules)."""

from __future__ import annotations

import pytest

from kata_py.errors import ConfigError
from kata_py.oci.exec_process import with_container_defaults
from kata_py.oci.process_spec import process_args, seccomp_args, security_args
from kata_py.protocol import messages

CAPS = {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"],
        "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]}


def test_every_field_maps():
    process = {"args": ["x"], "user": {"uid": 1, "gid": 2, "umask": 0o027},
               "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1234, "soft": 1000}],
               "capabilities": CAPS, "noNewPrivileges": True, "oomScoreAdj": -300}
    assert security_args(process) == {
        "umask": 0o027, "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 1234}],
        "capabilities": CAPS, "no_new_privileges": True, "oom_score_adj": -300}
    # What the agent's schema takes, as sent by create_process.
    args = process_args(process)
    messages.check_request({"id": 1, "type": "create_process", "args": {
        "process_id": "p", "argv": args["argv"], "user": args["user"], **args["security"]}})


def test_absent_fields_stay_absent_and_missing_sets_are_empty():
    assert security_args({"args": ["x"]}) == {}
    assert security_args({"args": ["x"], "capabilities": {"bounding": ["CAP_KILL"]}})["capabilities"] == {
        "bounding": ["CAP_KILL"], "effective": [], "inheritable": [], "permitted": [], "ambient": []}
    assert security_args({"args": ["x"], "noNewPrivileges": False}) == {"no_new_privileges": False}


@pytest.mark.parametrize("process,where", [
    ({"oomScoreAdj": 1001}, "process.oomScoreAdj"),
    ({"user": {"umask": 0o10000}}, "process.user.umask"),
    ({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1}]}, r"process.rlimits\[0\].soft"),
    ({"capabilities": {"bounding": "CAP_KILL"}}, "process.capabilities.bounding"),
])
def test_bad_values_name_the_field(process, where):
    with pytest.raises(ConfigError, match=where):
        security_args(dict(process, args=["x"]))


def test_seccomp_is_trimmed_to_what_the_agent_compiles():
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "architectures": ["SCMP_ARCH_X86_64"],
               "flags": ["SECCOMP_FILTER_FLAG_LOG"], "listenerPath": "/run/agent.sock", "listenerMetadata": "m",
               "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ALLOW", "comment": "x",
                             "args": [{"index": 1, "value": 2, "op": "SCMP_CMP_EQ", "note": 1}]}]}
    sent = seccomp_args({"linux": {"seccomp": profile}})
    assert sent == {"seccomp": {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "architectures": ["SCMP_ARCH_X86_64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]}]}}
    messages.check_request({"id": 1, "type": "create_container",
                            "args": {"container_id": "c", "mount_tag": "t", **sent}})
    assert seccomp_args({"linux": {}}) == {} and seccomp_args({}) == {}


CONTAINER = {"args": ["init"], "capabilities": CAPS, "noNewPrivileges": True, "oomScoreAdj": 300,
             "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1234, "hard": 1234}], "user": {"uid": 1000, "gid": 1000}}


def test_exec_takes_the_containers_fields():
    spec = with_container_defaults({"args": ["sh"]}, CONTAINER)
    assert spec == {"args": ["sh"], "capabilities": CAPS, "noNewPrivileges": True, "oomScoreAdj": 300,
                    "rlimits": CONTAINER["rlimits"]}
    spec["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    assert CONTAINER["capabilities"]["bounding"] == ["CAP_KILL", "CAP_CHOWN"]  # a copy, not the container's


def test_exec_keeps_its_own_fields():
    own = {"args": ["sh"], "capabilities": {"bounding": []}, "noNewPrivileges": False,
           "rlimits": [{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]}
    assert with_container_defaults(own, CONTAINER) == dict(own, oomScoreAdj=300)
    # An empty rlimits list is "none given", as in runc.
    assert with_container_defaults({"args": ["sh"], "rlimits": []}, CONTAINER)["rlimits"] == CONTAINER["rlimits"]


def test_exec_cap_and_no_new_privs():
    spec = with_container_defaults({"args": ["sh"]}, dict(CONTAINER, noNewPrivileges=False),
                                   add_caps=["CAP_NET_RAW", "CAP_KILL"], no_new_privs=True)
    caps = spec["capabilities"]
    for which in ("bounding", "effective", "permitted", "ambient"):
        assert caps[which].count("CAP_NET_RAW") == 1 and caps[which].count("CAP_KILL") == 1, which
    assert caps["inheritable"] == ["CAP_KILL"]
    assert spec["noNewPrivileges"] is True
    # Without an inheritable set there is no ambient to add to.
    bare = with_container_defaults({"args": ["sh"], "capabilities": {"bounding": []}}, {}, add_caps=["CAP_KILL"])
    assert bare["capabilities"] == {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}
    # Without capabilities anywhere the process has them all: --cap adds nothing.
    assert "capabilities" not in with_container_defaults({"args": ["sh"]}, {}, add_caps=["CAP_KILL"])
