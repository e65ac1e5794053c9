"""The sandbox owner's wire protocol (kata_py.sandbox.owner_protocol) and its
client's checks, without a VM: schemas against jsonschema, replies and
events, and an OwnerClient against a scripted peer."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kata_py.api.aio import _container_args, _process_args
from kata_py.protocol.framing import encode_frame, read_frame
from kata_py.protocol.schema import SchemaError
from kata_py.sandbox import owner_protocol as op
from kata_py.sandbox.owner_client import OwnerClient, OwnerConnectionError, OwnerRequestError
from tests.schema_check import assert_agrees_with_jsonschema

SAMPLES = [
    {},
    {"name": "web", "rootfs": "/srv/r", "args": ["sh"]},
    {"name": "-bad", "rootfs": "/srv/r", "args": ["sh"]},
    {"name": "web", "rootfs": "relative", "args": ["sh"]},
    {"name": "web", "rootfs": "/r", "args": []},
    {"name": "web", "args": ["true"], "timeout": 1.5, "stdin": "aGk=", "max_output": 10},
    {"name": "web", "args": ["true"], "timeout": -1},
    {"name": "web", "args": ["true"], "stdin": "not base64!"},
    {"name": "web", "path": "/data/x", "data": "aGk=", "mode": 0o600},
    {"name": "web", "path": "data/x", "data": ""},
    {"name": "web", "signal": 9}, {"name": "web", "signal": 65},
    {"exit_code": 0, "signal": None, "status": 0, "stdout": "", "stderr": "", "stdout_truncated": False,
     "stderr_truncated": False, "timed_out": False},
    {"exit_code": 300, "signal": None, "status": 0, "stdout": "", "stderr": "", "stdout_truncated": False,
     "stderr_truncated": False, "timed_out": False},
    {"pid": 7}, {"process_id": "s1", "agent_process_id": "web.s1", "vsock": {"uds": "/run/x/vsock.sock"}},
    {"event": "exit", "container": "web", "process_id": "init", "init": True, "exit_code": None, "signal": 9,
     "status": 137, "time": 1.0},
    {"event": "oom", "container": "web", "oom_kill": 2, "time": 3.0},
    {"event": "gone", "reason": "x", "time": 3.0},
    {"id": 1, "type": "exec", "args": {}}, {"id": 1, "type": "nope", "args": {}},
    {"id": 1, "ok": False, "error": {"code": "gone", "message": "m"}},
]


@pytest.mark.parametrize("schema_name", ["REQUEST", "REPLY", "RECORD", "EXEC_RESULT"]
                         + [f"event:{e}" for e in op.EVENTS] + [f"{t}:{i}" for t in op.REQUESTS for i in (0, 1)])
def test_own_validator_agrees_with_jsonschema(schema_name):
    if schema_name.startswith("event:"):
        schema = op.EVENTS[schema_name.split(":")[1]]
    elif ":" in schema_name:
        name, index = schema_name.split(":")
        schema = op.REQUESTS[name][int(index)]
    else:
        schema = getattr(op, schema_name)
    assert_agrees_with_jsonschema(schema, SAMPLES, schema_name)


def test_replies_and_events_are_checked():
    assert op.check_reply({"id": 1, "ok": True, "result": {"pid": 3}}, "start") == {"pid": 3}
    assert op.check_reply({"id": 1, "ok": False, "error": {"code": "exited", "message": "m"}}, "start") == \
        {"error": {"code": "exited", "message": "m"}}
    with pytest.raises(SchemaError):
        op.check_reply({"id": 1, "ok": True, "result": {"pid": 0}}, "start")
    with pytest.raises(SchemaError):
        op.check_reply({"id": 1, "ok": True, "result": {}, "error": {"code": "x", "message": ""}}, "subscribe")
    with pytest.raises(SchemaError, match="unknown event"):
        op.check_event({"event": "boom"})
    with pytest.raises(SchemaError):
        op.check_event({"event": "oom", "container": "c", "oom_kill": -1, "time": 1.0})
    assert op.error_reply(3, "weird", "m")["error"]["code"] == "internal"


def test_api_builds_requests_the_owner_accepts(tmp_path):
    wire = {"name": "web", **_container_args(tmp_path, "host", "32M", 64, 0.5, False),
            **_process_args(["sh", "-c", "x"], {"A": "1"}, "/", "1000:1000", b"in", 100, False)}
    op.check_request({"id": 1, "type": "create_container", "args": wire})
    assert wire["resources"] == {"memory": {"limit": 32 << 20}, "pids": {"limit": 64},
                                 "cpu": {"quota": 50000, "period": 100000}}
    assert wire["user"] == {"uid": 1000, "gid": 1000} and "A=1" in wire["env"] and "PATH=" in wire["env"][0][:5]
    assert {m["destination"] for m in wire["mounts"]} >= {"/proc", "/dev", "/sys"}
    assert "/proc/sys" in wire["readonly_paths"] and "CAP_SYS_ADMIN" not in wire["capabilities"]["effective"]
    privileged = _process_args(["true"], None, None, None, None, 10, True, base_env=(), with_env=False)
    assert privileged == {"args": ["true"], "max_output": 10, "privileged": True}
    op.check_request({"id": 2, "type": "exec", "args": {"name": "web", **privileged}})


async def _scripted_owner(script):
    """An OwnerClient whose peer answers each request with script(request) -> [frames]."""
    ours, theirs = socket.socketpair()
    client = await OwnerClient.from_socket(ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)

    async def serve():
        try:
            while True:
                request = await read_frame(reader)
                for frame in script(request):
                    if frame is None:
                        writer.close()
                        return
                    writer.write(encode_frame(frame))
        except EOFError:
            writer.close()

    return client, asyncio.ensure_future(serve())


def test_client_checks_requests_and_dispatches_events():
    async def main():
        def script(request):
            if request["type"] == "start":
                return [{"event": "exit", "container": "w", "process_id": "init", "init": True, "exit_code": 0,
                         "signal": None, "status": 0, "time": 1.0},
                        {"id": request["id"], "ok": True, "result": {"pid": 12}}]
            if request["type"] == "signal":
                return [{"id": request["id"], "ok": False, "error": {"code": "exited", "message": "it exited"}}]
            return [{"event": "gone", "reason": "shutdown requested", "time": 2.0}, None]

        client, peer = await _scripted_owner(script)
        events = []
        client.add_listener(events.append)
        with pytest.raises(OwnerRequestError, match="/args/name") as bad:
            await client.request("start", {"name": "../x"})
        assert bad.value.code == "invalid"
        assert await client.request("start", {"name": "w"}) == {"pid": 12}
        assert events[0]["event"] == "exit"
        with pytest.raises(OwnerRequestError) as refused:
            await client.request("signal", {"name": "w", "signal": 9})
        assert refused.value.code == "exited"
        with pytest.raises(OwnerConnectionError) as lost:
            await client.request("shutdown")
        assert lost.value.reason == "shutdown requested" and events[-1]["event"] == "gone"
        assert client.closed.done()
        await client.close()
        await peer

    asyncio.run(main())


def test_client_drops_a_peer_that_breaks_the_protocol():
    async def main():
        client, peer = await _scripted_owner(lambda request: [{"id": 999, "ok": True, "result": {}}])
        with pytest.raises(OwnerConnectionError, match="not pending"):
            await client.request("info")
        client2, peer2 = await _scripted_owner(lambda request: [{"id": request["id"], "ok": True,
                                                                  "result": {"pid": "x"}}])
        with pytest.raises(OwnerConnectionError, match="protocol"):
            await client2.request("start", {"name": "w"})
        for c in (client, client2):
            await c.close()
        await asyncio.gather(peer, peer2, return_exceptions=True)

    asyncio.run(main())
