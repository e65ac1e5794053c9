#!/usr/bin/env python3
"""The smallest guest RAM that runs the agent reliably: boot N sandboxes at
each size (interleaved, a few at a time), run a process in each, and count
what worked. Not part of the suite (it takes N x sizes boots); its figures go
in the README. Usage: python -m bench.ramsize [--boots 20] [--sizes 64,80,96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kata_py.errors import KataError  # noqa: E402
from kata_py.image import ensure_image  # noqa: E402
from kata_py.sandbox.process import run_process  # noqa: E402
from kata_py.sandbox.sandbox import Sandbox  # noqa: E402


async def boot_once(image, memory_mib: int) -> dict:
    started = time.monotonic()
    sandbox = Sandbox(image, memory_mib=memory_mib)
    try:
        await sandbox.start()
        read, write = os.pipe()
        try:
            status = await asyncio.wait_for(run_process(sandbox, ["sh", "-c", "grep -E 'MemAvailable' /proc/meminfo"],
                                                        stdin_fd=None, stdout_fd=write, stderr_fd=None), 120)
        finally:
            os.close(write)
            output = os.read(read, 4096).decode(errors="replace")
            os.close(read)
        available = int(output.split()[1]) // 1024 if output.startswith("MemAvailable") else None
        return {"ok": status == 0, "seconds": round(time.monotonic() - started, 2), "mem_available_mib": available}
    except (KataError, OSError, asyncio.TimeoutError) as exc:
        return {"ok": False, "seconds": round(time.monotonic() - started, 2), "error": str(exc).splitlines()[0][:200],
                "console_tail": getattr(exc, "console_tail", "")[-600:]}
    finally:
        await sandbox.stop()


async def main_async(args) -> dict:
    image = ensure_image(progress=False)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {size: [] for size in sizes}
    queue = [size for _ in range(args.boots) for size in sizes]   # interleaved
    gate = asyncio.Semaphore(args.parallel)

    async def one(size):
        async with gate:
            results[size].append(await boot_once(image, size))

    await asyncio.gather(*(one(size) for size in queue))
    out = {}
    for size, runs in results.items():
        ok = [r for r in runs if r["ok"]]
        out[str(size)] = {"boots": len(runs), "ok": len(ok),
                          "mem_available_mib": sorted({r["mem_available_mib"] for r in ok}),
                          "failures": [r for r in runs if not r["ok"]][:3]}
    return {"benchmark": "guest RAM", "initrd_bytes": image.initrd.stat().st_size, "sizes": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=20)
    parser.add_argument("--sizes", default="64,80,96")
    parser.add_argument("--parallel", type=int, default=2)
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
