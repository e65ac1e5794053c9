"""Drive an engine's interactive mode (`run -it`, `exec -it`) through a real pty."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time


def _controlling_tty() -> None:
    # In the child: the pty's slave (its stdin) becomes its controlling
    # terminal, as in a shell, so the engine sees a real terminal and its size.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def drive_tty(argv: list[str], script: list[tuple[bytes, bytes]], env: dict | None = None, rows: int = 24,
              cols: int = 80, timeout: float = 60) -> tuple[int, bytes]:
    """Run argv on a pty of the given size; for each (send, expect), type
    `send` and wait for `expect` in what the terminal shows."""
    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, preexec_fn=_controlling_tty)
    os.close(slave)
    seen = b""
    try:
        for send, expect in script:
            if send:
                os.write(master, send)
            deadline = time.monotonic() + timeout
            while expect not in seen:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waiting for {expect!r}; the terminal shows {seen[-400:]!r}")
                if select.select([master], [], [], 0.5)[0]:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:   # EIO: the engine exited and closed the terminal
                        chunk = b""
                    if not chunk:
                        raise TimeoutError(f"the engine exited before {expect!r}: {seen[-400:]!r}")
                    seen += chunk
        return proc.wait(timeout), seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
