"""File I/O through the container's rootfs: kata-py over virtio-fs and over
9p, next to runc and runsc, interleaved round by round.

Each run is a fresh container (`run` in the foreground) whose script does, in
its own rootfs, one step after another:

untar   `tar -xf` of a ~50 MB tree of small and middling files (Python's
        standard library, as found on the host)
write   `dd` of 256 MiB, bs=1M, conv=fsync
read    `dd` of 256 MiB, bs=1M, from a file written on the host before the
        container started (never in the guest's page cache; the host's may
        hold it, for every runtime alike)
stat    `find -size` over 10,000 empty files in 100 directories (one stat
        each; the output, a count, is checked)

The script prints a line at each step's start and end; each step's time is
the time between those lines as the bench reads them, so that neither the
runtime's start nor its clock inside the guest counts. Each runtime has a
rootfs of its own: the read-only inputs hard-linked from one template, the
untarred tree and the written file removed after each run.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .common import KATA, Peers, make_bundle, make_rootfs, summary
from .report import _cell

MIB = 1 << 20
DATA_MIB = 256
TREE_BYTES = 50 * 1000 * 1000
MAX_TREE_FILE = 1 << 20
STAT_FILES = 10_000
STAT_DIRS = 100
STEPS = ("untar", "write", "read", "stat")
# kata-py with 9p instead of virtio-fs: the same binary, the share chosen by environment.
NINEP = "kata-py-9p"
NINEP_ENV = {"KATA_PY_SHARED_FS": "9p"}
RUN_TIMEOUT = 600.0

SCRIPT = f"""
set -e
echo begin untar
tar -xf /in/tree.tar -C /scratch/tree
echo end untar
echo begin write
dd if=/dev/zero of=/scratch/out.bin bs=1M count={DATA_MIB} conv=fsync 2>/dev/null
echo end write
echo begin read
dd if=/in/data.bin of=/dev/null bs=1M 2>/dev/null
echo end read
echo begin stat
find /in/stat -type f -size -1k | wc -l
echo end stat
"""


def _make_template(template: Path) -> None:
    """The inputs every runtime's rootfs links to."""
    make_rootfs(template)
    inputs = template / "in"
    inputs.mkdir()
    # A tree of real files: Python's standard library (its sources and
    # byte code; nothing over MAX_TREE_FILE, such as a static libpython), up
    # to TREE_BYTES.
    source = Path(os.__file__).parent
    total = 0
    with tarfile.open(inputs / "tree.tar", "w") as tar:
        for path in _tree_files(source):
            member = tar.gettarinfo(path, arcname=str(path.relative_to(source.parent)))
            with open(path, "rb") as f:
                tar.addfile(member, f)
            total += member.size
            if total >= TREE_BYTES:
                break
    block = os.urandom(MIB)
    with open(inputs / "data.bin", "wb") as f:
        for _ in range(DATA_MIB):
            f.write(block)
    for d in range(STAT_DIRS):
        directory = inputs / "stat" / f"d{d:03}"
        directory.mkdir(parents=True)
        for i in range(STAT_FILES // STAT_DIRS):
            (directory / f"f{i:04}").touch()


def _tree_files(source: Path):
    for directory, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            if not path.is_symlink() and path.is_file() and path.stat().st_size <= MAX_TREE_FILE:
                yield path


def _rootfs_for(template: Path, rootfs: Path) -> Path:
    """The template's files hard-linked (read only by the script), scratch its own."""
    subprocess.run(["cp", "-al", str(template), str(rootfs)], check=True)
    (rootfs / "scratch").mkdir()
    return rootfs


def _reset_scratch(rootfs: Path) -> None:
    scratch = rootfs / "scratch"
    shutil.rmtree(scratch / "tree", ignore_errors=True)
    (scratch / "out.bin").unlink(missing_ok=True)
    (scratch / "tree").mkdir()


def _bundle(directory: Path, rootfs: Path) -> Path:
    bundle = make_bundle(directory, ["sh", "-c", SCRIPT], rootfs)
    config = json.loads((bundle / "config.json").read_text())
    config["root"]["readonly"] = False
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return bundle


def _argv_env(peers: Peers, name: str) -> tuple[list[str], dict | None]:
    if name == NINEP:
        return ([str(KATA), "--root", str(peers.work / f"root-{NINEP}"), "--log", str(peers.work / f"{NINEP}.log")],
                dict(os.environ, **NINEP_ENV))
    return peers.binary(name), peers.env(name)


def _run_once(peers: Peers, name: str, bundle: Path, container_id: str) -> dict[str, float]:
    """One container run; the seconds of each step, from its marker lines."""
    argv, env = _argv_env(peers, name)
    proc = subprocess.Popen(argv + ["run", "--bundle", str(bundle), container_id], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=peers.preexec("kata-py" if name == NINEP else name))
    began: dict[str, float] = {}
    took: dict[str, float] = {}
    output: list[str] = []
    buffer = b""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            data = os.read(fd, 65536)
            now = time.monotonic()
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                output.append(line)
                word, _, step = line.partition(" ")
                if word == "begin" and step in STEPS:
                    began[step] = now
                elif word == "end" and step in began:
                    took[step] = now - began[step]
        else:
            proc.kill()
        status = proc.wait(timeout=60)
        err = proc.stderr.read().decode(errors="replace").strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if status != 0 or set(took) != set(STEPS):
        raise RuntimeError(f"{name} file-I/O run exited {status}; output {output[-6:]}; {err[-400:]}")
    count = output[output.index("begin stat") + 1]
    if count != str(STAT_FILES):
        raise RuntimeError(f"{name}: the stat step found {count} files, not {STAT_FILES}")
    return took


def measure(peers: Peers, runs: int, work: Path) -> dict:
    names = ["kata-py", NINEP] + [n for n in ("runc", "runsc") if n in peers.usable()]
    skipped = {n: peers.available.get(n, "not probed") for n in ("runc", "runsc") if n not in names}
    template = work / "fileio-template"
    print("bench: fileio: making the inputs", file=sys.stderr)
    _make_template(template)
    tree_bytes = sum(m.size for m in tarfile.open(template / "in" / "tree.tar"))
    tree_files = sum(1 for m in tarfile.open(template / "in" / "tree.tar") if m.isfile())
    bundles = {}
    for name in names:
        rootfs = _rootfs_for(template, work / f"fileio-rootfs-{name}")
        bundles[name] = (_bundle(work / f"fileio-{name}", rootfs), rootfs)
    samples = {step: {name: [] for name in names} for step in STEPS}
    for round_no in range(runs):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in order:
            bundle, rootfs = bundles[name]
            _reset_scratch(rootfs)
            container_id = f"fileio-{name}-{os.getpid()}-{round_no}"
            try:
                took = _run_once(peers, name, bundle, container_id)
            finally:
                if name == NINEP:
                    argv, env = _argv_env(peers, name)
                    subprocess.run(argv + ["delete", "--force", container_id], env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
                else:
                    peers.delete(name, container_id)
            for step in STEPS:
                samples[step][name].append(took[step])
    for name in names:
        shutil.rmtree(bundles[name][1], ignore_errors=True)
    shutil.rmtree(template, ignore_errors=True)
    size = DATA_MIB * MIB
    result = {
        "runs": runs,
        "tree_bytes": tree_bytes,
        "tree_files": tree_files,
        "data_bytes": size,
        "stat_files": STAT_FILES,
        "untar_s": {n: summary(v) for n, v in samples["untar"].items()},
        "write_s": {n: summary(v) for n, v in samples["write"].items()},
        "read_s": {n: summary(v) for n, v in samples["read"].items()},
        "stat_s": {n: summary(v) for n, v in samples["stat"].items()},
        "write_MBps": {n: summary([size / t / 1e6 for t in v], 1) for n, v in samples["write"].items()},
        "read_MBps": {n: summary([size / t / 1e6 for t in v], 1) for n, v in samples["read"].items()},
        "skipped": skipped,
    }
    if "runc" in names:
        for step in ("untar", "stat"):
            runc = result[f"{step}_s"]["runc"]["median"]
            result[f"{step}_over_runc"] = {n: round(result[f"{step}_s"][n]["median"] / runc, 2)
                                           for n in ("kata-py", NINEP)}
    return result


def markdown(section: dict) -> list[str]:
    """The section's table, for bench/report.py."""
    lines = ["## File I/O through the container's rootfs", "",
             f"{section['runs']} runs each, interleaved, a fresh container per run: untar of "
             f"{section['tree_bytes'] / 1e6:.0f} MB in {section['tree_files']} files, {section['data_bytes'] >> 20} "
             f"MiB written (conv=fsync) and read (written on the host before the run), stat of "
             f"{section['stat_files']} files. kata-py: virtio-fs; {NINEP}: the same over 9p.", "",
             "| runtime | untar s | write s (MB/s) | read s (MB/s) | stat s |", "|---|---|---|---|---|"]
    for name, untar in section["untar_s"].items():
        lines.append(f"| {name} | {_cell(untar)} | {_cell(section['write_s'][name])} "
                     f"({section['write_MBps'][name].get('median')}) | {_cell(section['read_s'][name])} "
                     f"({section['read_MBps'][name].get('median')}) | {_cell(section['stat_s'][name])} |")
    for name, why in section.get("skipped", {}).items():
        lines.append(f"| {name} | unavailable: {why} | | | |")
    for step in ("untar", "stat"):
        ratios = section.get(f"{step}_over_runc")
        if ratios:
            lines += ["", f"{step} / runc: " + ", ".join(f"{n} **{r}×**" for n, r in ratios.items())]
    lines.append("")
    return lines

