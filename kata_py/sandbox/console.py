"""--console-socket: a host pty whose master goes to the caller over SCM_RIGHTS.

The container's terminal is a pty inside the guest; on the host the process
that stands for the guest process (the sandbox owner for an OCI container's
init, an exec relay for `exec --detach`) holds the slave side of a host pty
and relays it to the guest pty both ways, and sends the master to whoever
listens on the console socket (conmon, the containerd shim, a test).
Window-size changes made on the master reach that process as SIGWINCH,
because the slave is its controlling terminal.
"""

from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import struct
import termios
import tty

from ..errors import ConfigError


class HostConsole:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        # Raw: the guest's pty does the line discipline (echo, ^C); this one
        # only carries bytes.
        tty.setraw(self.slave)

    def send_master(self, console_socket: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(console_socket)
            # runc sends the pty's name as the message and the fd as ancillary data.
            sock.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.master]))])
        except OSError as exc:
            raise ConfigError(f"--console-socket {console_socket}: {exc.strerror}") from None
        finally:
            sock.close()
        os.close(self.master)
        self.master = -1

    def take_controlling_terminal(self) -> None:
        """Needs a process that leads its session and has no terminal yet."""
        fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)

    def size(self) -> tuple[int, int]:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(self.slave, termios.TIOCGWINSZ, b"\0" * 8))
        return rows, cols

    def attach_session(self, session) -> None:
        """Pass this terminal's size to the guest process now and on every
        SIGWINCH. Resizes are only seen by a session leader without a terminal
        (owners and relays); elsewhere the size is passed once."""
        import asyncio
        import logging

        from ..errors import KataError

        async def resize() -> None:
            try:
                await session.resize(*self.size())
            except KataError as exc:
                logging.getLogger(__name__).debug("resize: %s", exc)

        try:
            self.take_controlling_terminal()
        except OSError:
            return
        asyncio.get_running_loop().add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(resize()))

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
