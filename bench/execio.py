"""Exec latency and stdio throughput, into one running (idle) container per
runtime, interleaved round by round.

exec     wall time of `<runtime> exec ID /bin/true`
stdout   the container writes N MiB (`dd if=/dev/zero bs=64k`) to its stdout, a
         pipe the bench drains: bytes / (last byte - first byte), so the exec's
         own start is not counted
stdin    the bench writes N MiB into the container's stdin (`dd of=/dev/null`),
         from the moment the process says it runs to its exit
Either direction stops after `window` seconds of streaming (the exec is then
ended: SIGTERM to the runtime, or stdin closed), so a slow path is measured
over the first part of its N MiB rather than stalling the suite.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

from .common import Peers, run_timed, summary

CHUNK = 1 << 20


def _stdout_rate(argv: list[str], preexec, size: int, window: float) -> tuple[float, int]:
    proc = subprocess.Popen(argv + ["dd", "if=/dev/zero", "bs=65536", f"count={size >> 16}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=preexec)
    fd = proc.stdout.fileno()
    got, first, stopped = 0, None, False
    while True:
        if first is not None and not stopped and time.monotonic() - first > window:
            last = time.monotonic()
            proc.terminate()   # the runtime passes it on to the process in the container
            stopped = True
        if not select.select([fd], [], [], 1.0)[0]:
            continue
        data = os.read(fd, CHUNK)
        if not data:
            break
        if stopped:
            continue   # drained, not counted
        if first is None:
            first = time.monotonic()
        got += len(data)
    if not stopped:
        last = time.monotonic()
    status = proc.wait()
    if first is None or (not stopped and (status != 0 or got != size)):
        raise RuntimeError(f"stdout run: status {status}, {got} of {size} bytes")
    return got / (last - first) / 1e6, got


def _stdin_rate(argv: list[str], preexec, size: int, window: float) -> tuple[float, int]:
    proc = subprocess.Popen(argv + ["sh", "-c", "echo go; exec dd of=/dev/null bs=65536"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=preexec)
    if proc.stdout.readline() != b"go\n":
        proc.kill()
        proc.wait()
        raise RuntimeError("stdin run: the process did not start")
    started = time.monotonic()
    chunk = b"\xa5" * CHUNK
    sent = 0
    while sent < size and time.monotonic() - started < window:
        proc.stdin.write(chunk)
        sent += CHUNK
    proc.stdin.close()
    proc.stdout.read()
    status = proc.wait()
    elapsed = time.monotonic() - started
    if status != 0:
        raise RuntimeError(f"stdin run: status {status}")
    return sent / elapsed / 1e6, sent


def measure(peers: Peers, idle_bundle, runs: int, mib: int, exec_runs: int, window: float) -> dict:
    names = peers.usable()
    ids = {name: f"idle-{name}-{os.getpid()}" for name in names}
    started = []
    exec_wall = {name: [] for name in names}
    exec_cpu = {name: [] for name in names}
    out_rate = {name: [] for name in names}
    in_rate = {name: [] for name in names}
    moved = {name: [] for name in names}
    size = mib << 20
    try:
        for name in names:
            peers.start_detached(name, idle_bundle, ids[name])
            started.append(name)
        for round_no in range(max(runs, exec_runs)):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for name in order:
                argv = peers.exec_argv(name, ids[name], [])
                if round_no < exec_runs:
                    result = run_timed(argv + ["/bin/true"], preexec_fn=peers.preexec(name))
                    if result.returncode != 0:
                        raise RuntimeError(f"{name} exec failed: {result.stderr.decode(errors='replace')[-300:]}")
                    exec_wall[name].append(result.wall)
                    exec_cpu[name].append(result.cpu)
                if round_no < runs:
                    rate, got = _stdout_rate(argv, peers.preexec(name), size, window)
                    out_rate[name].append(rate)
                    rate, sent = _stdin_rate(argv, peers.preexec(name), size, window)
                    in_rate[name].append(rate)
                    moved[name].append(got + sent)
    finally:
        for name in started:
            peers.delete(name, ids[name])
    return {
        "exec_true_s": {n: summary(v) for n, v in exec_wall.items()},
        "exec_true_cpu_s": {n: summary(v) for n, v in exec_cpu.items()},
        "stdio_bytes": size,
        "stdio_window_s": window,
        "stdio_mib_moved_per_run": {n: summary([b / 2 / (1 << 20) for b in v], 1) for n, v in moved.items()},
        "stdout_MBps": {n: summary(v, 1) for n, v in out_rate.items()},
        "stdin_MBps": {n: summary(v, 1) for n, v in in_rate.items()},
    }
