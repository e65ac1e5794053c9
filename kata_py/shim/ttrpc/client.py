"""The ttrpc client: concurrent unary calls on one connection, odd stream ids."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence

from google.protobuf.message import DecodeError, Message

from kata_py.shim import protos as _protos
from kata_py.shim.ttrpc.errors import (
    Code, ConnectionClosed, DeadlineExceeded, FrameError, Internal, ResourceExhausted, RpcError,
    Unavailable)
from kata_py.shim.ttrpc.framing import (
    MAX_MESSAGE_LENGTH, NAMESPACE_KEY, FrameWriter, MessageType, address, oversized, read_frame)

log = logging.getLogger(__name__)


class Client:
    """A ttrpc client on one connection; calls may run concurrently.

    client = await Client.connect("/run/containerd/containerd.sock.ttrpc")
    reply = await client.call("containerd.services.events.ttrpc.v1.Events", "Forward",
                              request, Empty, namespace="k8s.io", timeout=5)
    await client.close()
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._wire = _protos.load()
        self._reader = reader
        self._out = FrameWriter(writer)
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._closed_reason: str | None = None
        self._read_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float | None = None) -> Client:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(address(path))
        except TimeoutError as err:
            raise DeadlineExceeded(f"connecting to {path} timed out") from err
        except OSError as err:
            raise Unavailable(f"cannot connect to {path}: {err}") from err
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def call(self, service: str, method: str, request: Message,
                   response_cls: type[Message], *,
                   metadata: Mapping[str, str | Sequence[str]] | None = None,
                   namespace: str | None = None, timeout: float | None = None) -> Message:
        """One unary call. Raises the RpcError subclass of a non-OK status,
        DeadlineExceeded when `timeout` (seconds; also sent as timeout_nano)
        passes, ConnectionClosed when the connection ends first."""
        if self._closed_reason is not None:
            raise ConnectionClosed(self._closed_reason)
        req = self._wire.ttrpc.Request(service=service, method=method,
                                       payload=request.SerializeToString())
        if timeout is not None:
            req.timeout_nano = max(1, int(timeout * 1e9))
        pairs = dict(metadata or {})
        if namespace is not None:
            pairs[NAMESPACE_KEY] = namespace
        for key, values in pairs.items():
            for value in [values] if isinstance(values, str) else values:
                req.metadata.add(key=key, value=value)
        data = req.SerializeToString()
        if len(data) > MAX_MESSAGE_LENGTH:
            raise ResourceExhausted(oversized(len(data)))

        stream_id = self._next_id
        self._next_id = (self._next_id + 2) & 0xFFFFFFFF or 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            async with asyncio.timeout(timeout):
                try:
                    await self._out.send(stream_id, MessageType.REQUEST, data)
                except (ConnectionError, OSError) as err:
                    raise ConnectionClosed(f"ttrpc: closed: {err}") from err
                payload = await fut
        except TimeoutError as err:
            raise DeadlineExceeded(f"{service}/{method}: context deadline exceeded") from err
        finally:
            self._pending.pop(stream_id, None)
        try:
            return response_cls.FromString(payload)
        except DecodeError as err:
            raise Internal(f"{service}/{method}: reply is not a "
                           f"{response_cls.DESCRIPTOR.full_name}: {err}") from err

    async def close(self) -> None:
        self._read_task.cancel()
        try:
            await self._read_task
        except asyncio.CancelledError:
            pass
        await self._out.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        reason = "ttrpc: closed"
        try:
            while True:
                hdr, payload = await read_frame(self._reader)
                if hdr.type != MessageType.RESPONSE:
                    continue
                fut = self._pending.get(hdr.stream_id)
                if fut is None or fut.done():
                    log.debug("ttrpc: response for unknown stream %d", hdr.stream_id)
                    continue
                if payload is None:
                    fut.set_exception(ResourceExhausted(oversized(hdr.length)))
                    continue
                self._deliver(fut, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except FrameError as err:
            reason = f"ttrpc: closed: {err}"
            log.warning("%s", reason)
        finally:
            self._closed_reason = reason
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed(reason))

    def _deliver(self, fut: asyncio.Future[bytes], payload: bytes) -> None:
        try:
            resp = self._wire.ttrpc.Response.FromString(payload)
        except DecodeError as err:
            fut.set_exception(Internal(f"ttrpc: undecodable response: {err}"))
            return
        if resp.status.code != Code.OK:
            fut.set_exception(RpcError.from_status(resp.status.code, resp.status.message,
                                                   list(resp.status.details)))
        else:
            fut.set_result(resp.payload)
