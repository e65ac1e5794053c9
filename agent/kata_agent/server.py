"""The vsock listener: one thread per connection, roles set by the hello frame."""

from __future__ import annotations

import socket
import threading

from kata_py.protocol import AGENT_PORT
from kata_py.protocol.framing import FrameError, recv_frame, send_frame
from kata_py.protocol.messages import SchemaError, check_hello, check_request

from .handlers import Handlers
from .pid1 import log
from .processes import ProcessError, ProcessTable

HELLO_TIMEOUT = 10.0
MAX_CONNECTIONS = 512


class Server:
    def __init__(self, table: ProcessTable, handlers: Handlers, hostile=None) -> None:
        self.table = table
        self.handlers = handlers
        self.hostile = hostile      # hostile.Hostile: only with kata_agent.hostile= on the kernel command line
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def listen(self, port: int = AGENT_PORT) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(64)
        return sock

    def serve_forever(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            if not self.connections.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        keep_open = False
        try:
            conn.settimeout(HELLO_TIMEOUT)
            hello = check_hello(recv_frame(conn))
            conn.settimeout(None)
            if hello["role"] == "stream":
                if self.hostile is not None and self.hostile.take_stream(conn, hello):
                    keep_open = True
                    return
                try:
                    self.table.attach(hello["process_id"], hello["stream"], conn)
                except ProcessError as exc:
                    send_frame(conn, {"ok": False, "error": {"code": exc.code, "message": str(exc)}})
                    return
                send_frame(conn, {"ok": True})
                keep_open = True  # the relay thread owns it from here
            else:
                self._control(conn)
        except (EOFError, OSError, FrameError, SchemaError) as exc:
            log(f"connection dropped: {exc}")
        finally:
            if not keep_open:
                conn.close()
            self.connections.release()

    def _control(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()
        while True:
            message = recv_frame(conn)
            try:
                request_id, request_type, args = check_request(message)
            except SchemaError as exc:
                request_id = message.get("id") if isinstance(message.get("id"), int) else 0
                self._reply(conn, send_lock, {"id": request_id, "ok": False,
                                              "error": {"code": "invalid", "message": str(exc)[:4000]}})
                continue
            if self.hostile is not None and self.hostile.take(conn, send_lock, request_id, request_type, args):
                continue
            threading.Thread(target=self._handle, args=(conn, send_lock, request_id, request_type, args),
                             daemon=True).start()

    def _handle(self, conn, send_lock, request_id: int, request_type: str, args: dict) -> None:
        after = None
        try:
            result = self.handlers.dispatch(request_type, args)
            after = result.pop("_after_reply", None)
            reply = {"id": request_id, "ok": True, "result": result}
        except ProcessError as exc:
            reply = {"id": request_id, "ok": False, "error": {"code": exc.code, "message": str(exc)[:4000]}}
        except Exception as exc:  # a bug in the agent must not kill PID 1
            log(f"{request_type} failed: {exc!r}")
            reply = {"id": request_id, "ok": False, "error": {"code": "internal", "message": repr(exc)[:4000]}}
        self._reply(conn, send_lock, reply)
        if after is not None:
            after()

    def _reply(self, conn, send_lock, reply: dict) -> None:
        try:
            with send_lock:
                send_frame(conn, reply)
        except OSError as exc:
            log(f"reply lost: {exc}")
