"""kata-py's benchmark suite: `python -m bench` (or `bash bench/run.sh`, `make bench`).

Sections, each the median of several runs with min and max, every peer in
the same invocation, interleaved:

  coldstart  `run` of /bin/true: kata-py, runc, crun, runsc and the floor, with
             kata-py's phases
  execio     exec /bin/true latency; stdio throughput both ways
  fileio     untar, 256 MiB write and read, stat of 10,000 files, through the
             container's rootfs: kata-py on virtio-fs and on 9p, runc, runsc
  pool       start from the VM pool (`kata-py factory`), next to runsc
  memory     PSS per idle sandbox at 1, 10 and 30; density (sandboxes started
             before a start takes twice as long)
  pods       through the CRI of a private containerd 1.6 (tests/cri_node.py):
             pod start, a running pod's second container and per-pod PSS,
             handlers kata-py (shim v2), runc and kata-py-runc

Prints the results as JSON and as Markdown tables, and writes them to
bench/results/latest.json and latest.md. Needs root. About 10-15 minutes
on a 2-core host under TCG; the density ramp gets what is left of --budget.
The pods section, last, comes on top: about 4 minutes (2.5 with --runs 3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import coldstart, execio, fileio, memory, pods, pool, report
from .common import REPO, Peers, host_facts, make_bundle, make_rootfs, require

SECTIONS = ("coldstart", "execio", "fileio", "pool", "memory", "pods")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--exec-runs", type=int, default=10, help="exec /bin/true runs per runtime (default 10)")
    parser.add_argument("--stdio-mib", type=int, default=256, help="MiB per stdio run (default 256)")
    parser.add_argument("--stdio-window", type=float, default=5.0,
                        help="seconds of streaming measured per stdio run, at most (default 5)")
    parser.add_argument("--memory-at", default="1,10,30", help="sandbox counts to sample memory at")
    parser.add_argument("--density-cap", type=int, default=40)
    parser.add_argument("--density-step", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=4, help="sandboxes started at once in the ramp")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--pod-handlers", default=",".join(pods.HANDLERS),
                        help=f"CRI handlers the pods section runs (default {','.join(pods.HANDLERS)})")
    parser.add_argument("--budget", type=float, default=780.0,
                        help="seconds for the sections before pods; the density ramp beyond the memory counts "
                             "stops when it is spent (default 780)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    require(os.geteuid() == 0, "run as root (runc, crun, runsc and kata-py's VMs need it)")
    sections = [s for s in args.only.split(",") if s]
    require(set(sections) <= set(SECTIONS), f"--only: sections are {', '.join(SECTIONS)}")
    began = time.monotonic()
    sys.path.insert(0, str(REPO))
    from kata_py import paths
    from kata_py.image import ensure_image
    from kata_py.vmm.probe import choose_accel

    image = ensure_image(progress=False)
    # The image of before (Debian's generic kernel, modules, initramfs),
    # built now so that no timed run pays for it.
    generic_image = ensure_image(progress=False, variant="debian")
    accel = choose_accel(image.kernel, image.floor_initrd, paths.state_dir()).accel
    results: dict = {"benchmark": "kata-py suite", "host": host_facts(), "accel": accel,
                     "image": {"kernel_release": image.kernel_release, "initrd_bytes": image.initrd.stat().st_size,
                               "vmlinux_bytes": image.kernel.stat().st_size,
                               "rootfs_bytes": image.rootfs.stat().st_size if image.rootfs else None,
                               "generic": {"kernel_release": generic_image.kernel_release,
                                           "initrd_bytes": generic_image.initrd.stat().st_size,
                                           "vmlinux_bytes": generic_image.kernel.stat().st_size}},
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="kata-py-bench-"))
    try:
        rootfs = make_rootfs(work / "rootfs")
        true_bundle = make_bundle(work / "true", ["/bin/true"], rootfs)
        idle_bundle = make_bundle(work / "idle", ["/bin/sleep", "1000000"], rootfs)
        peers = Peers(work)
        if set(sections) - {"pods"}:        # the pods section drives containerd, not the peers' CLIs
            print("bench: checking which runtimes run here", file=sys.stderr)
            peers.probe(true_bundle)
            results["peers"] = peers.available
        for section in sections:
            print(f"bench: {section} ({time.monotonic() - began:.0f} s in)", file=sys.stderr)
            try:
                if section == "coldstart":
                    results[section] = coldstart.measure(peers, image, accel, true_bundle, args.runs, generic_image)
                elif section == "execio":
                    results[section] = execio.measure(peers, idle_bundle, args.runs, args.stdio_mib, args.exec_runs,
                                                      args.stdio_window)
                elif section == "fileio":
                    results[section] = fileio.measure(peers, args.runs, work)
                elif section == "pool":
                    results[section] = pool.measure(peers, true_bundle, args.runs, args.pool_size)
                elif section == "memory":
                    left = args.budget - (time.monotonic() - began) - 60   # 60 s: deleting the ramp
                    results[section] = memory.measure(peers, idle_bundle, [int(n) for n in args.memory_at.split(",")],
                                                      args.density_cap, args.density_step, args.parallel,
                                                      max(left, 60.0))
                elif section == "pods":
                    results[section] = pods.measure(args.runs, [h for h in args.pod_handlers.split(",") if h])
                    problems = results[section]["failures"] + [f"left behind: {item}"
                                                               for item in results[section]["leftovers"]]
                    if problems:
                        results["errors"][section] = f"{len(problems)} problems: " + "; ".join(problems[:5])
            except Exception as exc:  # report it and go on with the other sections
                traceback.print_exc()
                results["errors"][section] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - began, 1)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "latest.md").write_text(text + "\n")
    print(json.dumps(results, indent=2))
    print(text)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
