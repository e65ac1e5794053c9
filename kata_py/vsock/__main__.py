"""Entry point of the vhost-user-vsock back end process.

The runtime binds and listens on both sockets itself and passes them as fds, so QEMU
can connect before this process has even started running Python.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .backend import Backend, RateLimitedLog


def _listener(fd: int | None, path: str | None, what: str) -> socket.socket:
    if fd is not None:
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise SystemExit(f"--{what}-fd {fd} is not a Unix stream socket")
        return sock
    if path is None:
        raise SystemExit(f"need --{what}-fd or a path for the {what} socket")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kata_py.vsock",
                                 description="vhost-user-vsock back end with hybrid vsock")
    ap.add_argument("--vhost-fd", type=int, help="listening vhost-user socket (inherited)")
    ap.add_argument("--vhost-path", help="create the vhost-user socket here instead")
    ap.add_argument("--uds-fd", type=int, help="listening hybrid vsock socket (inherited)")
    ap.add_argument("--uds-path", required=True,
                    help="hybrid socket path; guest connects to port P reach <path>_P")
    ap.add_argument("--guest-cid", type=int, default=3)
    ap.add_argument("--max-connections", type=int, default=1024)
    ap.add_argument("--broker-fd", type=int,
                    help="a socket to a broker outside this process's jail that connects to the host services")
    args = ap.parse_args(argv)
    if not 3 <= args.guest_cid < 0xFFFFFFFF:
        ap.error("--guest-cid must be in 3..2^32-2")
    vhost = _listener(args.vhost_fd, args.vhost_path, "vhost")
    uds = _listener(args.uds_fd, args.uds_path if args.uds_fd is None else None, "uds")
    backend = Backend(vhost, uds, args.uds_path, args.guest_cid, log=RateLimitedLog(sys.stderr),
                      max_connections=args.max_connections)
    backend.parent_pid = os.getppid()
    if args.broker_fd is not None:
        backend.broker = socket.socket(fileno=args.broker_fd)
    backend.install_signal_handlers()
    return backend.run()


if __name__ == "__main__":
    sys.exit(main())
