"""A client of the sandbox owner (owner.py), and the way to start one.

`spawn_owner()` starts `python -m kata_py.sandbox.owner` with one end of a
socketpair as its control connection: the sandbox lives as long as that
connection (see owner.py, "Lifetime"). `OwnerClient.connect(path)` reaches
an owner through its Unix socket instead, without tying its life to ours.

Requests are checked against the owner's schemas before they are sent (a
bad argument fails here, naming its path), and replies and events after
they arrive. Events go to listeners (`add_listener`), in the order they
came; a `gone` event also tells why the connection is about to close.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from ..errors import KataError, ProtocolError
from ..protocol.framing import FrameError, encode_frame, read_frame
from ..protocol.schema import SchemaError, validate
from .owner_protocol import MAX_FRAME, REQUESTS, check_event, check_reply

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


class OwnerRequestError(KataError):
    """The owner refused or failed a request; `code` says how (owner_protocol.ERROR_CODES)."""

    def __init__(self, request_type: str, code: str, message: str) -> None:
        self.request_type = request_type
        self.code = code
        super().__init__(message)


class OwnerConnectionError(KataError):
    """The connection to the owner is gone; `reason` is the owner's own word
    (its `gone` event) when it sent one, else None."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        self.reason = reason
        super().__init__(message)


class OwnerClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self.gone_reason: str | None = None
        self.failure: OwnerConnectionError | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, path: str | Path) -> "OwnerClient":
        reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=1 << 16)
        return cls(reader, writer)

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> "OwnerClient":
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 16)
        return cls(reader, writer)

    def add_listener(self, listener: Callable[[dict], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[dict], None]) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    async def _read(self) -> None:
        error: OwnerConnectionError
        try:
            while True:
                message = await read_frame(self._reader, MAX_FRAME)
                if "event" in message:
                    event = check_event(message)
                    if event["event"] == "gone":
                        self.gone_reason = event["reason"]
                    for listener in list(self._listeners):
                        try:
                            listener(event)
                        except Exception:   # a listener's bug must not end the connection
                            log.exception("event listener failed")
                    continue
                request_id = message.get("id")
                entry = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
                if entry is None:
                    raise ProtocolError(f"the owner replied to request id {str(request_id)[:32]} that is not pending")
                request_type, future = entry
                try:
                    result = check_reply(message, request_type)
                except SchemaError as exc:
                    # Out of _pending already: _fail() would not reach it.
                    if not future.done():
                        future.set_exception(OwnerConnectionError(
                            f"the sandbox owner broke the protocol: {exc}", self.gone_reason))
                    raise
                if future.done():
                    continue
                if "error" in result:
                    err = result["error"]
                    future.set_exception(OwnerRequestError(request_type, err["code"], err["message"]))
                else:
                    future.set_result(result)
        except (EOFError, OSError) as exc:
            error = OwnerConnectionError(f"the sandbox owner's connection closed ({exc})", self.gone_reason)
        except (FrameError, SchemaError, ProtocolError) as exc:
            error = OwnerConnectionError(f"the sandbox owner broke the protocol: {exc}", self.gone_reason)
        except asyncio.CancelledError:
            error = OwnerConnectionError("the connection to the sandbox owner was closed", self.gone_reason)
            self._fail(error)
            raise
        self._fail(error)

    def _fail(self, error: OwnerConnectionError) -> None:
        self.failure = error
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._writer.close()
        if not self.closed.done():
            self.closed.set_result(error)

    async def request(self, request_type: str, args: dict | None = None,
                      timeout: float | None = DEFAULT_TIMEOUT) -> dict:
        args = args or {}
        if request_type not in REQUESTS:
            raise OwnerRequestError(request_type, "invalid", f"unknown request {request_type!r}")
        try:
            validate(args, REQUESTS[request_type][0], "/args")
        except SchemaError as exc:
            raise OwnerRequestError(request_type, "invalid", f"{request_type}: {exc}") from None
        if self.failure is not None:
            raise self.failure
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (request_type, future)
        try:
            self._writer.write(encode_frame({"id": request_id, "type": request_type, "args": args}, MAX_FRAME))
        except FrameError as exc:
            self._pending.pop(request_id, None)
            raise OwnerRequestError(request_type, "invalid", f"{request_type}: {exc}") from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise OwnerRequestError(request_type, "timeout",
                                    f"the sandbox owner did not answer {request_type} within {timeout:g} s") from None
        except asyncio.CancelledError:
            self._pending.pop(request_id, None)
            raise

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 5.0)
        except (asyncio.TimeoutError, OSError):
            pass


async def spawn_owner(sandbox_id: str, memory_mib: int, cpus: int, log_level: str = "INFO",
                      pool: bool = False) -> tuple[asyncio.subprocess.Process, OwnerClient]:
    """Start an owner for a new sandbox, tied to this process by its control
    connection; returns the owner process and a client on that connection.
    `pool`: the owner claims a pooled VM when a VM factory has one that fits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kata_py.sandbox.owner", "--id", sandbox_id, "--memory-mib", str(memory_mib),
            "--cpus", str(cpus), "--control-fd", str(theirs.fileno()), "--log-level", log_level,
            *(["--pool"] if pool else []),
            pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            # Its own session: a terminal's ^C goes to the client, which then
            # closes the sandbox (or dies, which closes it too).
            start_new_session=True, env=env)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        client = await OwnerClient.from_socket(ours)
    except BaseException:
        ours.close()
        process.kill()
        await process.wait()
        raise
    return process, client
