"""The ttrpc server: services registered by name, one task per request."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from kata_py.shim import protos as _protos
from kata_py.shim.ttrpc.errors import (
    DeadlineExceeded, FrameError, Internal, InvalidArgument, RegistrationError, ResourceExhausted,
    RpcError, TtrpcError, Unimplemented, Unknown)
from kata_py.shim.ttrpc.framing import (
    MAX_MESSAGE_LENGTH, NAMESPACE_KEY, FrameWriter, MessageType, address, oversized, read_frame)

log = logging.getLogger(__name__)


@dataclass
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]]
    timeout: float | None  # seconds the caller gave (timeout_nano), None for none
    peer_pid: int | None = None  # from SO_PEERCRED, when available
    peer_uid: int | None = None

    def get(self, key: str) -> str | None:
        values = self.metadata.get(key)
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace the caller set, as containerd puts it."""
        return self.get(NAMESPACE_KEY)


Handler = Callable[[Message, CallContext], Awaitable[Message]]
ErrorMapper = Callable[[Exception], "RpcError | None"]


@dataclass(frozen=True)
class _Method:
    request_cls: type[Message]
    handler: Handler


def _peer_credentials(sock: socket.socket | None) -> tuple[int, int, int] | None:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Server:
    """A ttrpc server on a Unix socket.

    server = Server()
    server.register("containerd.task.v2.Task", {"State": (StateRequest, on_state), ...})
    await server.start("/run/x.sock")        # or start(sock=listening_socket)
    ...
    await server.shutdown(timeout=5)          # graceful: finish running calls

    Handlers are `async def handler(request, ctx: CallContext) -> reply message`.
    `error_mapper` turns other exceptions a handler raises into an RpcError
    (return None to fall back to UNKNOWN): the shim maps kata_py's own errors
    there rather than in every handler.
    """

    def __init__(self, *, require_same_user: bool = False, max_concurrent: int = 256,
                 error_mapper: ErrorMapper | None = None) -> None:
        self._wire = _protos.load()
        self._services: dict[str, dict[str, _Method]] = {}
        self._require_same_user = require_same_user
        self._max_concurrent = max_concurrent
        self._error_mapper = error_mapper
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._connections: set[_ServerConnection] = set()
        self._closing = False
        self._closed = asyncio.Event()

    def register(self, service: str, methods: Mapping[str, tuple[type[Message], Handler]]) -> None:
        if service in self._services:
            raise RegistrationError(f"duplicate service {service} registered")
        table: dict[str, _Method] = {}
        for name, entry in methods.items():
            try:
                request_cls, handler = entry
            except (TypeError, ValueError) as err:
                raise RegistrationError(f"{service}/{name}: want (request class, handler)") from err
            if not (isinstance(request_cls, type) and issubclass(request_cls, Message)):
                raise RegistrationError(f"{service}/{name}: {request_cls!r} is not a message class")
            if not callable(handler):
                raise RegistrationError(f"{service}/{name}: handler {handler!r} is not callable")
            table[name] = _Method(request_cls, handler)
        self._services[service] = table

    @property
    def path(self) -> str | None:
        """The socket path this server bound itself (None for a handed-in socket)."""
        return self._path

    async def start(self, path: str | os.PathLike[str] | None = None, *,
                    sock: socket.socket | None = None) -> None:
        """Listen on `path` (a stale socket file there is replaced), or serve
        `sock`, an already bound and listening Unix socket (the shim's `start`
        binds it and hands it to the daemon it forks)."""
        if (path is None) == (sock is None):
            raise TtrpcError("start() wants exactly one of path= or sock=")
        if self._server is not None:
            raise TtrpcError("server already started")
        try:
            if sock is not None:
                sock.setblocking(False)
                self._server = await asyncio.start_unix_server(self._accept, sock=sock)
            else:
                self._path = address(path)  # type: ignore[arg-type]
                self._server = await asyncio.start_unix_server(self._accept, path=self._path)
        except OSError as err:
            raise TtrpcError(f"cannot listen on {path or sock}: {err}") from err

    async def wait_closed(self) -> None:
        """Until shutdown() or close() has finished."""
        await self._closed.wait()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting and reading, let running calls finish and answer
        (up to `timeout` seconds, then cancel them), close every connection.
        Safe to await from inside a handler: that handler is not waited for
        (its own reply may then be lost, which containerd's Shutdown accepts)."""
        self._closing = True
        self._stop_listening()
        conns = list(self._connections)
        for conn in conns:
            conn.stop_reading()
        me = asyncio.current_task()
        pending = {t for c in conns for t in c.handler_tasks() if t is not me}
        if pending:
            done, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await asyncio.gather(*(c.close(spare=me) for c in conns), return_exceptions=True)
        await self._finish()

    async def close(self) -> None:
        """Stop now: running calls are cancelled, connections dropped."""
        self._closing = True
        self._stop_listening()
        me = asyncio.current_task()
        await asyncio.gather(*(c.close(spare=me) for c in list(self._connections)),
                             return_exceptions=True)
        await self._finish()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _finish(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._path and not self._path.startswith("\0"):
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        self._closed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        creds = _peer_credentials(writer.get_extra_info("socket"))
        if self._closing or (self._require_same_user and
                             (creds is None or creds[1:] != (os.geteuid(), os.getegid()))):
            if not self._closing:
                log.warning("ttrpc: refusing connection from %s: invalid credentials", creds)
            writer.close()
            return
        conn = _ServerConnection(self, reader, writer, creds)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    # Dispatch, shared by every connection.

    async def _call(self, req: Message, ctx: CallContext) -> bytes:
        methods = self._services.get(req.service)
        if methods is None:
            raise Unimplemented(f"service {req.service}")
        method = methods.get(req.method)
        if method is None:
            raise Unimplemented(f"method {req.method}")
        try:
            request = method.request_cls.FromString(req.payload)
        except DecodeError as err:
            raise Internal(f"ttrpc: error unmarshalling payload: {err}") from err
        try:
            async with asyncio.timeout(ctx.timeout):
                reply = await method.handler(request, ctx)
        except RpcError:
            raise
        except TimeoutError as err:
            raise DeadlineExceeded("context deadline exceeded") from err
        except Exception as err:  # noqa: BLE001 - every handler failure becomes a status
            mapped = self._error_mapper(err) if self._error_mapper else None
            if mapped is not None:
                raise mapped from err
            log.exception("ttrpc: %s/%s failed", req.service, req.method)
            raise Unknown(str(err) or type(err).__name__) from err
        if not isinstance(reply, Message):
            raise Internal(f"ttrpc: error unsupported response type: {type(reply).__name__}")
        return reply.SerializeToString()


class _ServerConnection:
    """One accepted connection: a read loop and one task per request."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, creds: tuple[int, int, int] | None) -> None:
        self._server = server
        self._reader = reader
        self._out = FrameWriter(writer)
        self._creds = creds
        self._slots = asyncio.Semaphore(server._max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self._wire = server._wire

    def handler_tasks(self) -> set[asyncio.Task[None]]:
        return set(self._tasks)

    def stop_reading(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()

    async def run(self) -> None:
        self._read_task = asyncio.current_task()  # type: ignore[assignment]
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            if not self._server._closing:
                raise
            return  # shutdown(): handlers finish, the server closes us
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # EOF, possibly mid-frame: the peer is gone
        except FrameError as err:
            log.warning("ttrpc: closing connection: %s", err)
        await self.close()

    async def close(self, spare: asyncio.Task[object] | None = None) -> None:
        """Cancel the running calls but `spare` (a handler closing its own
        connection, as Shutdown does, must not wait on itself) and close."""
        others = [t for t in self._tasks if t is not spare]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others)
        await self._out.close()

    async def _read_loop(self) -> None:
        Request = self._wire.ttrpc.Request
        while True:
            hdr, payload = await read_frame(self._reader)
            if payload is None:
                await self._answer_error(hdr.stream_id, ResourceExhausted(oversized(hdr.length)))
                continue
            if hdr.type != MessageType.REQUEST:
                continue  # not ours to act on; Go ignores these too
            try:
                req = Request.FromString(payload)
            except DecodeError as err:
                await self._answer_error(hdr.stream_id,
                                         InvalidArgument(f"unmarshal request error: {err}"))
                continue
            if hdr.stream_id % 2 != 1:
                await self._answer_error(hdr.stream_id, InvalidArgument(
                    "StreamID must be odd for client initiated streams"))
                continue
            await self._slots.acquire()  # backpressure: stop reading while full
            task = asyncio.create_task(self._serve(hdr.stream_id, req))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        # Here, not in _serve's finally: a task cancelled before its first
        # step never enters its body, and its slot must come back all the same.
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, stream_id: int, req: Message) -> None:
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        ctx = CallContext(
            service=req.service, method=req.method, stream_id=stream_id, metadata=metadata,
            timeout=req.timeout_nano / 1e9 if req.timeout_nano > 0 else None,
            peer_pid=self._creds[0] if self._creds else None,
            peer_uid=self._creds[1] if self._creds else None)
        try:
            payload = await self._server._call(req, ctx)
        except RpcError as err:
            await self._answer_error(stream_id, err)
            return
        resp = self._wire.ttrpc.Response(payload=payload)
        resp.status.SetInParent()  # code 0, as Go sends it
        data = resp.SerializeToString()
        if len(data) > MAX_MESSAGE_LENGTH:
            await self._answer_error(stream_id, ResourceExhausted(oversized(len(data))))
            return
        await self._send(stream_id, data)

    async def _answer_error(self, stream_id: int, err: RpcError) -> None:
        status = self._wire.rpc_status.Status(code=int(err.code), message=err.message)
        for detail in err.details:  # Any messages, possibly of another pool's class
            status.details.add(type_url=detail.type_url, value=detail.value)
        await self._send(stream_id, self._wire.ttrpc.Response(status=status).SerializeToString())

    async def _send(self, stream_id: int, data: bytes) -> None:
        try:
            await self._out.send(stream_id, MessageType.RESPONSE, data)
        except (ConnectionError, OSError) as err:
            log.debug("ttrpc: response on stream %d lost: %s", stream_id, err)
