"""Cold start: `run` of /bin/true for kata-py, runc, crun and runsc, and the
floor (the same QEMU, kernel and kernel command line as a sandbox, with an
initramfs whose init powers off at once), interleaved round by round.

kata-py's run is split into phases from the timing records its `--log` file
gets (kata_py/timing.py); guest times come from the agent's console lines,
placed on the host's clock with the guest uptime in the agent's ping reply.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .common import GENERIC, NOFORK, NOPREFORK, VARIANT_ENV, Peers, summary

# (phase, from-event, to-event), in order; "spawn" and "exit" are the bench's own clock.
PHASES = [
    ("cli (python, imports)", "spawn", "cli_run"),
    ("owner + vsock backend up", "cli_run", "qemu_spawned"),
    ("qemu init (to QMP)", "qemu_spawned", "qmp_ready"),
    ("firmware + kernel + python start", "qmp_ready", "agent_main"),
    ("agent init to listening", "agent_main", "agent_listening"),
    ("host connects (agent ready)", "agent_listening", "agent_ready"),
    ("container set up in the guest (mounts, namespaces)", "agent_ready", "container_created"),
    ("process created + stdio connected", "container_created", "streams_connected"),
    ("init forked, held at the barrier", "streams_connected", "process_prepared"),
    ("create reported to the cli", "process_prepared", "cli_created"),
    ("start + process exited", "cli_created", "process_exited"),
    # `run` returns the exit status once the container has exited; the VM's
    # teardown and the delete finish behind it (a child of the CLI waits for the
    # owner and deletes), so they are not on the path the caller waits for.
    ("exit status reported to the cli", "process_exited", "cli_container_exited"),
    ("cli exit", "cli_container_exited", "exit"),
]
# The guest's clock (CLOCK_MONOTONIC) starts late in the kernel's boot and
# stands still until its timer runs, so its zero is not placed on the host's
# clock: only intervals measured late in the boot are (the agent's started and
# listening lines, against the uptime in the ping reply).


def read_timing(log: Path, offset: int) -> tuple[list[dict], int]:
    """The timing records appended to the kata-py log since `offset`."""
    records = []
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    for line in data.decode(errors="replace").splitlines():
        _, found, payload = line.partition("timing ")
        if not found:
            continue
        payload = payload.rstrip('"').replace('\\"', '"')   # the CLI's text format quotes the message
        try:
            records.append(json.loads(payload))
        except ValueError:
            continue
    return records, offset + len(data)


# A start from the pool: no QEMU is launched; the owner claims a booted VM.
POOL_PHASES = [
    ("cli (python, imports)", "spawn", "cli_run"),
    ("owner process up (forked; a new interpreter with KATA_PY_FORK=off)", "cli_run", "owner_started"),
    ("pooled VM claimed", "owner_started", "vm_claimed"),
    ("agent connected", "vm_claimed", "agent_ready"),
] + PHASES[next(i for i, (_, start, _) in enumerate(PHASES) if start == "agent_ready"):]


def phase_summary(breakdown: list[dict], phases) -> dict:
    """Median/min/max per phase over the runs' breakdowns, in phase order."""
    return {name: summary([b[name] for b in breakdown], 3) for name, _, _ in phases}


def phases_of(records: list[dict], spawn: float, end: float, phases=None) -> dict | None:
    """Seconds per phase of one run, or None if a record is missing."""
    phases = PHASES if phases is None else phases
    at: dict[str, float] = {"spawn": spawn, "exit": end}
    guest = {}
    uptime_at_ready = 0.0
    for record in records:
        event = record.get("event")
        if event and event not in at:
            at[event] = record["t"]
        if event == "agent_ready" and "uptime" in record:
            uptime_at_ready = float(record["uptime"])
        if event == "qemu_exited":
            guest = record.get("guest") or {}
    if "agent_ready" in at and "started" in guest and "listening" in guest:
        at["agent_main"] = at["agent_ready"] - (uptime_at_ready - guest["started"])
        at["agent_listening"] = at["agent_ready"] - (uptime_at_ready - guest["listening"])
    try:
        return {name: at[b] - at[a] for name, a, b in phases}
    except KeyError:
        return None


def measure(peers: Peers, image, accel: str, bundle: Path, runs: int, generic_image=None) -> dict:
    """``generic_image``: the guest image on Debian's generic kernel; when given,
    its floor and kata-py on it run in the same rounds, for the before/after."""
    from kata_py.vmm.probe import boot_floor

    floors = {"floor": image}
    names = ["floor"] + peers.usable()
    if generic_image is not None and peers.available.get(GENERIC) == "":
        floors["floor-generic"] = generic_image
        names += ["floor-generic", GENERIC]
    if peers.available.get("kata-py") == "":
        names += [NOFORK, NOPREFORK]
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    breakdown: list[dict] = []
    nofork_breakdown: list[dict] = []
    for round_no in range(runs):
        # Rotate the order each round, so no runtime always follows the same one.
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in order:
            if name in floors:
                before = os.times()
                floor_image = floors[name]
                ok, seconds, detail = boot_floor(floor_image.kernel, floor_image.floor_initrd, accel, 120)
                after = os.times()
                if not ok:
                    raise RuntimeError(f"floor boot failed: {detail}")
                wall[name].append(seconds)
                cpu[name].append((after.children_user - before.children_user)
                                 + (after.children_system - before.children_system))
                continue
            container_id = f"cold-{name}-{os.getpid()}-{round_no}"
            runtime = "kata-py" if name in VARIANT_ENV else name
            offset = peers.log.stat().st_size if peers.log.exists() else 0
            spawn = time.time()
            if name in VARIANT_ENV:
                result = peers.run("kata-py", bundle, container_id, env=dict(os.environ, **VARIANT_ENV[name]))
            else:
                result = peers.run(name, bundle, container_id)
            end = time.time()
            if runtime in ("kata-py", GENERIC):
                peers.wait_deleted(runtime, container_id)
            if result.returncode != 0:
                peers.delete(runtime, container_id)
                raise RuntimeError(f"{name} run failed ({result.returncode}): "
                                   f"{result.stderr.decode(errors='replace')[-500:]}")
            wall[name].append(result.wall)
            cpu[name].append(result.cpu)
            if name in ("kata-py", NOFORK):
                phases = phases_of(read_timing(peers.log, offset)[0], spawn, end)
                if phases is not None:
                    (breakdown if name == "kata-py" else nofork_breakdown).append(phases)
    out = {"runs": runs, "order": "rotated each round", "wall_s": {n: summary(v) for n, v in wall.items()},
           "cpu_s": {n: summary(v) for n, v in cpu.items()}}
    if "kata-py" in wall:
        out["kata_py_over_floor"] = round(out["wall_s"]["kata-py"]["median"] / out["wall_s"]["floor"]["median"], 3)
        out["kata_py_over_floor_cpu"] = round(out["cpu_s"]["kata-py"]["median"] / out["cpu_s"]["floor"]["median"], 3)
    if GENERIC in wall:
        out["kata_py_over_generic"] = round(out["wall_s"]["kata-py"]["median"] / out["wall_s"][GENERIC]["median"], 3)
        out["floor_over_generic_floor"] = round(out["wall_s"]["floor"]["median"]
                                                / out["wall_s"]["floor-generic"]["median"], 3)
    if NOFORK in wall:
        out["kata_py_over_nofork"] = round(out["wall_s"]["kata-py"]["median"] / out["wall_s"][NOFORK]["median"], 3)
    if NOPREFORK in wall:
        out["kata_py_over_noprefork"] = round(out["wall_s"]["kata-py"]["median"]
                                              / out["wall_s"][NOPREFORK]["median"], 3)
    if breakdown:
        out["kata_py_phases_s"] = phase_summary(breakdown, PHASES)
    if nofork_breakdown:
        out["nofork_phases_s"] = phase_summary(nofork_breakdown, PHASES)
    return out
