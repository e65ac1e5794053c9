"""ttrpc server and client over real Unix sockets, with containerd's own messages.

The raw-socket tests speak the wire by hand (header bytes computed from the
protocol description), so they check the server against the protocol, not
against our own client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from kata_py.shim import ttrpc
from kata_py.shim.protos import load
from kata_py.shim.ttrpc import Client, Code, Server

P = load()
TASK = "containerd.task.v2.Task"


def run(coro, timeout: float = 20):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def task_server(**handlers) -> Server:
    """A Task service whose State handler echoes the id, plus `handlers`
    given as method name -> (request class, handler)."""
    async def state(req, ctx):
        return P.shim.StateResponse(id=req.id, exec_id=req.exec_id, pid=42,
                                    status=P.task_types.RUNNING, bundle=ctx.namespace or "")
    server = Server(**handlers.pop("_server_args", {}))
    server.register(TASK, {"State": (P.shim.StateRequest, state), **handlers})
    return server


# -- framing against the protocol description ----------------------------------

def test_header_matches_the_spec_bytes():
    # length 0x1234, stream 1, type request, flags 0
    assert ttrpc.encode_header(0x1234, 1, ttrpc.MessageType.REQUEST) == \
        bytes([0, 0, 0x12, 0x34, 0, 0, 0, 1, 1, 0])
    hdr = ttrpc.decode_header(bytes([0, 0x40, 0, 0, 0x80, 0, 0, 3, 2, 5]))
    assert hdr == (4 << 20, 0x80000003, 2, 5)
    assert (hdr.length, hdr.stream_id, hdr.type, hdr.flags) == (4 << 20, 0x80000003, 2, 5)
    with pytest.raises(ttrpc.FrameError):
        ttrpc.decode_header(b"\0" * 9)
    assert ttrpc.HEADER_LENGTH == 10 and ttrpc.MAX_MESSAGE_LENGTH == 4 * 1024 * 1024


def test_envelope_field_numbers_match_ttrpc():
    # ttrpc's Go struct tags: Request service=1 method=2 payload=3 timeout_nano=4
    # metadata=5 (KeyValue key=1 value=2); Response status=1 payload=2.
    req = P.ttrpc.Request(service="s", method="m", payload=b"p", timeout_nano=1)
    req.metadata.add(key="k", value="v")
    assert req.SerializeToString() == bytes.fromhex("0a0173" "12016d" "1a0170" "2001" "2a06" "0a016b" "120176")
    resp = P.ttrpc.Response(payload=b"x")
    resp.status.code = 5
    assert resp.SerializeToString() == bytes.fromhex("0a020805" "120178")


# -- over a socket --------------------------------------------------------------

def test_state_round_trip_with_namespace(tmp_path):
    async def main():
        seen = {}

        async def pids(req, ctx):
            seen.update(ns=ctx.namespace, md=ctx.metadata, timeout=ctx.timeout, pid=ctx.peer_pid)
            return P.shim.PidsResponse(processes=[P.task_types.ProcessInfo(pid=7)])

        server = task_server(Pids=(P.shim.PidsRequest, pids))
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(f"unix://{tmp_path}/t.sock") as client:
            reply = await client.call(TASK, "State", P.shim.StateRequest(id="c1", exec_id="e"),
                                      P.shim.StateResponse, namespace="k8s.io")
            assert (reply.id, reply.exec_id, reply.pid, reply.bundle) == ("c1", "e", 42, "k8s.io")
            assert reply.status == P.task_types.RUNNING
            got = await client.call(TASK, "Pids", P.shim.PidsRequest(id="c1"), P.shim.PidsResponse,
                                    namespace="default", metadata={"x": ["1", "2"]}, timeout=30)
            assert [p.pid for p in got.processes] == [7]
        await server.shutdown()
        assert seen["ns"] == "default"
        assert seen["md"] == {"containerd-namespace-ttrpc": ["default"], "x": ["1", "2"]}
        assert 29 < seen["timeout"] <= 30
        assert seen["pid"] == os.getpid()
        assert not (tmp_path / "t.sock").exists()
    run(main())


def test_unknown_service_and_method_are_unimplemented(tmp_path):
    async def main():
        server = task_server()
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(tmp_path / "t.sock") as client:
            with pytest.raises(ttrpc.Unimplemented) as err:
                await client.call(TASK, "Checkpoint", P.shim.CheckpointTaskRequest(),
                                  P.shim.StateResponse)
            assert err.value.code == Code.UNIMPLEMENTED == 12
            assert err.value.message == "method Checkpoint"
            with pytest.raises(ttrpc.RpcError) as err:
                await client.call("containerd.task.v3.Task", "State", P.shim.StateRequest(),
                                  P.shim.StateResponse)
            assert (err.value.code, err.value.message) == (12, "service containerd.task.v3.Task")
            # the connection is still good
            assert (await client.call(TASK, "State", P.shim.StateRequest(id="x"),
                                      P.shim.StateResponse)).id == "x"
        await server.close()
    run(main())


def test_handler_errors_become_status_codes(tmp_path):
    async def main():
        async def not_found(req, ctx):
            raise ttrpc.NotFound(f"container {req.id} not found")

        async def precondition(req, ctx):
            raise ttrpc.FailedPrecondition("task must be stopped")

        async def crash(req, ctx):
            raise ValueError("boom")

        async def mapped(req, ctx):
            raise LookupError("no such exec")

        async def bad_reply(req, ctx):
            return "not a message"

        def mapper(err):
            return ttrpc.NotFound(str(err)) if isinstance(err, LookupError) else None

        server = Server(error_mapper=mapper)
        server.register(TASK, {
            "Delete": (P.shim.DeleteRequest, not_found),
            "Start": (P.shim.StartRequest, precondition),
            "Kill": (P.shim.KillRequest, crash),
            "Exec": (P.shim.ExecProcessRequest, mapped),
            "Pids": (P.shim.PidsRequest, bad_reply),
        })
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(tmp_path / "t.sock") as client:
            async def code_of(method, req):
                with pytest.raises(ttrpc.RpcError) as err:
                    await client.call(TASK, method, req, P.shim.DeleteResponse)
                return type(err.value), err.value.code, err.value.message

            assert await code_of("Delete", P.shim.DeleteRequest(id="c9")) == \
                (ttrpc.NotFound, 5, "container c9 not found")
            assert await code_of("Start", P.shim.StartRequest()) == \
                (ttrpc.FailedPrecondition, 9, "task must be stopped")
            assert await code_of("Kill", P.shim.KillRequest()) == (ttrpc.Unknown, 2, "boom")
            assert await code_of("Exec", P.shim.ExecProcessRequest()) == \
                (ttrpc.NotFound, 5, "no such exec")
            assert (await code_of("Pids", P.shim.PidsRequest()))[1] == Code.INTERNAL
        await server.close()
    run(main())


def test_timeout_reaches_the_handler_and_the_caller(tmp_path):
    async def main():
        cancelled = asyncio.Event()

        async def wait(req, ctx):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return P.shim.WaitResponse()

        server = task_server(Wait=(P.shim.WaitRequest, wait))
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(tmp_path / "t.sock") as client:
            with pytest.raises(ttrpc.DeadlineExceeded):
                await client.call(TASK, "Wait", P.shim.WaitRequest(), P.shim.WaitResponse,
                                  timeout=0.2)
            await asyncio.wait_for(cancelled.wait(), 5)  # the server gave up too
            assert (await client.call(TASK, "State", P.shim.StateRequest(id="a"),
                                      P.shim.StateResponse)).id == "a"
        await server.close()
    run(main())


def test_requests_run_concurrently_and_answer_out_of_order(tmp_path):
    async def main():
        fast_done = asyncio.Event()
        order = []

        async def slow(req, ctx):  # can only finish after the fast call has
            await fast_done.wait()
            order.append("slow")
            return P.shim.WaitResponse(exit_status=1)

        async def fast(req, ctx):
            order.append("fast")
            return P.shim.StateResponse(id=req.id)

        server = Server()
        server.register(TASK, {"Wait": (P.shim.WaitRequest, slow),
                               "State": (P.shim.StateRequest, fast)})
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(tmp_path / "t.sock") as client:
            slow_call = asyncio.create_task(
                client.call(TASK, "Wait", P.shim.WaitRequest(), P.shim.WaitResponse))
            await asyncio.sleep(0.05)
            got = await client.call(TASK, "State", P.shim.StateRequest(id="f"), P.shim.StateResponse)
            assert got.id == "f" and not slow_call.done()
            fast_done.set()
            assert (await slow_call).exit_status == 1
            many = await asyncio.gather(*(
                client.call(TASK, "State", P.shim.StateRequest(id=str(i)), P.shim.StateResponse)
                for i in range(50)))
            assert [m.id for m in many] == [str(i) for i in range(50)]
        assert order[:2] == ["fast", "slow"]
        await server.close()
    run(main())


def test_server_on_a_handed_in_listening_socket(tmp_path):
    async def main():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / "fd.sock"))
        sock.listen(16)
        inherited = socket.socket(fileno=os.dup(sock.fileno()))  # as a daemon child gets it
        sock.close()
        server = task_server()
        await server.start(sock=inherited)
        assert server.path is None
        async with await Client.connect(tmp_path / "fd.sock") as client:
            assert (await client.call(TASK, "State", P.shim.StateRequest(id="fd"),
                                      P.shim.StateResponse)).id == "fd"
        await server.shutdown()
    run(main())


def test_graceful_shutdown_finishes_running_calls(tmp_path):
    async def main():
        started = asyncio.Event()

        async def wait(req, ctx):
            started.set()
            await asyncio.sleep(0.3)
            return P.shim.WaitResponse(exit_status=3)

        async def shutdown(req, ctx):  # as the shim's Shutdown does
            await server.shutdown(timeout=5)
            return P.message_class("google.protobuf.Empty")()

        server = task_server(Wait=(P.shim.WaitRequest, wait),
                             Shutdown=(P.shim.ShutdownRequest, shutdown))
        await server.start(tmp_path / "t.sock")
        client = await Client.connect(tmp_path / "t.sock")
        waiting = asyncio.create_task(
            client.call(TASK, "Wait", P.shim.WaitRequest(), P.shim.WaitResponse))
        await started.wait()
        other = await Client.connect(tmp_path / "t.sock")
        # Shutdown waits for Wait (not for itself); its own reply may be lost.
        with pytest.raises(ttrpc.ConnectionClosed):
            await other.call(TASK, "Shutdown", P.shim.ShutdownRequest(),
                             P.message_class("google.protobuf.Empty"))
        assert (await waiting).exit_status == 3
        await server.wait_closed()
        assert not (tmp_path / "t.sock").exists()
        with pytest.raises(ttrpc.Unavailable):
            await Client.connect(tmp_path / "t.sock")
        await client.close()
        await other.close()
    run(main())


def test_client_fails_pending_calls_when_the_server_goes(tmp_path):
    async def main():
        async def wait(req, ctx):
            await asyncio.sleep(60)

        server = task_server(Wait=(P.shim.WaitRequest, wait))
        await server.start(tmp_path / "t.sock")
        client = await Client.connect(tmp_path / "t.sock")
        call = asyncio.create_task(client.call(TASK, "Wait", P.shim.WaitRequest(),
                                               P.shim.WaitResponse))
        await asyncio.sleep(0.05)
        await server.close()
        with pytest.raises(ttrpc.ConnectionClosed) as err:
            await call
        assert err.value.code == Code.UNAVAILABLE
        assert client.closed
        with pytest.raises(ttrpc.ConnectionClosed):
            await client.call(TASK, "State", P.shim.StateRequest(), P.shim.StateResponse)
        await client.close()
    run(main())


def test_oversized_messages_are_resource_exhausted(tmp_path):
    async def main():
        async def huge(req, ctx):
            return P.shim.StateResponse(stdout="x" * (5 << 20))

        server = task_server(Pids=(P.shim.PidsRequest, huge))
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(tmp_path / "t.sock") as client:
            # a reply over 4 MiB: the server answers RESOURCE_EXHAUSTED instead
            with pytest.raises(ttrpc.ResourceExhausted):
                await client.call(TASK, "Pids", P.shim.PidsRequest(), P.shim.StateResponse)
            # a request over 4 MiB is refused before it is sent
            with pytest.raises(ttrpc.ResourceExhausted) as err:
                await client.call(TASK, "State", P.shim.StateRequest(id="y" * (5 << 20)),
                                  P.shim.StateResponse)
            assert "exceed maximum message size of 4194304" in err.value.message
            assert (await client.call(TASK, "State", P.shim.StateRequest(id="ok"),
                                      P.shim.StateResponse)).id == "ok"
        await server.close()
    run(main())


# -- raw wire: what a foreign or broken client sends ------------------------------

def request_frame(stream_id: int, method: str = "State", payload: bytes | None = None,
                  msg_type: int = 1) -> bytes:
    body = payload if payload is not None else P.ttrpc.Request(
        service=TASK, method=method,
        payload=P.shim.StateRequest(id=f"s{stream_id}").SerializeToString()).SerializeToString()
    return struct.pack(">IIBB", len(body), stream_id, msg_type, 0) + body


async def read_response(reader) -> tuple[int, object]:
    head = await reader.readexactly(10)
    length, stream_id, msg_type, flags = struct.unpack(">IIBB", head)
    assert msg_type == 2 and flags == 0
    return stream_id, P.ttrpc.Response.FromString(await reader.readexactly(length))


def test_raw_oversized_frame_is_skipped_and_the_connection_survives(tmp_path):
    async def main():
        server = task_server()
        await server.start(tmp_path / "t.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "t.sock"))
        big = (4 << 20) + 1
        writer.write(struct.pack(">IIBB", big, 5, 1, 0))
        writer.write(b"\xff" * big)
        writer.write(request_frame(7))
        await writer.drain()
        sid, resp = await read_response(reader)
        assert sid == 5 and resp.status.code == Code.RESOURCE_EXHAUSTED
        assert resp.status.message == \
            "message length 4194305 exceed maximum message size of 4194304"
        sid, resp = await read_response(reader)
        assert sid == 7 and resp.status.code == 0
        assert P.shim.StateResponse.FromString(resp.payload).id == "s7"
        writer.close()
        await server.close()
    run(main())


def test_raw_protocol_violations(tmp_path):
    async def main():
        server = task_server()
        await server.start(tmp_path / "t.sock")
        path = str(tmp_path / "t.sock")

        # even stream id and an undecodable envelope: answered, connection kept
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(request_frame(2))
        writer.write(request_frame(9, payload=b"\xff\xff\xff"))
        writer.write(request_frame(11, msg_type=3))          # data frame: ignored
        writer.write(request_frame(13, msg_type=2))          # response frame: ignored
        writer.write(request_frame(15))
        await writer.drain()
        answers = dict([await read_response(reader) for _ in range(3)])
        assert answers[2].status.code == Code.INVALID_ARGUMENT
        assert answers[2].status.message == "StreamID must be odd for client initiated streams"
        assert answers[9].status.code == Code.INVALID_ARGUMENT
        assert answers[9].status.message.startswith("unmarshal request error")
        assert answers[15].status.code == 0
        writer.close()

        # an undefined frame type: that connection is closed, nothing answered
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(request_frame(1, msg_type=7))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # a short header, then EOF: closed
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\0\0\0\5\0")
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # a header promising more payload than comes, then EOF: closed
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(request_frame(1)[:-3])
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # the server is unharmed
        async with await Client.connect(path) as client:
            assert (await client.call(TASK, "State", P.shim.StateRequest(id="alive"),
                                      P.shim.StateResponse)).id == "alive"
        await server.close()
    run(main())


def test_require_same_user_refuses_other_users(tmp_path, monkeypatch):
    async def main():
        server = task_server(_server_args={"require_same_user": True})
        await server.start(tmp_path / "t.sock")
        async with await Client.connect(tmp_path / "t.sock") as client:
            assert (await client.call(TASK, "State", P.shim.StateRequest(id="me"),
                                      P.shim.StateResponse)).id == "me"
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
        async with await Client.connect(tmp_path / "t.sock") as client:
            with pytest.raises(ttrpc.ConnectionClosed):
                await client.call(TASK, "State", P.shim.StateRequest(), P.shim.StateResponse)
        await server.close()
    run(main())


def test_registration_is_checked():
    async def main():
        server = task_server()
        with pytest.raises(ttrpc.RegistrationError):
            server.register(TASK, {})
        with pytest.raises(ttrpc.RegistrationError):
            server.register("x", {"M": (dict, lambda r, c: None)})
        with pytest.raises(ttrpc.RegistrationError):
            server.register("y", {"M": P.shim.StateRequest})
    run(main())


def test_status_codes_map_to_typed_errors():
    assert isinstance(ttrpc.RpcError.from_status(6, "exists"), ttrpc.AlreadyExists)
    assert isinstance(ttrpc.RpcError.from_status(3, "bad"), ttrpc.InvalidArgument)
    odd = ttrpc.RpcError.from_status(99, "future code")
    assert type(odd) is ttrpc.RpcError and odd.code == 99
    assert str(ttrpc.NotFound("c")) == "NOT_FOUND: c"
    assert issubclass(ttrpc.RpcError, ttrpc.TtrpcError)
