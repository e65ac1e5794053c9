#!/usr/bin/env python3
"""`podman run --rm IMG /bin/true` and `ctr run --rm IMG /bin/true` with kata-py
next to runc, in the same run, median of N (with min and max), as JSON.

Uses private podman storage and a private containerd, and a busybox image
built locally. Usage: bench/engines.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import summary  # noqa: E402
from tests.engines import IMAGE, Containerd, Podman, image_tar, kata_binary  # noqa: E402


def timed(fn) -> float:
    started = time.monotonic()
    result = fn()
    if result.returncode != 0:
        raise SystemExit(f"failed: {result.args}: {result.stderr.decode(errors='replace')[-500:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kata-py-bench-"))
    runtimes = {"kata-py": kata_binary(), "runc": shutil.which("runc")}
    results: dict = {"benchmark": "engines", "command": "/bin/true"}
    podman = Podman(work / "podman")
    ctr = None
    try:
        podman.import_image(image_tar(work))
        archive = work / "image.tar"
        podman("save", "--format", "oci-archive", "-o", archive, IMAGE)
        ctr = Containerd(work / "containerd")
        ctr.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], archive)
        samples = {f"podman_run_rm_{name}": [] for name in runtimes} | {f"ctr_run_rm_{name}": [] for name in runtimes}
        for i in range(args.runs):  # interleaved, so a slow spell hits every runtime alike
            for name, binary in runtimes.items():
                samples[f"podman_run_rm_{name}"].append(timed(lambda: podman(
                    "run", "--rm", "--runtime", binary, "--network", "none", IMAGE, "/bin/true")))
                samples[f"ctr_run_rm_{name}"].append(timed(lambda: ctr.ctr(
                    "run", "--rm", "--runc-binary", binary, IMAGE, f"bench-{name}-{i}", "/bin/true")))
        results.update({key: summary(value, 3) for key, value in samples.items()})
    finally:
        podman.cleanup()
        if ctr is not None:
            ctr.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
