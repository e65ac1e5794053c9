"""Build the sandbox guest kernel from Debian's ``linux-source-6.1``.

``make tinyconfig``, then the fragment in ``guest-image/kernel.config``, then
``make olddefconfig`` and ``make vmlinux``: an uncompressed ELF with a PVH
entry that QEMU boots directly. Every option the fragment names must come out
with the value it gives (Kconfig drops what it cannot satisfy without a word).

The result is cached under ``<state>/kernels/<hash>/`` where the hash covers
the fragment, the source package's version and this recipe, so a machine
builds it once (about six minutes on two cores) and every image reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ImageError
from .elf import ELFFile, ELFFormatError
from .host_tools import require_tool

SOURCE_PACKAGE = "linux-source-6.1"
# Bumped when the recipe below changes what it produces.
RECIPE = 1
# Build tools and the Debian packages that provide them (objtool needs libelf).
TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc"}
LIBELF_HEADER = Path("/usr/include/libelf.h")
# Compile steps of a build of this fragment (counted from `make` output), for
# the progress display only; a different count just ends the bar early or late.
EXPECTED_STEPS = 2000

_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_STEP = re.compile(r"^\s{2}(CC|AS|LD|AR|GEN|HOSTCC|HOSTLD|OBJCOPY|SYNC|UPD|CALL)\s")


def fragment_options(text: str) -> dict[str, str]:
    """The ``CONFIG_X=value`` lines of a fragment (comments and blanks skipped)."""
    options = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _OPTION.match(line)
        if not match:
            raise ImageError(f"kernel config fragment line {number}: not CONFIG_NAME=value: {line!r}")
        options[match.group(1)] = match.group(2)
    return options


def config_values(text: str) -> dict[str, str]:
    """A full .config as {name: value}; ``# CONFIG_X is not set`` reads as "n"."""
    values = {}
    for line in text.splitlines():
        match = _OPTION.match(line)
        if match:
            values[match.group(1)] = match.group(2)
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:-len(" is not set")]] = "n"
    return values


def unmet(wanted: dict[str, str], final: dict[str, str]) -> list[str]:
    """Options of the fragment whose value did not survive olddefconfig."""
    out = []
    for name, value in wanted.items():
        got = final.get(name, "n")
        if value == "n":
            ok = got == "n"
        else:
            ok = got == value
        if not ok:
            out.append(f"{name}={value} (got {got})")
    return out


def kernel_hash(fragment: bytes, source_version: str) -> str:
    h = hashlib.sha256(f"kata-py-kernel-recipe-{RECIPE}\0{SOURCE_PACKAGE}={source_version}\0".encode())
    h.update(fragment)
    return h.hexdigest()


def kernels_dir(state: Path) -> Path:
    return state / "kernels"


def check_tools() -> None:
    for tool, package in TOOLS.items():
        require_tool(tool, package)
    if not LIBELF_HEADER.exists():
        raise ImageError(f"building the guest kernel needs {LIBELF_HEADER}: apt-get install libelf-dev")


def cached(state: Path, digest: str) -> Path | None:
    directory = kernels_dir(state) / digest
    if (directory / "vmlinux").is_file() and (directory / "build.json").is_file():
        return directory
    return None


class _Progress:
    """Compile steps seen so far against the expected count: a rich bar on a
    terminal, a line every 10% otherwise (logs of CI and of VM starts)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.steps = 0
        self.start = time.monotonic()
        self._bar = None
        self._next_line = 10
        if enabled and sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
                self._bar = Progress(TextColumn("building the guest kernel"), BarColumn(),
                                     TextColumn("{task.completed}/~{task.total} files"),
                                     TimeElapsedColumn(), transient=True)
                self._bar.start()
                self._task = self._bar.add_task("kernel", total=EXPECTED_STEPS)
            except ImportError:
                self._bar = None

    def line(self, text: str) -> None:
        if not _STEP.match(text):
            return
        self.steps += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.steps, EXPECTED_STEPS))
            return
        percent = 100 * self.steps // EXPECTED_STEPS
        if percent >= self._next_line and percent < 100:
            print(f"kata-py image: guest kernel {percent}% ({self.steps} files, "
                  f"{time.monotonic() - self.start:.0f} s)", file=sys.stderr, flush=True)
            self._next_line = percent // 10 * 10 + 10

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _make(src: Path, *targets: str, progress: _Progress | None = None, jobs: int = 1) -> str:
    argv = ["make", "-C", str(src), f"-j{jobs}", *targets]
    env = dict(os.environ, LC_ALL="C", KBUILD_BUILD_USER="kata-py", KBUILD_BUILD_HOST="kata-py",
               KBUILD_BUILD_TIMESTAMP="1970-01-01")
    tail: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        if progress is not None:
            progress.line(line)
    if proc.wait() != 0:
        raise ImageError(f"kernel build `make {' '.join(targets)}` failed:\n" + "\n".join(tail))
    return "\n".join(tail)


def build(state: Path, fragment_path: Path, tarball: Path, source_version: str,
          progress: bool = True) -> Path:
    """The cached kernel directory for this fragment and source (built if missing).

    The caller holds the image lock, so builds never race.
    """
    fragment = fragment_path.read_bytes()
    wanted = fragment_options(fragment.decode())
    digest = kernel_hash(fragment, source_version)
    found = cached(state, digest)
    if found is not None:
        return found
    check_tools()
    root = kernels_dir(state)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    bar = _Progress(progress)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(["tar", "-xf", str(tarball), "-C", str(work)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"unpacking {tarball}: {proc.stderr.strip()[-500:]}")
        tops = [p for p in work.iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "Makefile").exists():
            raise ImageError(f"{tarball} did not unpack one kernel source tree")
        src = tops[0]
        _make(src, "tinyconfig")
        with open(src / ".config", "a") as f:
            f.write("\n" + fragment.decode())
        _make(src, "olddefconfig")
        missing = unmet(wanted, config_values((src / ".config").read_text()))
        if missing:
            raise ImageError(f"{fragment_path}: Kconfig did not keep {len(missing)} option(s): "
                             + ", ".join(missing))
        _make(src, "vmlinux", progress=bar, jobs=os.cpu_count() or 1)
        release = subprocess.run(["make", "-s", "-C", str(src), "kernelrelease"], capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
        vmlinux = src / "vmlinux"
        try:
            if not ELFFile.open(vmlinux).has_pvh_entry():
                raise ImageError("the built vmlinux has no PVH entry note; is CONFIG_PVH set?")
        except ELFFormatError as e:
            raise ImageError(f"the built vmlinux is not an ELF: {e}") from e
        out = work / "out"
        out.mkdir()
        # Symbols and debug sections are never read by QEMU or the guest; the
        # file QEMU maps (and copies into guest RAM) is what is left.
        proc = subprocess.run(["objcopy", "--strip-debug", str(vmlinux), str(out / "vmlinux")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.copyfile(vmlinux, out / "vmlinux")
        shutil.copyfile(src / ".config", out / "config")
        info = {"release": release, "source": f"{SOURCE_PACKAGE} {source_version}",
                "hash": digest, "compile_steps": bar.steps,
                "build_seconds": round(time.monotonic() - t0, 1),
                "vmlinux_bytes": (out / "vmlinux").stat().st_size}
        (out / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        final = root / digest
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    for old in root.iterdir():
        # One kernel per machine is enough: the images that used an older
        # fragment are pruned with it.
        if old.is_dir() and not old.name.startswith(".") and old.name != digest:
            shutil.rmtree(old, ignore_errors=True)
    return final


def info(directory: Path) -> dict:
    return json.loads((directory / "build.json").read_text())
