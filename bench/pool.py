"""Start from the VM pool (`kata-py factory`), next to runsc, interleaved.

Skipped with a note when this kata-py has no `factory` command. The factory
runs under a run directory of the bench's own (KATA_PY_RUN_DIR), so it never
touches a factory someone else runs on the host. Before each timed run the
pool is refilled (untimed): what is measured is a start that finds a VM
waiting, which is what the pool is for.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .coldstart import POOL_PHASES, phase_summary, phases_of, read_timing
from .common import KATA, NOFORK_ENV, NOPREFORK_ENV, Peers, summary

POOLED_MARK = "using pooled VM"
NOFORK_POOL = "kata-py (pool, KATA_PY_FORK=off)"   # the owner a new interpreter, as before it was forked
# A second pool beside the first (a run directory of its own), whose VMs'
# agents fork no process ahead for the first container's.
NOPREFORK_POOL = "kata-py (pool, KATA_PY_GUEST_PREFORK=off)"
REFILL_TIMEOUT = 300.0


def _factory(env: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(KATA), "factory", *args], env=env, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _wait_full(env: dict) -> dict:
    deadline = time.monotonic() + REFILL_TIMEOUT
    while True:
        status = _factory(env, "status")
        state = json.loads(status.stdout or b"{}") if status.returncode == 0 else {}
        if state.get("ready", 0) >= state.get("size", 1) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def measure(peers: Peers, bundle: Path, runs: int, size: int, memory_mib: int = 128) -> dict:
    env = dict(os.environ, KATA_PY_RUN_DIR=str(peers.work / "run-pool"))
    probe = _factory(env, "status")
    if probe.returncode != 0:
        return {"available": False,
                "note": "this kata-py has no working `factory` command: "
                        + probe.stderr.decode(errors="replace").strip().splitlines()[-1][:200]}
    envs = {"kata-py (pool)": env, NOFORK_POOL: dict(env, **NOFORK_ENV),
            NOPREFORK_POOL: dict(env, KATA_PY_RUN_DIR=str(peers.work / "run-pool-noprefork"), **NOPREFORK_ENV)}
    pools = (env, envs[NOPREFORK_POOL])
    try:
        for pool_env in pools:
            started = _factory(pool_env, "start", "--size", str(size), "--memory", str(memory_mib), "--wait", "300")
            if started.returncode != 0:
                return {"available": False,
                        "note": "kata-py factory start failed: " + started.stderr.decode(errors="replace").strip()[-300:]}
        names = list(envs) + (["runsc"] if "runsc" in peers.usable() else [])
        wall = {name: [] for name in names}
        pooled = 0
        breakdown = {name: [] for name in envs}
        for round_no in range(runs):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for name in order:
                container_id = f"pool-{name.split()[0]}-{os.getpid()}-{round_no}"
                # Both pools full, every run: a pool still booting its refill
                # would slow whichever run comes next, of either pool or runsc.
                for pool_env in pools:
                    _wait_full(pool_env)
                if name == "runsc":
                    result = peers.run("runsc", bundle, container_id)
                else:
                    offset = peers.log.stat().st_size if peers.log.exists() else 0
                    spawn = time.time()
                    result = peers.run("kata-py", bundle, container_id, env=envs[name])
                    end = time.time()
                    peers.wait_deleted("kata-py", container_id)
                    text = peers.log.read_bytes()[offset:].decode(errors="replace")
                    pooled += POOLED_MARK in text
                    phases = phases_of(read_timing(peers.log, offset)[0], spawn, end, POOL_PHASES)
                    if phases is not None:
                        breakdown[name].append(phases)
                if result.returncode != 0:
                    raise RuntimeError(f"{name} run failed: {result.stderr.decode(errors='replace')[-300:]}")
                wall[name].append(result.wall)
    finally:
        for pool_env in pools:
            _factory(pool_env, "stop")
    out = {"available": True, "pool_size": size, "memory_mib": memory_mib, "runs": runs * len(envs),
           "runs_that_used_a_pooled_vm": pooled, "wall_s": {n: summary(v) for n, v in wall.items()}}
    if breakdown["kata-py (pool)"]:
        out["kata_py_phases_s"] = phase_summary(breakdown["kata-py (pool)"], POOL_PHASES)
    if breakdown[NOFORK_POOL]:
        out["nofork_phases_s"] = phase_summary(breakdown[NOFORK_POOL], POOL_PHASES)
    out["pool_over_nofork"] = round(out["wall_s"]["kata-py (pool)"]["median"] / out["wall_s"][NOFORK_POOL]["median"], 3)
    if breakdown[NOPREFORK_POOL]:
        out["noprefork_phases_s"] = phase_summary(breakdown[NOPREFORK_POOL], POOL_PHASES)
    out["pool_over_noprefork"] = round(out["wall_s"]["kata-py (pool)"]["median"]
                                       / out["wall_s"][NOPREFORK_POOL]["median"], 3)
    if "runsc" in wall and wall["runsc"]:
        out["pool_over_runsc"] = round(out["wall_s"]["kata-py (pool)"]["median"] / out["wall_s"]["runsc"]["median"], 3)
    return out
