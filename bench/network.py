#!/usr/bin/env python3
"""TCP throughput through the tap: host -> guest and guest -> host, over one
booted sandbox whose network namespace is joined to the host's by a veth
(the path a container's traffic takes: veth, tc mirred, tap, virtio-net),
median of N runs, as JSON. Needs root.

Host -> guest: the host sends N MiB to a receiver in the guest, timed until
the receiver has counted them all. Guest -> host: a sender in the guest, timed
on the host from its accept until the last byte.

Usage: bench/network.py [--mib 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kata_py.image import ensure_image  # noqa: E402
from kata_py.network import attach, configure_guest  # noqa: E402
from kata_py.sandbox.process import run_process  # noqa: E402
from kata_py.sandbox.sandbox import Sandbox  # noqa: E402
from tests.network_helpers import Namespaces  # noqa: E402

HOST, GUEST = "10.231.200.1", "10.231.200.2"
TO_GUEST_PORT, TO_HOST_PORT = 5001, 5002
DEVNULL = os.open(os.devnull, os.O_RDWR)
PYTHON = "/usr/bin/python3.11"


# The guest's ends are small Python programs (the guest's own interpreter) that
# move 1 MiB per system call: busybox nc copies in small pieces and, under
# TCG, would itself be slower than the path being measured.
GUEST_RECEIVER = """
import socket, sys
with socket.create_server(("", %d)) as server:
    conn, _ = server.accept()
    got = 0
    while data := conn.recv(1 << 20):
        got += len(data)
sys.exit(0 if got == %d else 1)
"""
GUEST_SENDER = """
import socket
chunk = bytes(1 << 20)
with socket.create_connection(("%s", %d)) as conn:
    for _ in range(%d):
        conn.sendall(chunk)
"""


def _connect() -> socket.socket:
    """The guest's receiver may not listen yet."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.create_connection((GUEST, TO_GUEST_PORT), timeout=60)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _send(conn: socket.socket, size: int) -> None:
    chunk = b"\xa5" * (1 << 20)
    with conn:
        for _ in range(size >> 20):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass


async def host_to_guest(sb, size: int) -> float:
    """From the first byte sent to the guest having counted them all."""
    receiver = asyncio.ensure_future(run_process(sb, [PYTHON, "-SB", "-c", GUEST_RECEIVER % (TO_GUEST_PORT, size)],
                                                 stdin_fd=None, stdout_fd=DEVNULL, stderr_fd=DEVNULL))
    conn = await asyncio.to_thread(_connect)
    started = time.monotonic()
    await asyncio.to_thread(_send, conn, size)
    assert await receiver == 0, "the guest did not receive every byte"
    return size / (time.monotonic() - started) / 1e6


def _receive(listener: socket.socket, size: int, result: list) -> None:
    conn, _ = listener.accept()
    got = 0
    with conn:
        started = time.monotonic()
        while data := conn.recv(1 << 20):
            got += len(data)
        result.append((got, time.monotonic() - started))


async def guest_to_host(sb, size: int) -> float:
    with socket.create_server((HOST, TO_HOST_PORT)) as listener:
        result: list = []
        receiver = threading.Thread(target=_receive, args=(listener, size, result))
        receiver.start()
        status = await run_process(sb, [PYTHON, "-SB", "-c", GUEST_SENDER % (HOST, TO_HOST_PORT, size >> 20)],
                                   stdin_fd=None, stdout_fd=DEVNULL, stderr_fd=DEVNULL)
        await asyncio.to_thread(receiver.join)
    got, elapsed = result[0]
    assert status == 0 and got == size, (status, got)
    return size / elapsed / 1e6


async def main_async(args, netns_path: str, record_dir: str) -> dict:
    size = args.mib << 20
    to_guest, to_host = [], []
    attachment = await asyncio.to_thread(attach, netns_path, Path(record_dir) / "network.json", "bench")
    try:
        async with Sandbox(ensure_image(progress=False), memory_mib=192, nics=attachment.nics) as sb:
            await configure_guest(attachment, sb.agent)
            for _ in range(args.runs):
                to_guest.append(await host_to_guest(sb, size))
                to_host.append(await guest_to_host(sb, size))
            accel = sb.machine.config.accel
    finally:
        await asyncio.to_thread(attachment.detach)
    summary = lambda v: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),  # noqa: E731
                         "max": round(max(v), 1), "runs": len(v)}
    return {"benchmark": "network", "path": "veth -> tc mirred -> tap -> virtio-net (no vhost)", "accel": accel,
            "bytes_per_run": size, "host_to_guest_MBps": summary(to_guest), "guest_to_host_MBps": summary(to_host)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/network.py needs root (network namespaces)")
    namespaces = Namespaces()
    try:
        ns = namespaces.create()
        namespaces.veth(None, f"kpb{os.getpid() % 100000}h", f"{HOST}/24", ns, "eth0", f"{GUEST}/24")
        with tempfile.TemporaryDirectory(prefix="kata-py-bench-") as record_dir:
            result = asyncio.run(main_async(args, namespaces.path(ns), record_dir))
    finally:
        namespaces.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
