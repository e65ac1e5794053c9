#!/usr/bin/env python3
"""stdio throughput through the sandbox: guest -> host (stdout) and host -> guest
(stdin), over one booted sandbox (boot excluded), median of N runs, as JSON.

Usage: bench/stdio.py [--mib 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kata_py.image import ensure_image  # noqa: E402
from kata_py.sandbox.process import run_process  # noqa: E402
from kata_py.sandbox.sandbox import Sandbox  # noqa: E402


DEVNULL = os.open(os.devnull, os.O_WRONLY)


def _drain(fd: int, counter: list) -> None:
    while data := os.read(fd, 1 << 20):
        counter[0] += len(data)
    os.close(fd)


def _feed(fd: int, size: int) -> None:
    chunk = b"\xa5" * (1 << 20)
    for _ in range(size >> 20):
        os.write(fd, chunk)
    os.close(fd)


async def guest_to_host(sb, size: int) -> float:
    r, w = os.pipe()
    got = [0]
    reader = threading.Thread(target=_drain, args=(r, got))
    reader.start()
    started = time.monotonic()
    # dd, not busybox `head -c`: head copies in tiny pieces and, under TCG, is
    # itself slower than the whole path it would be measuring.
    status = await run_process(sb, ["dd", "if=/dev/zero", "bs=65536", f"count={size >> 16}"], stdin_fd=None,
                               stdout_fd=w, stderr_fd=DEVNULL)
    os.close(w)
    reader.join()
    elapsed = time.monotonic() - started
    assert status == 0 and got[0] == size, (status, got[0])
    return size / elapsed / 1e6


async def host_to_guest(sb, size: int) -> float:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    got = [0]
    feeder = threading.Thread(target=_feed, args=(w, size))
    reader = threading.Thread(target=_drain, args=(out_r, got))
    feeder.start()
    reader.start()
    started = time.monotonic()
    status = await run_process(sb, ["dd", "of=/dev/null", "bs=65536"], stdin_fd=r, stdout_fd=out_w,
                               stderr_fd=DEVNULL)
    elapsed = time.monotonic() - started
    os.close(out_w)
    os.close(r)
    feeder.join()
    reader.join()
    assert status == 0, status
    return size / elapsed / 1e6


async def main_async(args) -> dict:
    size = args.mib << 20
    out, inn = [], []
    async with Sandbox(ensure_image(progress=False), memory_mib=192) as sb:
        for _ in range(args.runs):
            out.append(await guest_to_host(sb, size))
            inn.append(await host_to_guest(sb, size))
    summary = lambda v: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),  # noqa: E731
                         "max": round(max(v), 1), "runs": len(v)}
    return {"benchmark": "stdio", "bytes_per_run": size, "guest_to_host_MBps": summary(out),
            "host_to_guest_MBps": summary(inn)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
