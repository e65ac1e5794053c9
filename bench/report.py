"""The results as Markdown tables, and the issue's targets checked against them."""

from __future__ import annotations


def _cell(s: dict | None, unit: str = "", digits: int = 3) -> str:
    if not s or not s.get("runs"):
        return "—"
    fmt = f"{{:.{digits}f}}"
    return f"{fmt.format(s['median'])}{unit} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def _phase_table(title: str, phases: dict, beside: dict | None = None, beside_name: str = "") -> list[str]:
    """Seconds per phase; with `beside`, a second column (a variant's phases)."""
    if beside is None:
        return ["", title, "", "| phase | s |", "|---|---|"] + [f"| {name} | {_cell(s)} |" for name, s in phases.items()]
    return ["", title, "", f"| phase | s | {beside_name} s |", "|---|---|---|"] + [
        f"| {name} | {_cell(s)} | {_cell(beside.get(name))} |" for name, s in phases.items()]


def targets(results: dict) -> list[dict]:
    """The issue's acceptance targets, as measured in this run."""
    out = []
    cold = results.get("coldstart") or {}
    if "kata_py_over_floor" in cold:
        out.append({"target": "cold start <= 1.25x the floor", "measured": f"{cold['kata_py_over_floor']}x",
                    "met": cold["kata_py_over_floor"] <= 1.25})
    if "kata_py_over_generic" in cold:
        out.append({"target": "cold start <= 0.35x the generic-kernel image (issue 16)",
                    "measured": f"{cold['kata_py_over_generic']}x", "met": cold["kata_py_over_generic"] <= 0.35})
    pool = results.get("pool") or {}
    if "pool_over_runsc" in pool:
        out.append({"target": "start from the pool <= runsc's", "measured": f"{pool['pool_over_runsc']}x runsc",
                    "met": pool["pool_over_runsc"] <= 1.0})
    memory = (results.get("memory") or {}).get("memory", {})
    if "10" in memory:
        pss = memory["10"]["pss_mib"]["total"]["median"]
        out.append({"target": "idle sandbox <= 100 MiB PSS at 10 sandboxes (issue 16)",
                    "measured": f"{pss:.1f} MiB", "met": pss <= 100})
        out.append({"target": "idle sandbox <= 60 MiB PSS at 10 sandboxes (128 MiB guest)",
                    "measured": f"{pss:.1f} MiB", "met": pss <= 60})
    fileio = results.get("fileio") or {}
    for step in ("untar", "stat"):
        ratio = (fileio.get(f"{step}_over_runc") or {}).get("kata-py")
        if ratio is not None:
            out.append({"target": f"file I/O: {step} <= 3x runc (virtio-fs)", "measured": f"{ratio}x runc",
                        "met": ratio <= 3})
    execio = results.get("execio") or {}
    exec_s = (execio.get("exec_true_s") or {}).get("kata-py")
    if exec_s and exec_s.get("runs"):
        out.append({"target": "exec <= 100 ms", "measured": f"{exec_s['median'] * 1000:.0f} ms",
                    "met": exec_s["median"] <= 0.1})
    for direction in ("stdout", "stdin"):
        rate = (execio.get(f"{direction}_MBps") or {}).get("kata-py")
        if rate and rate.get("runs"):
            out.append({"target": f"stdio ({direction}) >= 200 MB/s", "measured": f"{rate['median']:.0f} MB/s",
                        "met": rate["median"] >= 200})
    pods = results.get("pods") or {}
    second = ((pods.get("second_container_s") or {}).get("kata-py")) or {}
    if second.get("runs"):
        out.append({"target": "a running pod's second container starts <= 1 s (issue 15)",
                    "measured": f"{second['median']:.2f} s", "met": second["median"] <= 1.0})
    return out


POD_HANDLERS = ("kata-py", "runc", "kata-py-runc")
KIND_NAMES = {"shim": "shim", "qemu": "QEMU", "qemu_anon": "QEMU anon", "qemu_shmem": "QEMU guest RAM (shmem)",
              "qemu_file": "QEMU files", "vsock_backend": "vsock back end", "monitor": "monitors (kata-py CLI path)",
              "containers": "pause + containers"}


def _times(ratio: float | None) -> str:
    return "—" if ratio is None else f"**{ratio}×**"


def _pods(pods: dict) -> list[str]:
    handlers = [h for h in POD_HANDLERS if h in (pods.get("pod_start_s") or {})]
    lines = ["## Pods through the CRI (containerd 1.6, one pod at a time)", "",
             f"{pods.get('runs')} pods per handler, interleaved (order rotated each round); each pod: RunPodSandbox "
             f"+ CreateContainer + StartContainer of `sleep 1000`, {pods.get('settle_s')} s idle, PSS sampled "
             f"{pods.get('pss_samples')} times, a second `sleep 1000` created and started, then the pod stopped and "
             f"removed. Node set up (containerd, images imported) in {pods.get('node_setup_s')} s; the section took "
             f"{pods.get('seconds')} s.", "",
             "| handler | pod start s | RunPodSandbox s | CreateContainer s | StartContainer s | "
             "second container s | teardown s | QEMUs per pod |", "|---|---|---|---|---|---|---|---|"]
    for h in handlers:
        lines.append(f"| {h} | {_cell(pods['pod_start_s'].get(h))} | {_cell(pods['run_pod_sandbox_s'].get(h))} | "
                     f"{_cell(pods['create_s'].get(h))} | {_cell(pods['start_s'].get(h))} | "
                     f"{_cell(pods['second_container_s'].get(h))} | {_cell(pods['teardown_s'].get(h))} | "
                     f"{', '.join(map(str, (pods.get('qemus_per_pod') or {}).get(h, [])))} |")
    kinds = [k for k in ("total", "shim", "qemu", "qemu_anon", "qemu_shmem", "qemu_file", "vsock_backend", "monitor",
                         "containers")
             if any(k in (pods.get("pss_mib") or {}).get(h, {}) for h in handlers)]
    lines += ["", "Host PSS of an idle pod (one container), MiB:", "",
              "| handler | " + " | ".join(KIND_NAMES.get(k, k) for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for h in handlers:
        p = pods["pss_mib"].get(h, {})
        lines.append(f"| {h} | " + " | ".join(_cell(p.get(k), '', 1) for k in kinds) + " |")
    ratios = pods.get("over_runc") or {}
    if ratios:
        lines += ["", "Over runc (medians): " + "; ".join(
            f"{h}: pod start {_times(r.get('pod_start'))}, second container {_times(r.get('second_container'))}, "
            f"PSS {_times(r.get('pss'))}" for h, r in ratios.items()) + "."]
    for h, why in (pods.get("second_container_refused") or {}).items():
        lines += ["", f"`{h}` refused the second container: {'; '.join(why)}"]
    notes = pods.get("handlers") or {}
    if notes:
        lines += ["", "Handlers: " + "; ".join(f"`{h}` {n}" for h, n in notes.items()) + "."]
    if pods.get("leftovers"):
        lines += ["", "**Left behind:** " + "; ".join(pods["leftovers"])]
    lines.append("")
    return lines


MEMORY_KINDS = ("total", "qemu", "qemu_anon", "qemu_shmem", "qemu_file", "monitor", "vsock_backend")


def _memory_table(memory: dict, with_drop: bool) -> list[str]:
    """PSS per idle sandbox by kind, one row per sandbox count."""
    head = ["sandboxes"] + [KIND_NAMES.get(k, k) for k in MEMORY_KINDS]
    head += ["MemAvailable drop / sandbox"] if with_drop else []
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for count, m in memory.items():
        cells = [count] + [_cell(m["pss_mib"].get(k), "", 1) for k in MEMORY_KINDS]
        cells += [str(m.get("mem_available_drop_per_sandbox_mib"))] if with_drop else []
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown(results: dict) -> str:
    lines = [f"# kata-py benchmarks ({results.get('finished_at', '')})", ""]
    host = results.get("host", {})
    lines += [f"Host: {host.get('cpus')} CPUs, {host.get('mem_gib')} GiB, kernel {host.get('kernel')}, "
              f"{host.get('qemu')}; accel {results.get('accel')}; load average at start "
              f"{host.get('loadavg_at_start')}. Suite took {results.get('seconds')} s. Figures: median (min–max).", ""]
    peers = results.get("peers", {})
    cold = results.get("coldstart")
    if cold:
        lines += ["## Cold start: `run` of /bin/true", "",
                  f"{cold['runs']} runs each, interleaved (order rotated each round).", "",
                  "| runtime | wall s | CPU s (whole process tree) |", "|---|---|---|"]
        for name in ["floor", "kata-py", "kata-py-nofork", "kata-py-noprefork", "floor-generic", "kata-py-generic", "runc", "crun", "runsc"]:
            if name in cold["wall_s"]:
                lines.append(f"| {name} | {_cell(cold['wall_s'][name])} | {_cell(cold['cpu_s'][name])} |")
            elif peers.get(name):
                lines.append(f"| {name} | unavailable: {peers[name]} | |")
        if "kata_py_over_floor" in cold:
            lines += ["", f"kata-py / floor: **{cold['kata_py_over_floor']}×** wall, "
                          f"{cold['kata_py_over_floor_cpu']}× CPU."]
        if "kata_py_over_generic" in cold:
            lines += ["", "`-generic`: the image of before, Debian's generic kernel with modules and the "
                          "userland as an initramfs, in the same rounds. kata-py / kata-py-generic: "
                          f"**{cold['kata_py_over_generic']}×**; floor / floor-generic: "
                          f"{cold['floor_over_generic_floor']}×."]
        if "kata_py_over_nofork" in cold:
            lines += ["", "`kata-py-nofork`: the same with `KATA_PY_FORK=off` (the owner and the jail's launcher "
                          "started as new Python interpreters instead of forked), in the same rounds. kata-py / "
                          f"kata-py-nofork: **{cold['kata_py_over_nofork']}×**."]
        if "kata_py_over_noprefork" in cold:
            lines += ["", "`kata-py-noprefork`: the same with `KATA_PY_GUEST_PREFORK=off` (the guest agent forks "
                          "the first container's process at `create` instead of ahead), in the same rounds. "
                          f"kata-py / kata-py-noprefork: **{cold['kata_py_over_noprefork']}×**."]
        if "kata_py_phases_s" in cold:
            lines += _phase_table("kata-py `run` by phase (s; guest times placed on the host clock by the agent's "
                                  "uptime in its ping reply):", cold["kata_py_phases_s"],
                                  cold.get("nofork_phases_s"), "`KATA_PY_FORK=off`")
        lines.append("")
    execio = results.get("execio")
    if execio:
        lines += ["## exec and stdio (one running idle container per runtime)", "",
                  f"stdio: a {execio['stdio_bytes'] >> 20} MiB stream per run, measured over at most its first "
                  f"{execio.get('stdio_window_s')} s of streaming; MiB moved per run and direction: "
                  + ", ".join(f"{n} {s.get('median')}" for n, s in (execio.get('stdio_mib_moved_per_run') or {}).items())
                  + ".", "",
                  "| runtime | exec /bin/true s | stdout MB/s | stdin MB/s |", "|---|---|---|---|"]
        for name, s in execio["exec_true_s"].items():
            lines.append(f"| {name} | {_cell(s)} | {_cell(execio['stdout_MBps'].get(name), '', 1)} | "
                         f"{_cell(execio['stdin_MBps'].get(name), '', 1)} |")
        lines.append("")
    if results.get("fileio"):
        from .fileio import markdown as fileio_markdown

        lines += fileio_markdown(results["fileio"])
    mem = results.get("memory")
    if mem:
        memory = mem.get("memory", {})
        if memory:
            lines += ["## Memory per idle sandbox (PSS, MiB)", ""] + _memory_table(memory, with_drop=True)
            lines += ["", "MemAvailable drop / sandbox: the host's MemAvailable before the ramp minus now, over the "
                          "count; it includes the guests' kernel-side costs but also whatever else the host did "
                          "meanwhile, so it is only indicative at small counts.", ""]
        generic = mem.get("generic_kernel_memory") or {}
        if generic and "error" not in generic:
            lines += ["The image of before (generic kernel, initramfs), same counts:", ""]
            lines += _memory_table(generic, with_drop=False) + [""]
        elif generic:
            lines += [f"Generic-kernel image: {generic['error']}", ""]
        peer_mem = mem.get("peer_memory_at_1") or {}
        if peer_mem:
            lines += ["Peers, one idle container: " + ", ".join(
                f"{n} {v['pss_mib']} MiB ({v['processes']} processes)" if "pss_mib" in v else f"{n}: {v.get('error')}"
                for n, v in peer_mem.items()), ""]
        d = mem.get("density") or {}
        if d:
            lines += ["## Density", "",
                      f"Idle sandboxes started before a start took twice the baseline ({d.get('baseline_start_s')} s): "
                      f"**{d.get('density')}** (cap {d.get('cap')}; ended by {d.get('stopped_by')}; "
                      f"{d.get('seconds')} s).", "",
                      "| sandboxes running | start s |", "|---|---|"]
            lines += [f"| {p['sandboxes']} | {p['start_s']}{' (confirming)' if p.get('confirming') else ''} |"
                      for p in d.get("probes", [])]
            lines.append("")
    pool = results.get("pool")
    if pool is not None:
        lines += ["## Start from the VM pool (`kata-py factory`)", ""]
        if not pool.get("available"):
            lines += [f"Skipped: {pool.get('note')}", ""]
        else:
            lines += [f"Pool of {pool['pool_size']} × {pool['memory_mib']} MiB; {pool['runs_that_used_a_pooled_vm']} of "
                      f"{pool['runs']} runs used a pooled VM.", "", "| runtime | `run` /bin/true wall s |", "|---|---|"]
            lines += [f"| {n} | {_cell(s)} |" for n, s in pool["wall_s"].items()]
            if "pool_over_nofork" in pool:
                lines += ["", "`KATA_PY_FORK=off`: the owner started as a new Python interpreter instead of forked "
                              f"from the CLI, in the same rounds; forked / not: **{pool['pool_over_nofork']}×**."]
            if "pool_over_noprefork" in pool:
                lines += ["", "`KATA_PY_GUEST_PREFORK=off`: a second pool beside the first, whose VMs' agents fork "
                              "the first container's process at `create` instead of while they wait, in the same "
                              f"rounds; pre-forked / not: **{pool['pool_over_noprefork']}×**."]
            if "kata_py_phases_s" in pool:
                lines += _phase_table("kata-py `run` from the pool by phase (s):", pool["kata_py_phases_s"],
                                      pool.get("nofork_phases_s"), "`KATA_PY_FORK=off`")
                if pool.get("noprefork_phases_s"):
                    lines += _phase_table("The same beside the pool without the pre-forked process (s):",
                                          pool["kata_py_phases_s"], pool["noprefork_phases_s"],
                                          "`KATA_PY_GUEST_PREFORK=off`")
            lines.append("")
    if results.get("pods"):
        lines += _pods(results["pods"])
    for section, error in (results.get("errors") or {}).items():
        lines += [f"**{section} failed:** {error}", ""]
    checked = targets(results)
    if checked:
        lines += ["## Targets (issue 8 unless named)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in checked]
        lines.append("")
    return "\n".join(lines)
