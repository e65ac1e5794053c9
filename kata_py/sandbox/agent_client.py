"""The host's client for the guest agent.

The guest is untrusted: every frame is size-capped before it is read, every
reply is checked against the schema of the request it answers, a reply to an
id we never sent ends the connection, and every request has a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from ..errors import AgentError, AgentTimeout, ProtocolError, VsockError
from ..protocol import AGENT_PORT
from ..protocol.framing import FrameError, encode_frame, read_frame
from ..protocol.messages import SchemaError, check_reply, check_stream_ack
from ..timing import REPLY_MILESTONES, mark

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MAX_PENDING = 256
CLOSE_TIMEOUT = 5.0


class AgentRequestError(AgentError):
    """The agent answered a request with an error."""

    def __init__(self, request_type: str, code: str, message: str) -> None:
        self.request_type = request_type
        self.code = code
        super().__init__(f"{request_type}: {message}")


async def open_stream(transport, process_id: str, stream: str, timeout: float = DEFAULT_TIMEOUT):
    """One stdio stream of one process, as its own vsock connection."""
    reader, writer = await transport.open_connection(AGENT_PORT, timeout)
    try:
        writer.write(encode_frame({"role": "stream", "process_id": process_id, "stream": stream}))
        ack = check_stream_ack(await asyncio.wait_for(read_frame(reader, 8192), timeout))
    except asyncio.TimeoutError:
        writer.close()
        raise AgentTimeout(f"agent did not accept the {stream} stream of {process_id} in {timeout:.0f} s") from None
    except (EOFError, OSError, FrameError, SchemaError) as exc:
        writer.close()
        raise ProtocolError(f"bad answer attaching {stream} of {process_id}: {exc}") from None
    if not ack["ok"]:
        writer.close()
        raise AgentRequestError("attach " + stream, ack["error"]["code"], ack["error"]["message"])
    return reader, writer


class AgentClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._failure: Exception | None = None
        self._task = asyncio.ensure_future(self._read_replies())

    @classmethod
    async def connect(cls, transport, timeout: float = DEFAULT_TIMEOUT) -> "AgentClient":
        reader, writer = await transport.open_connection(AGENT_PORT, timeout)
        writer.write(encode_frame({"role": "control"}))
        return cls(reader, writer)

    async def _read_replies(self) -> None:
        try:
            while True:
                message = await read_frame(self._reader)
                request_id = message.get("id")
                entry = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
                if entry is None:
                    raise ProtocolError(f"agent replied to request id {str(request_id)[:32]} that was never sent")
                request_type, future = entry
                try:
                    result = check_reply(message, request_type)
                except SchemaError as exc:
                    error = ProtocolError(f"invalid {request_type} reply from agent: {exc}")
                    # Its entry is out of _pending already: _fail() would not reach it,
                    # and the caller would wait for its timeout (or, with none, forever).
                    if not future.done():
                        future.set_exception(error)
                    raise error from None
                if not future.done():
                    if "error" in result:
                        err = result["error"]
                        future.set_exception(AgentRequestError(request_type, err["code"], err["message"]))
                    else:
                        future.set_result(result)
        except (EOFError, OSError) as exc:
            self._fail(AgentError(f"agent connection closed: {exc}"))
        except FrameError as exc:
            self._fail(ProtocolError(f"agent broke framing: {exc}"))
        except ProtocolError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(AgentError("agent connection closed"))
            raise

    def _fail(self, exc: Exception) -> None:
        self._failure = exc
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        self._writer.close()

    async def request(self, request_type: str, args: dict | None = None,
                      timeout: float | None = DEFAULT_TIMEOUT) -> dict:
        if self._failure is not None:
            raise self._failure
        if len(self._pending) >= MAX_PENDING:
            raise AgentError("too many requests in flight")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (request_type, future)
        self._writer.write(encode_frame({"id": request_id, "type": request_type, "args": args or {}}))
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise AgentTimeout(f"agent did not answer {request_type} within {timeout:.0f} s") from None
        if request_type in REPLY_MILESTONES:
            mark(REPLY_MILESTONES[request_type], **({"uptime": result.get("uptime")} if request_type == "ping" else {}))
        return result

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        try:
            # Bounded: close() first flushes what is buffered, which never ends
            # if the guest has stopped reading (frozen, or hostile).
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            self._writer.transport.abort()
        except (OSError, VsockError):
            pass
