#!/usr/bin/env python3
"""Boot benchmark: the floor, time to agent ready, and a whole `vm run -- true`,
side by side in one run, each the median of N runs (with min and max).

floor        same QEMU, kernel and machine as a sandbox; an initramfs whose init
             powers off at once; time from spawn to QEMU's exit
agent_ready  Sandbox.start(): spawn the vsock backend and QEMU, boot, first ping
vm_run_true  wall time of the CLI `kata-py vm run -- true`, teardown included

Prints JSON on stdout. Usage: bench/boot.py [--runs N] [--machine microvm|q35]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import summary  # noqa: E402
from kata_py import paths  # noqa: E402
from kata_py.image import ensure_image  # noqa: E402
from kata_py.sandbox.sandbox import Sandbox  # noqa: E402
from kata_py.vmm.probe import boot_floor, choose_accel  # noqa: E402


def bench_floor(image, accel: str, machine: str) -> float:
    ok, seconds, detail = boot_floor(image.kernel, image.floor_initrd, accel, 60, machine=machine)
    if not ok:
        raise SystemExit(f"floor boot failed: {detail}")
    return seconds


def bench_agent_ready(image, accel: str, machine: str) -> tuple[float, float]:
    async def once():
        sandbox = Sandbox(image, accel=accel, machine=machine)
        await sandbox.start()
        ready = sandbox.times.agent_ready
        started = time.monotonic()
        await sandbox.stop()
        return ready, time.monotonic() - started
    return asyncio.run(once())


def bench_vm_run(machine: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "kata_py.cli.main", "vm", "run", "--machine", machine, "--", "true"],
                   check=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--machine", default="microvm", choices=("microvm", "q35"))
    args = parser.parse_args()
    image = ensure_image(progress=False)
    accel = choose_accel(image.kernel, image.floor_initrd, paths.state_dir()).accel
    floor, ready, teardown, total = [], [], [], []
    # Interleaved, so a slow spell of the host hits every measure alike.
    for _ in range(args.runs):
        floor.append(bench_floor(image, accel, args.machine))
        r, t = bench_agent_ready(image, accel, args.machine)
        ready.append(r)
        teardown.append(t)
        total.append(bench_vm_run(args.machine))
    result = {
        "benchmark": "boot",
        "machine": args.machine,
        "accel": accel,
        "host_cpus": os.cpu_count(),
        "kernel_release": image.kernel_release,
        "initrd_bytes": image.initrd.stat().st_size,
        "floor_s": summary(floor),
        "agent_ready_s": summary(ready),
        "sandbox_stop_s": summary(teardown),
        "vm_run_true_s": summary(total),
    }
    result["agent_ready_over_floor"] = round(result["agent_ready_s"]["median"] / result["floor_s"]["median"], 3)
    result["vm_run_true_over_floor"] = round(result["vm_run_true_s"]["median"] / result["floor_s"]["median"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
