"""One request to a container's guest agent, without asyncio.

For the short-lived CLI commands (`start`, `kill`, `ps`, `update`, `events
--stats`, `delete`): importing asyncio (and the ssl it pulls in) costs such a
command about as much CPU as the rest of it together. The same checks as the
asyncio client: frames size-capped, the reply validated against the schema of
the request it answers, and a timeout on the whole exchange.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..errors import AgentError, AgentTimeout, ProtocolError
from ..protocol import AGENT_PORT
from ..protocol.framing import FrameError, recv_frame, send_frame
from ..protocol.messages import SchemaError, check_reply
from ..timing import REPLY_MILESTONES, mark

DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


def transport_of(vsock: dict, run_dir: str | None):
    """The host end of a container's vsock, from its state record."""
    from ..vsock.transport import HybridVsock, KernelVsock

    if "cid" in vsock:
        return KernelVsock(int(vsock["cid"]))
    return HybridVsock(Path(run_dir))


class _Deadline:
    """A socket whose every recv() gets only the time left until `deadline`:
    with one timeout per recv, a guest sending a byte at a time would stretch
    a frame's read without bound."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv(self, size: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        self.sock.settimeout(left)
        return self.sock.recv(size)


def request(transport, request_type: str, args: dict | None = None,
            timeout: float | None = DEFAULT_TIMEOUT) -> dict:
    """Send one request on a new control connection; return the result."""
    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + limit
    # A live agent accepts at once; a frozen guest is found out in 10 s, not 30
    # (as with the asyncio path's exec_process.CONNECT_TIMEOUT).
    sock = transport.connect_sync(AGENT_PORT, min(limit, CONNECT_TIMEOUT))
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        send_frame(sock, {"role": "control"})
        send_frame(sock, {"id": 1, "type": request_type, "args": args or {}})
        while True:
            message = recv_frame(_Deadline(sock, deadline))
            if message.get("id") != 1:
                raise ProtocolError(f"agent replied to request id {str(message.get('id'))[:32]} that was never sent")
            result = check_reply(message, request_type)
            break
    except socket.timeout:
        raise AgentTimeout(f"agent did not answer {request_type} within {limit:.0f} s") from None
    except (EOFError, OSError) as exc:
        raise AgentError(f"agent connection closed: {exc}") from None
    except FrameError as exc:
        raise ProtocolError(f"agent broke framing: {exc}") from None
    except SchemaError as exc:
        raise ProtocolError(f"invalid {request_type} reply from agent: {exc}") from None
    finally:
        sock.close()
    if "error" in result:
        from .agent_client import AgentRequestError

        raise AgentRequestError(request_type, result["error"]["code"], result["error"]["message"])
    if request_type in REPLY_MILESTONES:
        mark(REPLY_MILESTONES[request_type])
    return result
