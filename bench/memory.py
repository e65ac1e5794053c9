"""Memory per idle sandbox and density, in one ramp of idle kata-py containers.

memory   PSS (/proc/PID/smaps_rollup) of everything an idle sandbox adds on the
         host: its monitor and the monitor's children (QEMU, the vsock
         backend), at 1, 10 and 30 sandboxes, each sampled 5 times; per
         sandbox: median/min/max over sandboxes x samples. runc, crun and runsc
         are measured once, at 1 container, for reference (every process whose
         command line names the container, plus its children).
density  sandboxes are added a few at a time (in parallel, untimed); at every
         checkpoint one more is started alone and timed (`run --detach`:
         create + start of an idle container). The baseline is the median of
         the first three starts. The ramp ends when a start takes twice the
         baseline (confirmed by a second start), at the cap, or when its time
         budget is spent; the answer is the count before the doubling, or
         ">= count".
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from .common import GENERIC, Peers, run_timed, summary

SAMPLES = 5
SAMPLE_INTERVAL = 1.0
SETTLE = 8.0          # after a start: late guest modules, free page reporting


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _smaps(pid: int) -> dict:
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                    fields[key] = int(rest.split()[0]) / 1024
    except OSError:
        return {}
    return fields


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
    except OSError:
        return "gone"
    if b"qemu-system" in cmdline:
        return "qemu"
    if b"kata_py.vsock" in cmdline:
        return "vsock_backend"
    if b"kata_py.sandbox.owner" in cmdline:
        return "monitor"
    return "other"


def pss_by_kind(processes, out: dict | None = None) -> dict:
    """PSS in MiB of (pid, kind) pairs, summed by kind and in all, with QEMU's
    split into anonymous memory, guest RAM (shmem) and file mappings."""
    out = {} if out is None else out
    out.setdefault("total", 0.0)
    for pid, kind in processes:
        fields = _smaps(pid)
        if not fields:
            continue
        out[kind] = out.get(kind, 0.0) + fields["Pss"]
        out["total"] += fields["Pss"]
        if kind == "qemu":
            for key in ("Pss_Anon", "Pss_Shmem", "Pss_File"):
                name = "qemu_" + key[4:].lower()
                out[name] = out.get(name, 0.0) + fields.get(key, 0.0)
    return out


def sandbox_pss(monitor_pid: int) -> dict:
    """PSS in MiB of one sandbox's processes, by kind, and QEMU's by type."""
    return pss_by_kind((pid, _kind(pid)) for pid in _tree(monitor_pid))


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Ramp:
    def __init__(self, peers: Peers, bundle: Path, parallel: int, name: str = "kata-py") -> None:
        self.peers = peers
        self.bundle = bundle
        self.parallel = parallel
        self.name = name   # kata-py, or kata-py on the generic-kernel image
        self.ids: list[str] = []
        self.serial = 0

    def _new_id(self) -> str:
        self.serial += 1
        return f"idle{self.serial}-{os.getpid()}"

    def start_one(self) -> float:
        container_id = self._new_id()
        self.ids.append(container_id)
        result = run_timed(self.peers.binary(self.name) + ["run", "--detach", "--bundle", self.bundle, container_id],
                           capture=False, timeout=300, env=self.peers.env(self.name))
        if result.returncode != 0:
            raise RuntimeError(f"kata-py run --detach {container_id} failed ({result.returncode})")
        return result.wall

    def add(self, count: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
            for future in [pool.submit(self.start_one) for _ in range(count)]:
                future.result()

    def monitor_pids(self) -> list[int]:
        pids = []
        for container_id in self.ids:
            state = subprocess.run(self.peers.binary(self.name) + ["state", container_id], capture_output=True)
            if state.returncode == 0:
                pids.append(json.loads(state.stdout)["pid"])
        return pids

    def sample_memory(self) -> dict:
        pids = self.monitor_pids()
        per_sandbox: list[dict] = []
        for i in range(SAMPLES):
            if i:
                time.sleep(SAMPLE_INTERVAL)
            per_sandbox += [sandbox_pss(pid) for pid in pids]
        keys = sorted({k for s in per_sandbox for k in s})
        return {"sandboxes": len(pids), "pss_mib": {k: summary([s.get(k, 0.0) for s in per_sandbox], 1) for k in keys}}

    def delete_all(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda cid: self.peers.delete(self.name, cid), self.ids))
        self.ids.clear()


def _peer_memory(peers: Peers, bundle: Path) -> dict:
    """PSS of one idle runc/crun/runsc container: every process whose command
    line names the container id, with its children."""
    out = {}
    for name in peers.usable():
        if name == "kata-py":
            continue
        container_id = f"mem-{name}-{os.getpid()}"
        try:
            peers.start_detached(name, bundle, container_id)
            time.sleep(2.0)
            roots = []
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if container_id.encode() in f.read():
                            roots.append(pid)
                except OSError:
                    continue
            state = subprocess.run(peers.binary(name) + ["state", container_id], capture_output=True,
                                   preexec_fn=peers.preexec(name))
            if state.returncode == 0:
                roots.append(json.loads(state.stdout)["pid"])
            pids = {p for root in roots for p in _tree(root)}
            out[name] = {"processes": len(pids), "pss_mib": round(sum(_smaps(p).get("Pss", 0.0) for p in pids), 1)}
        except Exception as exc:  # a reference figure: report, do not fail the suite
            out[name] = {"error": str(exc)[:300]}
        finally:
            peers.delete(name, container_id)
    return out


def generic_memory(peers: Peers, bundle: Path, memory_at: list[int], parallel: int) -> dict:
    """PSS per sandbox at the same counts with the generic-kernel image (the
    image of before the project's own kernel and read-only root disk)."""
    if peers.available.get(GENERIC) != "":
        return {"error": peers.available.get(GENERIC, "not probed")}
    ramp = Ramp(peers, bundle, parallel, GENERIC)
    out: dict = {}
    try:
        count = 0
        for checkpoint in sorted(set(memory_at)):
            ramp.add(checkpoint - count)
            count = checkpoint
            time.sleep(SETTLE)
            out[str(count)] = ramp.sample_memory()
    finally:
        ramp.delete_all()
    return out


def measure(peers: Peers, bundle: Path, memory_at: list[int], cap: int, step: int, parallel: int,
            budget_s: float) -> dict:
    began = time.monotonic()
    ramp = Ramp(peers, bundle, parallel)
    available_before = _mem_available_mib()
    memory: dict = {}
    probes: list[dict] = []
    result: dict = {"cap": cap, "step": step, "parallel_starts": parallel, "time_budget_s": budget_s}
    checkpoints = sorted(set(memory_at) | set(range(step, cap + 1, step)) | {1, 2, 3})
    try:
        baseline_samples = []
        density = None
        count = 0
        for checkpoint in checkpoints:
            # The memory counts are always reached; the density ramp beyond
            # them stops when the time budget is spent.
            if checkpoint > max(memory_at) and time.monotonic() - began > budget_s:
                result["stopped_by"] = f"time budget ({budget_s:.0f} s) at {count} sandboxes"
                break
            if checkpoint - 1 > count:
                ramp.add(checkpoint - 1 - count)
            seconds = ramp.start_one()
            count = checkpoint
            probes.append({"sandboxes": count, "start_s": round(seconds, 3)})
            if count <= 3:
                baseline_samples.append(seconds)
            else:
                baseline = statistics.median(baseline_samples)
                if seconds > 2 * baseline:
                    again = ramp.start_one()
                    count += 1
                    probes.append({"sandboxes": count, "start_s": round(again, 3), "confirming": True})
                    if statistics.median([seconds, again]) > 2 * baseline:
                        density = checkpoint - 1
                        result["stopped_by"] = f"start time doubled at {checkpoint} sandboxes"
                        break
            if count in memory_at:
                time.sleep(SETTLE)
                memory[str(count)] = ramp.sample_memory()
                memory[str(count)]["mem_available_drop_per_sandbox_mib"] = round(
                    (available_before - _mem_available_mib()) / count, 1)
        baseline = statistics.median(baseline_samples) if baseline_samples else None
        result.update({
            "baseline_start_s": round(baseline, 3) if baseline else None,
            "probes": probes,
            "max_sandboxes_started": count,
            "density": density if density is not None else f">= {count}",
        })
        if density is None and "stopped_by" not in result:
            result["stopped_by"] = f"cap ({cap})"
    finally:
        ramp.delete_all()
    result["seconds"] = round(time.monotonic() - began, 1)
    return {"memory": memory, "density": result, "peer_memory_at_1": _peer_memory(peers, bundle),
            "generic_kernel_memory": generic_memory(peers, bundle, memory_at, parallel)}
