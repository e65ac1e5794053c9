"""A hostile agent, for testing that the host holds up against its guest.

Off unless the kernel command line says `kata_agent.hostile=<mode>`, which
only a test's Sandbox(kernel_args=[...]) puts there; without it nothing here
runs and the agent behaves as ever. A guest that wants to be hostile needs no
switch, of course: this one only makes hostility reproducible.

Modes on the command line:
  panic    crash the guest kernel (sysrq `c`) before listening: PID 1 dies at boot
  mute     listen and read requests, never answer one (not even ping)
  select   answer as usual, except to a create_process whose argv is
           [TRIGGER, how, params...]: that request picks the misbehaviour, so
           one booted guest serves a whole test module.

What `how` can be (params in brackets, all numbers):
  oversize      a header announcing a 64 MiB frame, then junk
  invalid-json / bad-utf8 / deep-json / huge-int / not-object
                a frame of the right size holding that
  bad-schema    a reply with a result its request does not have
  wrong-id      a reply to a request id never sent
  never-reply   nothing, ever
  drip          a frame header, then a byte a second
  flood-replies [count] replies to ids never sent, as fast as possible
  panic         crash the guest kernel now
  stream-bad-ack          the process's streams get a garbage ack
  stream-flood [seconds, on]  the process's stdout gets zeros for that long,
                          then it "exits" (wait_process answers) and the
                          stream stays open: silent, or with on=1 flooding on
  connect-flood [dead_port, count, live_port, held, hold_seconds]
                count guest->host connections to dead_port (nobody listens),
                then `held` to live_port kept open for hold_seconds
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import threading
import time

from kata_py.protocol.framing import encode_frame

from .pid1 import kernel_param, log

PARAM = "kata_agent.hostile"
TRIGGER = "kata-agent-hostile"
HOST_CID = 2
RLIMIT_NOFILE = 7
FD_LIMIT = 8192             # connect-flood holds more sockets than the default 1024
CONNECT_BATCH = 256


def mode_from_cmdline(path: str = "/proc/cmdline") -> str | None:
    return kernel_param(PARAM, path)


def panic() -> None:
    log("hostile: crashing the kernel")
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")


def _send(conn, send_lock, data: bytes) -> None:
    with send_lock:
        conn.sendall(data)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Hostile:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.fake: dict[str, tuple[str, list[int]]] = {}    # process id -> (how, params)
        self.exited: dict[str, threading.Event] = {}

    @classmethod
    def from_cmdline(cls) -> "Hostile | None":
        mode = mode_from_cmdline()
        if mode is None:
            return None
        log(f"hostile mode {mode!r}")
        return cls(mode)

    def at_boot(self) -> None:
        if self.mode == "panic":
            panic()

    # -- the control connection ------------------------------------------

    def take(self, conn, send_lock, request_id: int, request_type: str, args: dict) -> bool:
        """Whether this request is answered here (or deliberately not at all)."""
        if self.mode == "mute":
            return True
        if self.mode != "select":
            return False
        process_id = args.get("process_id")
        if request_type == "create_process" and (args.get("argv") or [None])[0] == TRIGGER:
            how, params = args["argv"][1], [int(p) for p in args["argv"][2:]]
            log(f"hostile: {how} {params}")
            return self._misbehave(conn, send_lock, request_id, how, params, process_id)
        if process_id in self.fake:
            self._fake_process(conn, send_lock, request_id, request_type, process_id)
            return True
        return False

    def _misbehave(self, conn, send_lock, request_id: int, how: str, params: list[int], process_id: str) -> bool:
        if how == "oversize":
            _send(conn, send_lock, struct.pack(">I", 64 << 20) + b"\x00" * (1 << 20))
        elif how == "invalid-json":
            _send(conn, send_lock, _frame(b'{"id": %d, "ok": tru' % request_id))
        elif how == "bad-utf8":
            _send(conn, send_lock, _frame(b'{"id": %d, "ok": true, "result": {"\xff\xfe": 1}}' % request_id))
        elif how == "deep-json":
            _send(conn, send_lock, _frame(b"[" * 500_000 + b"]" * 500_000))
        elif how == "huge-int":
            _send(conn, send_lock, _frame(b'{"id": 1' + b"0" * 100_000 + b"}"))
        elif how == "not-object":
            _send(conn, send_lock, _frame(b"[1, 2, 3]"))
        elif how == "bad-schema":
            _send(conn, send_lock, encode_frame({"id": request_id, "ok": True, "result": {"pid": "many"}}))
        elif how == "wrong-id":
            _send(conn, send_lock, encode_frame({"id": request_id + 1000, "ok": True, "result": {}}))
        elif how == "never-reply":
            pass
        elif how == "drip":
            threading.Thread(target=self._drip, args=(conn, send_lock), daemon=True).start()
        elif how == "flood-replies":
            count = params[0] if params else 100_000
            frame = encode_frame({"id": 2**53, "ok": True, "result": {}})
            try:
                for _ in range(count):
                    _send(conn, send_lock, frame)
            except OSError:
                pass  # the host hung up, as it should
        elif how == "panic":
            panic()
        elif how in ("stream-bad-ack", "stream-flood"):
            self.fake[process_id] = (how, params)
            self.exited[process_id] = threading.Event()
            _send(conn, send_lock, encode_frame({"id": request_id, "ok": True, "result": {}}))
        elif how == "connect-flood":
            reply = {"id": request_id, "ok": True, "result": {}}
            try:
                self._connect_flood(*params)
            except (OSError, TypeError) as exc:
                reply = {"id": request_id, "ok": False, "error": {"code": "failed", "message": repr(exc)}}
            _send(conn, send_lock, encode_frame(reply))
        else:
            return False
        return True

    def _drip(self, conn, send_lock) -> None:
        try:
            _send(conn, send_lock, struct.pack(">I", 100))
            while True:
                time.sleep(1)
                _send(conn, send_lock, b" ")
        except OSError:
            pass

    def _fake_process(self, conn, send_lock, request_id: int, request_type: str, process_id: str) -> None:
        """start/wait/signal for a process that exists only here."""
        def reply(result: dict) -> None:
            try:
                _send(conn, send_lock, encode_frame({"id": request_id, "ok": True, "result": result}))
            except OSError:
                pass

        if request_type in ("start_process", "prepare_process"):
            reply({"pid": 4242})
        elif request_type == "wait_process":
            def wait() -> None:
                self.exited[process_id].wait()
                reply({"exit_code": 0, "signal": None})
            threading.Thread(target=wait, daemon=True).start()
        else:
            reply({})

    # -- stream connections ------------------------------------------------

    def take_stream(self, conn, hello: dict) -> bool:
        """Whether this stream is served here; if so, the connection is ours."""
        fake = self.fake.get(hello.get("process_id"))
        if fake is None:
            return False
        how, params = fake
        exited = self.exited[hello["process_id"]]
        if how == "stream-bad-ack":
            conn.sendall(_frame(b'{"ok": "yes"}'))
            conn.close()
            exited.set()
        elif hello["stream"] != "stdout":
            conn.sendall(encode_frame({"ok": True}))
            threading.Thread(target=_hold, args=(conn,), daemon=True).start()
        else:
            conn.sendall(encode_frame({"ok": True}))
            seconds, flood_on = (params + [5, 0][len(params):])[:2]
            threading.Thread(target=_flood, args=(conn, seconds, bool(flood_on), exited), daemon=True).start()
        return True

    # -- guest -> host connections ---------------------------------------------

    def _connect_flood(self, dead_port: int, count: int, live_port: int, held: int, hold_seconds: int) -> None:
        _raise_fd_limit()
        made = 0
        while made < count:
            batch = []
            for _ in range(min(CONNECT_BATCH, count - made)):
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect((HOST_CID, dead_port))
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass    # refused at once
                batch.append(sock)
            made += len(batch)
            # Each gets its answer (a reset) before the next batch goes.
            deadline = time.monotonic() + 10
            waiting = list(batch)
            while waiting and time.monotonic() < deadline:
                _, ready, _ = select.select([], waiting, [], 1.0)
                waiting = [s for s in waiting if s not in ready]
            for sock in batch:
                sock.close()
        kept = []
        for _ in range(held):
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect((HOST_CID, live_port))
                kept.append(sock)
            except OSError:
                sock.close()    # the host refused: it has its limits
        log(f"hostile: {count} connections to port {dead_port}, holding {len(kept)} of {held} to {live_port}")

        def release() -> None:
            time.sleep(hold_seconds)
            for sock in kept:
                sock.close()
        threading.Thread(target=release, daemon=True).start()


def _flood(conn, seconds: int, flood_on: bool, exited: threading.Event) -> None:
    chunk = b"\0" * 65536
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            conn.sendall(chunk)
        exited.set()
        while flood_on:
            conn.sendall(chunk)
        _hold(conn)
    except OSError:
        pass
    finally:
        exited.set()
        conn.close()


def _hold(conn) -> None:
    """Keep a stream open and silent until the host closes it."""
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _raise_fd_limit() -> None:
    class Rlimit(ctypes.Structure):
        _fields_ = [("cur", ctypes.c_ulong), ("max", ctypes.c_ulong)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setrlimit(RLIMIT_NOFILE, ctypes.byref(Rlimit(FD_LIMIT, FD_LIMIT))) != 0:
        raise OSError(ctypes.get_errno(), "setrlimit RLIMIT_NOFILE")
