"""A network namespace, opened by path, and a way to run code inside it.

setns(2) with CLONE_NEWNET changes only the calling thread, so each piece of
work runs in a fresh thread that enters the namespace and ends with it: the
rest of the process (the monitor's event loop, QEMU's launch) never leaves
its own namespace. Sockets and the tap device opened in that thread belong
to the namespace for good, whichever thread uses them later.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading

from .. import hostsys
from .errors import NetworkError

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703      # _IO(0xb7, 0x3), linux/nsfs.h

_libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    """An open network namespace; `identity` tells it apart from a later one at the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"network namespace {path}: {exc.strerror}") from None
        try:
            kind = fcntl.ioctl(self.fd, NS_GET_NSTYPE)
        except OSError as exc:
            os.close(self.fd)
            raise NetworkError(f"{path} is not a namespace ({exc.strerror})") from None
        if kind != CLONE_NEWNET:
            os.close(self.fd)
            raise NetworkError(f"{path} is a namespace, but not a network namespace")
        info = os.fstat(self.fd)
        self.identity = (info.st_dev, info.st_ino)

    def enter(self) -> None:
        """Move the calling process into this namespace. Only for a process
        with one thread: a child between fork and exec (a preexec_fn)."""
        hostsys.setns(self.fd, CLONE_NEWNET)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, function, *args):
        """function(*args) in a thread inside this namespace; its result or its exception."""
        outcome: dict = {}

        def inside() -> None:
            try:
                if _libc.setns(self.fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetworkError(f"cannot enter network namespace {self.path}: {os.strerror(err)}")
                outcome["result"] = function(*args)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=inside, name="kata-py-netns")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


def open_if_same(path: str, identity: tuple[int, int]) -> Netns | None:
    """The namespace at `path` if it is still the one recorded; None when it is
    gone (and with it everything made in it) or replaced by another."""
    try:
        netns = Netns(path)
    except NetworkError:
        return None
    if netns.identity != tuple(identity):
        netns.close()
        return None
    return netns
