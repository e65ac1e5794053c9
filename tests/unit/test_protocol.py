import pytest

from kata_py.protocol import framing, messages
from kata_py.protocol.schema import SchemaError, validate
from tests.schema_check import assert_agrees_with_jsonschema


def test_frame_round_trip_in_pieces():
    frames = framing.encode_frame({"a": 1}) + framing.encode_frame({"b": "é" * 10})
    decoder = framing.FrameDecoder()
    out = []
    for i in range(len(frames)):
        out += decoder.feed(frames[i:i + 1])
    assert out == [{"a": 1}, {"b": "é" * 10}]
    assert decoder.pending == 0


def test_oversize_frame_rejected_before_buffering():
    decoder = framing.FrameDecoder(max_frame=100)
    with pytest.raises(framing.FrameError, match="limit"):
        decoder.feed((101).to_bytes(4, "big"))


@pytest.mark.parametrize("body", [b"\xff\xfe", b"{not json", b"[1,2]", b"3", b'"s"'])
def test_bad_bodies(body):
    with pytest.raises(framing.FrameError):
        framing.FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def test_deeply_nested_json_is_a_frame_error():
    body = b"[" * 100000 + b"]" * 100000
    with pytest.raises(framing.FrameError):
        framing.decode_body(body)


def test_encode_refuses_oversize():
    with pytest.raises(framing.FrameError):
        framing.encode_frame({"x": "a" * 200}, max_frame=100)


def test_request_validation_names_the_path():
    with pytest.raises(SchemaError) as info:
        messages.check_request({"id": 1, "type": "create_process", "args": {"process_id": "p", "argv": []}})
    assert info.value.path == "/args/argv"
    with pytest.raises(SchemaError):
        messages.check_request({"id": 1, "type": "rm_rf", "args": {}})
    with pytest.raises(SchemaError):
        messages.check_request({"id": True, "type": "ping", "args": {}})


def test_reply_must_match_request_type():
    with pytest.raises(SchemaError):
        messages.check_reply({"id": 1, "ok": True, "result": {"pid": 0}}, "start_process")
    with pytest.raises(SchemaError):
        messages.check_reply({"id": 1, "ok": True, "result": {}, "error": {"code": "failed", "message": ""}}, "ping")
    assert messages.check_reply({"id": 1, "ok": True, "result": {"pid": 7}}, "start_process") == {"pid": 7}
    err = messages.check_reply({"id": 1, "ok": False, "error": {"code": "not_found", "message": "x"}}, "wait_process")
    assert err == {"error": {"code": "not_found", "message": "x"}}


SAMPLES = [
    {}, {"id": 1}, {"id": 1, "type": "ping", "args": {}}, {"id": -1, "type": "ping", "args": {}},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"], "cwd": "rel"}},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"], "tty": 1}},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"], "streams": ["stdin", "nope"]}},
    {"id": 1, "type": "signal_process", "args": {"process_id": "a", "signal": 65}},
    {"id": 1, "type": "signal_process", "args": {"process_id": "a", "signal": 9}},
    {"id": 1, "type": "wait_process", "args": {"process_id": "a", "extra": 1}},
    {"role": "stream", "process_id": "a", "stream": "stdout"}, {"role": "control"}, {"role": "x"},
    {"id": 1, "ok": True, "result": {"exit_code": None, "signal": 9}},
    {"id": 1, "ok": True, "result": {"exit_code": 256, "signal": None}},
    {"ok": False, "error": {"code": "invalid", "message": "m"}}, {"ok": True},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"], "umask": 0o10000}},
    {"id": 1, "type": "create_process", "args": {
        "process_id": "a", "argv": ["x"], "umask": 0o022, "oom_score_adj": -1000, "no_new_privileges": True,
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2}],
        "capabilities": {"bounding": ["CAP_KILL"], "ambient": []}}},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"],
                                                 "rlimits": [{"type": "RLIMIT_NOPE", "soft": 1, "hard": 2}]}},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"],
                                                 "capabilities": {"bounding": ["CAP_KILL\n"]}}},
    {"id": 1, "type": "create_process", "args": {"process_id": "a", "argv": ["x"], "oom_score_adj": 1001}},
    {"id": 1, "type": "create_container", "args": {"container_id": "c", "mount_tag": "t", "seccomp": {
        "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                                                         "args": [{"index": 1, "value": 2**64 - 1, "op": "SCMP_CMP_EQ"}]}]}}},
    {"id": 1, "type": "create_container", "args": {"container_id": "c", "mount_tag": "t", "seccomp": {
        "defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                                         "args": [{"index": 1, "op": "SCMP_CMP_EQ"}] * 7}]}}},
    {"id": 1, "type": "create_container", "args": {"container_id": "c", "mount_tag": "t",
                                                   "seccomp": {"syscalls": []}}},
]


@pytest.mark.parametrize("schema_name", ["REQUEST", "HELLO", "REPLY", "STREAM_ACK"] + [
    f"{t}:{i}" for t in messages.REQUESTS for i in (0, 1)])
def test_own_validator_agrees_with_jsonschema(schema_name):
    if ":" in schema_name:
        name, index = schema_name.split(":")
        schema = messages.REQUESTS[name][int(index)]
    else:
        schema = getattr(messages, schema_name)
    samples = SAMPLES + [s.get("args", {}) for s in SAMPLES] + [s.get("result", {}) for s in SAMPLES]
    assert_agrees_with_jsonschema(schema, samples, schema_name)


def test_validator_refuses_unknown_keywords():
    with pytest.raises(SchemaError, match="unsupported"):
        validate(1, {"type": "integer", "multipleOf": 2})


def test_process_security_and_seccomp_are_bounded():
    every_cap = {name: ["CAP_KILL"] for name in messages.CAP_SETS}
    messages.check_request({"id": 1, "type": "create_process", "args": {
        "process_id": "a", "argv": ["x"], "umask": 0o7777, "capabilities": every_cap}})
    with pytest.raises(SchemaError, match="more than 64"):
        messages.check_request({"id": 1, "type": "create_process", "args": {
            "process_id": "a", "argv": ["x"], "capabilities": {"bounding": ["CAP_KILL"] * 65}}})
    rule = {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}
    with pytest.raises(SchemaError, match="more than 1024"):
        messages.check_request({"id": 1, "type": "create_container", "args": {
            "container_id": "c", "mount_tag": "t",
            "seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule] * 1025}}})
