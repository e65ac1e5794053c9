"""What the rest of the runtime uses to reach the guest agent over vsock.

Two host ends exist (see DESIGN.md): kernel vhost-vsock when /dev/vhost-vsock exists,
otherwise kata-py's own vhost-user-vsock back end with a hybrid vsock socket.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import hostsys
from ..errors import VsockError
from . import hybrid

if TYPE_CHECKING:
    import asyncio

VHOST_VSOCK_DEV = "/dev/vhost-vsock"


class VsockTransport(Protocol):
    name: str

    def start(self, launch=None) -> None: ...

    def alive(self) -> bool: ...

    def address(self) -> dict: ...

    def backend_pid(self) -> int | None: ...

    def qemu_args(self, bus: str) -> list[str]: ...

    async def open_connection(self, port: int, timeout: float
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    def connect_sync(self, port: int, timeout: float) -> socket.socket: ...

    def close(self) -> None: ...


def _check_bus(bus: str) -> None:
    if bus not in ("mmio", "pci"):
        raise ValueError(f"bus must be 'mmio' or 'pci', not {bus!r}")


class HybridVsock:
    """vhost-user-vsock served by `python -m kata_py.vsock`, hybrid socket for the host."""

    name = "vhost-user (hybrid, kata-py backend)"

    def __init__(self, run_dir: Path, guest_cid: int = 3) -> None:
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest cid {guest_cid} out of range")
        self.run_dir = Path(run_dir)
        self.guest_cid = guest_cid
        self.vhost_socket = self.run_dir / "vhost-vsock.sock"
        self.uds_path = self.run_dir / "vsock.sock"
        self.log_path = self.run_dir / "vsock-backend.log"
        self.proc: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        if len(os.fsencode(path)) >= 108:
            raise VsockError(f"socket path too long for AF_UNIX: {path}")
        try:
            return hostsys.listen_private(os.fspath(path), 64)
        except OSError as e:
            raise VsockError(f"cannot listen on {path}: {e}") from None

    def start(self, launch=None) -> None:
        """Listen, and start the back end on the listeners: `launch(args,
        fds, log_path)` starts it (kata_py.sandbox.vsock_jail: forked into
        a jail) and returns a Popen-like handle; without it, `python -m
        kata_py.vsock` as a plain child."""
        if self.proc is not None:
            raise VsockError("vsock back end already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        vhost = self._listen(self.vhost_socket)
        try:
            uds = self._listen(self.uds_path)
        except BaseException:
            vhost.close()
            self.vhost_socket.unlink(missing_ok=True)
            raise
        args = ["--vhost-fd", str(vhost.fileno()), "--uds-fd", str(uds.fileno()),
                "--uds-path", os.fspath(self.uds_path), "--guest-cid", str(self.guest_cid)]
        try:
            if launch is not None:
                self.proc = launch(args, (vhost.fileno(), uds.fileno()), self.log_path)
            else:
                env = dict(os.environ)
                pkg_root = str(Path(__file__).resolve().parents[2])
                env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                                if env.get("PYTHONPATH") else "")
                with open(self.log_path, "ab") as log:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "kata_py.vsock", *args], pass_fds=(vhost.fileno(), uds.fileno()),
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env, close_fds=True)
        except OSError as e:
            self._unlink()
            raise VsockError(f"cannot start the vsock back end: {e}") from None
        finally:
            # The child holds the listeners now; ours would only keep them alive.
            vhost.close()
            uds.close()

    def _unlink(self) -> None:
        for p in (self.vhost_socket, self.uds_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc is not None:
            proc.wait()
        release = getattr(proc, "release", None)   # what a launched back end holds here (its broker)
        if release is not None:
            release()
        self._unlink()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def address(self) -> dict:
        """How another process reaches the guest (a sandbox's record)."""
        return {"uds": str(self.uds_path)}

    def backend_pid(self) -> int | None:
        """The back end process's pid, once started (it may have exited since)."""
        return self.proc.pid if self.proc is not None else None

    def backend_log_tail(self, max_bytes: int = 4096) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- QEMU --------------------------------------------------------------

    def qemu_args(self, bus: str) -> list[str]:
        _check_bus(bus)
        device = "vhost-user-vsock-device" if bus == "mmio" else "vhost-user-vsock-pci"
        return ["-chardev", f"socket,id=vsock0,path={self.vhost_socket}",
                "-device", f"{device},chardev=vsock0"]

    # -- host connections --------------------------------------------------

    def _refused(self, port: int, why: str) -> VsockError:
        if self.proc is not None and self.proc.poll() is not None:
            return VsockError(f"vsock back end exited (status {self.proc.returncode}); "
                              f"see {self.log_path}")
        return VsockError(f"guest port {port}: {why}")

    async def open_connection(self, port: int, timeout: float
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import asyncio  # here, not at the top: the CLI's short commands connect without it

        line = hybrid.connect_line(port)

        async def handshake():
            reader, writer = await asyncio.open_unix_connection(os.fspath(self.uds_path))
            try:
                writer.write(line)
                await writer.drain()
                answer = bytearray()
                # One byte at a time so no stream data is consumed with the answer.
                while not answer.endswith(b"\n"):
                    if len(answer) >= hybrid.MAX_LINE:
                        raise VsockError(f"guest port {port}: overlong answer from the back end")
                    b = await reader.read(1)
                    if not b:
                        raise self._refused(port, "connection refused (nothing listening "
                                                  "in the guest yet?)")
                    answer += b
                try:
                    hybrid.parse_ok_line(bytes(answer))
                except hybrid.HybridError as e:
                    raise VsockError(f"guest port {port}: {e}") from None
                return reader, writer
            except BaseException:
                writer.close()
                raise

        try:
            return await asyncio.wait_for(handshake(), timeout)
        except asyncio.TimeoutError:
            raise VsockError(f"guest port {port}: no answer within {timeout:g} s") from None
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise self._refused(port, f"hybrid socket unavailable: {e}") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise self._refused(port, f"connection refused ({e})") from None

    def connect_sync(self, port: int, timeout: float) -> socket.socket:
        line = hybrid.connect_line(port)
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(self.uds_path))
            sock.sendall(line)
            answer = bytearray()
            while not answer.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                sock.settimeout(left)
                peek = sock.recv(hybrid.MAX_LINE - len(answer), socket.MSG_PEEK)
                if not peek:
                    raise self._refused(port, "connection refused (nothing listening "
                                              "in the guest yet?)")
                nl = peek.find(b"\n")
                take = len(peek) if nl < 0 else nl + 1
                answer += sock.recv(take)
                if nl < 0 and len(answer) >= hybrid.MAX_LINE:
                    raise VsockError(f"guest port {port}: overlong answer from the back end")
            try:
                hybrid.parse_ok_line(bytes(answer))
            except hybrid.HybridError as e:
                raise VsockError(f"guest port {port}: {e}") from None
            sock.settimeout(None)
            return sock
        except socket.timeout:
            sock.close()
            raise VsockError(f"guest port {port}: no answer within {timeout:g} s") from None
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise self._refused(port, f"hybrid socket unavailable: {e}") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            sock.close()
            raise self._refused(port, f"connection refused ({e})") from None
        except BaseException:
            sock.close()
            raise


class KernelVsock:
    """The kernel's vhost-vsock: QEMU opens /dev/vhost-vsock, the host uses AF_VSOCK."""

    name = "vhost-vsock (kernel)"

    def __init__(self, guest_cid: int) -> None:
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest cid {guest_cid} out of range")
        self.guest_cid = guest_cid

    def start(self, launch=None) -> None:
        """Nothing to start: QEMU opens /dev/vhost-vsock itself."""

    def alive(self) -> bool:
        return True     # no back end process of ours to lose

    def address(self) -> dict:
        """How another process reaches the guest (a sandbox's record)."""
        return {"cid": self.guest_cid}

    def backend_pid(self) -> int | None:
        return None

    def qemu_args(self, bus: str) -> list[str]:
        _check_bus(bus)
        device = "vhost-vsock-device" if bus == "mmio" else "vhost-vsock-pci"
        return ["-device", f"{device},guest-cid={self.guest_cid}"]

    def _socket(self) -> socket.socket:
        try:
            return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except (AttributeError, OSError) as e:
            raise VsockError(f"AF_VSOCK unavailable on this host: {e}") from None

    async def open_connection(self, port: int, timeout: float
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import asyncio

        sock = self._socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.guest_cid, port)), timeout)
            return await asyncio.open_connection(sock=sock)
        except asyncio.TimeoutError:
            sock.close()
            raise VsockError(f"guest port {port}: no answer within {timeout:g} s") from None
        except OSError as e:
            sock.close()
            raise VsockError(f"guest {self.guest_cid} port {port}: {e.strerror or e}") from None

    def connect_sync(self, port: int, timeout: float) -> socket.socket:
        sock = self._socket()
        sock.settimeout(timeout)
        try:
            sock.connect((self.guest_cid, port))
        except socket.timeout:
            sock.close()
            raise VsockError(f"guest port {port}: no answer within {timeout:g} s") from None
        except OSError as e:
            sock.close()
            raise VsockError(f"guest {self.guest_cid} port {port}: {e.strerror or e}") from None
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        pass


def choose_transport(run_dir: Path, guest_cid: int | None = None) -> VsockTransport:
    """KernelVsock iff /dev/vhost-vsock exists, else the hybrid back end (not started)."""
    if os.path.exists(VHOST_VSOCK_DEV):
        # Kernel CIDs are host-global; a random one rarely collides, and QEMU says so if
        # it does.
        return KernelVsock(guest_cid if guest_cid is not None
                           else random.randrange(3, 0xFFFFFFFF))
    return HybridVsock(run_dir, guest_cid if guest_cid is not None else 3)
