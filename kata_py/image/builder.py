"""Assemble the guest image: vmlinux, the agent initramfs and the floor initramfs.

Layout under the state directory::

    images/<hash>/            one finished image (never modified after the rename)
        vmlinux  initrd  floor-initrd  manifest.json
    images/current -> <hash>  the image VM starts use (the project's kernel)
    images/current-debian     the same userland on Debian's generic kernel and
                              its modules, kept to measure against
    images/.lock              serialises builds between processes
    kernels/<hash>/           the guest kernel built from linux-source (kernel_build)
    cache/debs/               downloaded .debs, named as in the Debian pool

``<hash>`` covers every input: the local files (agent, protocol, this
package, guest-image/) and the resolved Debian package versions. The local
part alone is stored too, so ``ensure_image`` can decide "up to date" by
hashing a few dozen small files, without asking apt.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import ImageError
from . import cpio, debs, kernel, kernel_build, kmod
from .elf import ELFFile, ELFFormatError
from .host_tools import require_tool
from .progress import Reporter

# Bumped when the builder changes what it produces in a way the hashed files
# would not show (they include this package's own sources, so rarely needed).
FORMAT = 2

# The guest kernel: "sandbox" is built from linux-source with
# guest-image/kernel.config, everything built in (the default); "debian" is
# Debian's generic kernel with its virtio drivers as modules, as the image was
# before, kept so benchmarks can compare the two in one run.
VARIANTS = ("sandbox", "debian")
DEFAULT_VARIANT = "sandbox"
VARIANT_ENV = "KATA_PY_GUEST_KERNEL"


def variant_from_env() -> str:
    value = os.environ.get(VARIANT_ENV, DEFAULT_VARIANT) or DEFAULT_VARIANT
    if value not in VARIANTS:
        raise ImageError(f"{VARIANT_ENV}={value!r}: use one of {', '.join(VARIANTS)}")
    return value

PY = "python3.11"
CORE_PACKAGES = ["busybox-static", f"{PY}-minimal", f"lib{PY}-minimal", f"lib{PY}-stdlib"]
LIBDIR = "lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
AGENT_HOME = "opt/kata-agent"
STDLIB = f"usr/lib/{PY}"
# Measured under TCG on -M microvm (6 interleaved boots each, same image):
# lz4-legacy and uncompressed reach the agent equally fast (3.9 s median either
# way on a busy 2-core host; the kernel spends on inflating what it saves on
# copying). lz4 is kept because QEMU copies the initrd into guest RAM: 8 MB
# instead of 17 MB of each guest's memory and of the host's RSS.
INITRD_COMPRESSION = "lz4"
ROOTFS = "rootfs.erofs"
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


@dataclass(frozen=True)
class Inputs:
    """The local inputs of an image. Tests point these at stand-ins."""

    agent_dir: Path        # holds ``init`` and the ``kata_agent`` package
    protocol_dir: Path     # kata_py/protocol
    guest_dir: Path        # guest-image/
    image_code_dir: Path   # this package
    entry_module: str = "kata_agent.main"

    @classmethod
    def from_repo(cls, root: Path = paths.REPO_ROOT) -> "Inputs":
        return cls(root / "agent", root / "kata_py" / "protocol", root / "guest-image",
                   Path(__file__).resolve().parent)

    def groups(self) -> list[tuple[str, Path]]:
        return [("agent", self.agent_dir), ("protocol", self.protocol_dir),
                ("guest-image", self.guest_dir), ("image", self.image_code_dir)]


def _input_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(SKIP_SUFFIXES):
                out.append(Path(dirpath) / name)
    return out


def local_hash(inputs: Inputs) -> str:
    """SHA-256 over the local input files: names, executable bit, contents."""
    h = hashlib.sha256(f"kata-py-image-format-{FORMAT}\0".encode())
    for label, root in inputs.groups():
        h.update(f"group {label}\0".encode())
        if not root.is_dir():
            continue
        for f in _input_files(root):
            data = f.read_bytes()
            exe = os.access(f, os.X_OK)
            h.update(f"{f.relative_to(root).as_posix()}\0{int(exe)}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def image_hash(local: str, versions: dict[str, str], variant: str = DEFAULT_VARIANT) -> str:
    h = hashlib.sha256(f"{local}\0{variant}".encode())
    for name in sorted(versions):
        h.update(f"\0{name}={versions[name]}".encode())
    return h.hexdigest()


def read_list(path: Path) -> list[str]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


# ---------------------------------------------------------------- state dirs

def images_dir(state: Path) -> Path:
    return state / "images"


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(directory: Path, manifest: dict | None) -> bool:
    return bool(manifest) and all(
        (directory / n).is_file() for n in ("vmlinux", "initrd", "floor-initrd"))


def current_link(variant: str = DEFAULT_VARIANT) -> str:
    return "current" if variant == DEFAULT_VARIANT else f"current-{variant}"


def set_current(state: Path, name: str, variant: str = DEFAULT_VARIANT) -> None:
    """Point images/current(-variant) at ``name`` atomically (symlink + rename)."""
    idir = images_dir(state)
    tmp = idir / f".current-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, idir / current_link(variant))


def current_name(state: Path, variant: str = DEFAULT_VARIANT) -> str | None:
    try:
        return os.readlink(images_dir(state) / current_link(variant))
    except OSError:
        return None


class _Lock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# ------------------------------------------------------------------- build

def build(state: Path, *, force: bool = False, progress: bool = True,
          inputs: Inputs | None = None, variant: str = DEFAULT_VARIANT) -> tuple[Path, dict]:
    """Build (or reuse) the image for the current inputs; returns (directory, manifest)."""
    if variant not in VARIANTS:
        raise ImageError(f"unknown guest kernel variant {variant!r}; use one of {', '.join(VARIANTS)}")
    inputs = inputs or Inputs.from_repo()
    _check_inputs(inputs)
    idir = images_dir(state)
    paths.ensure_private_dir(idir)
    rep = Reporter(progress)
    with _Lock(idir / ".lock"):
        for stale in idir.glob(".build-*"):
            # Left by a build that was killed; we hold the lock, so it is dead.
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        local = local_hash(inputs)
        with rep.step("resolve", "resolving Debian packages"):
            pkgs = _resolve(inputs, variant)
        versions = {p.name: p.version for p in pkgs.values()}
        digest = image_hash(local, versions, variant)
        final = idir / digest
        if not force and _complete(final, read_manifest(final)):
            set_current(state, digest, variant)
            rep.note(f"image {digest[:12]} is up to date")
            return final, read_manifest(final)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=idir))
        try:
            manifest = _assemble(state, inputs, pkgs, work, rep, local, digest, variant)
            manifest["build_seconds"] = dict(rep.timings, total=round(time.monotonic() - t0, 3))
            out = work / "out"
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if final.exists():
                # --force over an existing image: move it aside first, since a
                # rename cannot replace a non-empty directory.
                os.replace(final, work / "old")
            os.replace(out, final)
            set_current(state, digest, variant)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(state, keep={digest, manifest.get("previous")})
        rep.note(f"image {digest[:12]} ready in {manifest['build_seconds']['total']:.1f}s: "
                 f"initrd {manifest['sizes']['initrd'] / 1e6:.1f} MB")
        return final, manifest


def _check_inputs(inputs: Inputs) -> None:
    need = [inputs.agent_dir / "init", inputs.agent_dir / "kata_agent",
            inputs.protocol_dir, inputs.guest_dir / "modules.txt", inputs.guest_dir / "kernel.config"]
    for p in need:
        if not p.exists():
            raise ImageError(f"guest image input missing: {p}")
    entry = inputs.agent_dir / (inputs.entry_module.replace(".", "/") + ".py")
    if not entry.exists():
        raise ImageError(f"agent entry module {inputs.entry_module} not found at {entry}")


def _prune(state: Path, keep: set) -> None:
    """Drop images other than the current ones (each variant's) and the one
    just replaced: a VM that is starting right now may still be about to hand
    QEMU the old files."""
    keep = keep | {current_name(state, v) for v in VARIANTS}
    for d in images_dir(state).iterdir():
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _resolve(inputs: Inputs, variant: str = DEFAULT_VARIANT) -> dict[str, debs.Package]:
    """The packages of an image; "kernel" names the one the kernel comes from
    (the source package, or Debian's versioned kernel image)."""
    lib_pkgs = read_list(inputs.guest_dir / "lib-packages.txt")
    names = CORE_PACKAGES + [n for n in lib_pkgs if n not in CORE_PACKAGES]
    if variant == "sandbox":
        found = debs.resolve(names + [kernel_build.SOURCE_PACKAGE])
        found["kernel"] = found[kernel_build.SOURCE_PACKAGE]
        return found
    found = debs.resolve([debs.KERNEL_META] + names)
    kpkg = debs.kernel_package(found[debs.KERNEL_META])
    found.update(debs.resolve([kpkg]))
    found["kernel"] = found[kpkg]
    return found


def _assemble(state: Path, inputs: Inputs, pkgs: dict[str, debs.Package], work: Path,
              rep: Reporter, local: str, digest: str, variant: str = DEFAULT_VARIANT) -> dict:
    kpkg = pkgs["kernel"]
    wanted = [p for n, p in pkgs.items() if n not in ("kernel", debs.KERNEL_META)]
    with rep.step("download", f"downloading {len(wanted)} packages"):
        debfiles = debs.download(wanted, state / "cache" / "debs")
    out = work / "out"
    out.mkdir()
    kx, ux, root = work / "kernel", work / "user", work / "root"

    # The kernel package is by far the largest to unpack; do it alongside the
    # userland work, which is mostly waiting on the guest Python.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    kfuture = pool.submit(debs.extract, debfiles[kpkg.name], kx)
    try:
        with rep.step("unpack", "unpacking userland packages"):
            for name, deb in sorted(debfiles.items()):
                if name not in (kpkg.name, debs.KERNEL_META):
                    debs.extract(deb, ux)
        with rep.step("python", "selecting and compiling the stdlib the agent needs"):
            pyinfo = _stage_python(inputs, ux, root)
        with rep.step("libs", "collecting shared libraries"):
            libs = _stage_libs(inputs, ux, root, pyinfo["dynload"])
        with rep.step("busybox", "installing busybox"):
            applets = _stage_busybox(ux, root)
        with rep.step("kernel-unpack", "unpacking the kernel package"):
            kfuture.result()
    finally:
        pool.shutdown(wait=True)
    kinfo: dict = {}
    if variant == "sandbox":
        tarballs = sorted((kx / "usr" / "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise ImageError(f"{kpkg.name}: expected one /usr/src/linux-source-*.tar.*, found {len(tarballs)}")
        # Not a rep.step: the build draws its own progress bar (one live display at a time).
        t0 = time.monotonic()
        kdir = kernel_build.build(state, inputs.guest_dir / "kernel.config", tarballs[0],
                                  kpkg.version, progress=rep.enabled)
        rep.timings["kernel-build"] = round(time.monotonic() - t0, 3)
        kinfo = kernel_build.info(kdir)
        release, kfmt, modules = kinfo["release"], "none", []
        # A hard link: the image directory owns its files even after the
        # kernel cache moves on to another fragment.
        try:
            os.link(kdir / "vmlinux", out / "vmlinux")
        except OSError:
            shutil.copyfile(kdir / "vmlinux", out / "vmlinux")
    else:
        with rep.step("vmlinux", "extracting vmlinux"):
            vmlinuz = sorted((kx / "boot").glob("vmlinuz-*"))
            if len(vmlinuz) != 1:
                raise ImageError(f"{kpkg.name}: expected one /boot/vmlinuz-*, found {len(vmlinuz)}")
            release = vmlinuz[0].name[len("vmlinuz-"):]
            kfmt = kernel.extract_vmlinux(vmlinuz[0], out / "vmlinux")
        with rep.step("modules", "resolving kernel modules"):
            modules = _stage_modules(inputs, kx / "lib" / "modules" / release, release, root)
    _stage_base(root, {"kernel_release": release, "image_hash": digest,
                       "python": pyinfo["version"].split()[0]})
    with rep.step("initrd", "writing the initramfs"):
        raw = _write_initrd(root, out / "initrd", INITRD_COMPRESSION)
        _write_floor(inputs, ux, out / "floor-initrd")
    if variant == "sandbox":
        with rep.step("rootfs", "writing the read-only root filesystem"):
            write_erofs(root, out / ROOTFS)
    return {
        "format": FORMAT,
        "image_hash": digest,
        "local_hash": local,
        "previous": current_name(state, variant),
        "kernel_variant": variant,
        "kernel_release": release,
        "kernel_package": kpkg.name,
        "kernel_compression": kfmt,
        "kernel_build": kinfo,
        "initrd_compression": INITRD_COMPRESSION,
        "python_version": pyinfo["version"],
        "packages": {n: p.as_manifest() for n, p in sorted(pkgs.items()) if n != "kernel"},
        "modules": modules,
        "libraries": libs,
        "stdlib_files": pyinfo["files"],
        "busybox_applets": applets,
        "sizes": {
            "vmlinux": (out / "vmlinux").stat().st_size,
            "initrd": (out / "initrd").stat().st_size,
            "initrd_uncompressed": raw,
            "floor_initrd": (out / "floor-initrd").stat().st_size,
            **({"rootfs": (out / ROOTFS).stat().st_size} if (out / ROOTFS).exists() else {}),
        },
        "built_at": int(time.time()),
    }


# --------------------------------------------------------------- the parts

def _copy(src: Path, dest: Path, mode: int | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, mode if mode is not None else 0o644)


def _shebang_optimize(init: Path) -> int:
    """Optimisation level the guest Python runs with, from /init's shebang, so
    the .pyc files compiled here are the ones it looks for."""
    first = init.read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace")
    if not first.startswith("#!"):
        return 0
    level = 0
    for tok in shlex.split(first[2:])[1:]:
        if tok.startswith("-") and not tok.startswith("--") and tok[1:].isalpha():
            level = max(level, tok.count("O"))
    return min(level, 2)


def _agent_imports(inputs: Inputs) -> list[str]:
    """Every absolute module name imported anywhere in the agent's sources,
    including inside functions: those lazy imports must be in the image too.

    kata_py/protocol is left out on purpose: it is shared with the host, and
    its function-level imports serve the host (asyncio for the host's reader,
    which would drag ssl and libcrypto into the guest). Its module-level
    imports are still caught by importing the agent.
    """
    import ast
    names: set[str] = set()
    files = [inputs.agent_dir / "init"] + sorted((inputs.agent_dir / "kata_agent").rglob("*.py"))
    for f in files:
        try:
            tree = ast.parse(f.read_bytes(), filename=str(f))
        except SyntaxError as e:
            raise ImageError(f"syntax error in guest agent source {f}: {e}") from e
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in ("kata_agent", "kata_py"))


def _run_guest_python(ux: Path, mode: str, request: dict, *flags: str) -> str:
    python = ux / "usr" / "bin" / PY
    env = {"PYTHONHOME": str(ux / "usr"), "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    probe = Path(__file__).resolve().parent / "_pyprobe.py"
    proc = subprocess.run([str(python), "-s", *flags, str(probe), mode],
                          input=json.dumps(request), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ImageError(f"guest Python {mode} step failed:\n{proc.stderr.strip()[-3000:]}")
    return proc.stdout


def _stage_python(inputs: Inputs, ux: Path, root: Path) -> dict:
    stdlib = ux / STDLIB
    if not (ux / "usr" / "bin" / PY).exists() or not (stdlib / "os.py").exists():
        raise ImageError(f"{PY} packages did not unpack an interpreter and stdlib")
    _copy(ux / "usr" / "bin" / PY, root / "usr" / "bin" / PY, 0o755)

    # The agent, laid out as in the guest, so the recorder imports exactly that.
    home = root / AGENT_HOME
    agent_files = []
    for f in sorted((inputs.agent_dir / "kata_agent").rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        rel = Path("kata_agent") / f.relative_to(inputs.agent_dir / "kata_agent")
        _copy(f, home / rel)
        agent_files.append(home / rel)
    for f in sorted(inputs.protocol_dir.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        rel = Path("kata_py/protocol") / f.relative_to(inputs.protocol_dir)
        _copy(f, home / rel)
        agent_files.append(home / rel)
    # Empty on purpose: the host package's __init__ must not run in the guest.
    (home / "kata_py").mkdir(parents=True, exist_ok=True)
    (home / "kata_py" / "__init__.py").write_bytes(b"")
    agent_files.append(home / "kata_py" / "__init__.py")
    if not (home / "kata_py" / "protocol" / "__init__.py").exists():
        (home / "kata_py" / "protocol" / "__init__.py").write_bytes(b"")
        agent_files.append(home / "kata_py" / "protocol" / "__init__.py")
    _copy(inputs.agent_dir / "init", root / "init", 0o755)

    optional = _agent_imports(inputs) + read_list(inputs.guest_dir / "stdlib-extra.txt")
    rec = json.loads(_run_guest_python(ux, "record", {
        "stdlib_dir": str(stdlib), "sys_path": [str(home)],
        "required": [inputs.entry_module], "optional": optional}))
    files = set(rec["files"]) | {"os.py"}  # os.py: the landmark Python finds its prefix by
    py_files, dynload = [], []
    for rel in sorted(files):
        src = stdlib / rel
        if src.is_symlink() and not src.resolve().is_relative_to(ux):
            continue  # Debian points sitecustomize at /etc; the guest has none
        _copy(src, root / STDLIB / rel, 0o755 if rel.endswith(".so") else 0o644)
        if rel.endswith(".py"):
            py_files.append((root / STDLIB / rel, f"/{STDLIB}/{rel}"))
        elif rel.endswith(".so"):
            dynload.append(root / STDLIB / rel)
    # Python warns at every start if its platlib directory is missing.
    (root / STDLIB / "lib-dynload").mkdir(parents=True, exist_ok=True)

    py_files += [(f, "/" + f.relative_to(root).as_posix()) for f in agent_files]
    py_files.append((root / "init", "/init"))
    level = _shebang_optimize(inputs.agent_dir / "init")
    # /init is run as a script, so its own .pyc is never used; skip it.
    _run_guest_python(ux, "compile", {
        "files": [(str(s), g) for s, g in py_files if g != "/init"],
        "optimize": sorted({0, level})}, "-S")
    return {"version": rec["version"], "files": len(files), "dynload": dynload,
            "missing_optional": rec["failed"]}


def _find_lib(ux: Path, soname: str) -> Path | None:
    for d in (LIBDIR, f"usr/{LIBDIR}", "lib", "usr/lib"):
        p = ux / d / soname
        if p.is_symlink():
            target = os.readlink(p)
            # Absolute links point into the guest tree, not the host's.
            p = (ux / target.lstrip("/")) if target.startswith("/") else p.parent / target
            p = Path(os.path.realpath(p))
            if not p.is_relative_to(ux):
                continue
        if p.is_file():
            return p
    return None


def _stage_libs(inputs: Inputs, ux: Path, root: Path, dynload: list[Path]) -> list[str]:
    """Copy the shared libraries reachable through DT_NEEDED, by soname."""
    todo = list(read_list(inputs.guest_dir / "extra-libs.txt"))
    for binary in [root / "usr" / "bin" / PY] + dynload:
        todo += ELFFile.open(binary).needed()
    done: list[str] = []
    while todo:
        soname = todo.pop(0)
        if soname in done:
            continue
        src = _find_lib(ux, soname)
        if src is None:
            raise ImageError(f"guest needs {soname}, which none of the packages in "
                             f"{inputs.guest_dir / 'lib-packages.txt'} provides")
        _copy(src, root / LIBDIR / soname, 0o755)
        done.append(soname)
        try:
            todo += ELFFile.open(src).needed()
        except ELFFormatError as e:
            raise ImageError(f"{src}: {e}") from e
    if LOADER not in done:
        _copy(_find_lib(ux, LOADER) or ux / LIBDIR / LOADER, root / LIBDIR / LOADER, 0o755)
        done.append(LOADER)
    # The path every dynamic executable names as its interpreter (PT_INTERP).
    (root / "lib64").mkdir(exist_ok=True)
    os.symlink(f"/{LIBDIR}/{LOADER}", root / "lib64" / LOADER)
    return sorted(done)


def _busybox_applets(busybox: Path) -> list[str]:
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ImageError(f"{busybox} --list-full failed: {proc.stderr.strip()}")
    return [l.strip().lstrip("/") for l in proc.stdout.splitlines() if l.strip()]


def _stage_busybox(ux: Path, root: Path) -> int:
    bb = ux / "bin" / "busybox"
    if not bb.exists():
        raise ImageError("busybox-static did not unpack /bin/busybox")
    _copy(bb, root / "bin" / "busybox", 0o755)
    count = 0
    for rel in _busybox_applets(bb):
        dest = root / rel
        # Never shadow what is already there (Python, /init), and /linuxrc is
        # an initrd-era entry point this image does not use.
        if rel in ("linuxrc", "init") or dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", dest)
        count += 1
    return count


def _stage_modules(inputs: Inputs, modroot: Path, release: str, root: Path) -> list[str]:
    if not modroot.is_dir():
        raise ImageError(f"kernel package has no /lib/modules/{release}")
    builtin_file = modroot / "modules.builtin"
    builtin = kmod.parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    wanted = kmod.read_wanted(inputs.guest_dir / "modules.txt")
    try:
        if (modroot / "modules.dep").exists():
            deps = kmod.parse_modules_dep((modroot / "modules.dep").read_text())
        else:
            deps = kmod.deps_from_modinfo(modroot, wanted, builtin)
        order = kmod.order_modules(wanted, deps, builtin)
    except kmod.ModuleError as e:
        raise ImageError(f"kernel {release}: {e}") from e
    guest_root = root / "lib" / "modules" / release

    def plain(rel: str) -> str:
        for suffix in kmod.COMPRESSED_SUFFIXES:
            if rel.endswith(suffix):
                return rel[: -len(suffix)] + ".ko"
        return rel

    for rel in order:
        dest = guest_root / plain(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(kmod.read_module(modroot / rel))
    # A modules.dep for what is shipped, so busybox modprobe works for debugging.
    shipped = {plain(r): [plain(d) for d in deps.get(r, []) if d in order] for r in order}
    (guest_root / "modules.dep").write_text(kmod.format_modules_dep(shipped))
    if builtin_file.exists():
        shutil.copyfile(builtin_file, guest_root / "modules.builtin")
    guest_paths = [f"/lib/modules/{release}/{plain(r)}" for r in order]
    etc = root / "etc" / "kata-agent"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "modules").write_text("".join(p + "\n" for p in guest_paths))
    return guest_paths


def _stage_base(root: Path, info: dict) -> None:
    for d, mode in [("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                    ("tmp", 0o1777), ("etc", 0o755), ("root", 0o700), ("var", 0o755),
                    ("var/tmp", 0o1777), ("mnt", 0o755),
                    # where the agent binds the root over itself (pid1.ROOT_BIND): on a
                    # read-only root it must exist already
                    (".root", 0o700)]:
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "kata-agent").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "kata-agent" / "image.json").write_text(
        json.dumps(info, indent=2, sort_keys=True) + "\n")


# The kernel opens /dev/console for init's stdio before anything mounts
# devtmpfs; without the node init starts with no stdin/stdout/stderr.
CONSOLE = cpio.Entry.chardev("dev/console", 5, 1)


def write_cpio(entries: list[cpio.Entry], dest: Path, compression: str) -> int:
    """Write an initramfs; returns its uncompressed size."""
    tmp = dest.with_name(dest.name + ".cpio")
    with open(tmp, "wb") as f:
        size = cpio.write(entries, f)
    if compression == "none":
        os.replace(tmp, dest)
    elif compression == "lz4":
        # The kernel's initramfs unpacker takes only the lz4 *legacy* format.
        require_tool("lz4", "lz4")
        proc = subprocess.run(["lz4", "-l", "-9", "-q", "-f", str(tmp), str(dest)],
                              capture_output=True, text=True)
        tmp.unlink()
        if proc.returncode != 0:
            raise ImageError(f"lz4 failed: {proc.stderr.strip()}")
    else:
        raise ImageError(f"unknown initramfs compression {compression!r}")
    return size


def write_erofs(root: Path, dest: Path) -> None:
    """The guest's userland as an uncompressed erofs image.

    Every VM boots from the same file on a read-only virtio-blk disk, so the
    host holds one copy in its page cache, and each guest reads into its own
    memory only the blocks it uses, instead of unpacking the whole initramfs
    into RAM. Uncompressed: under TCG, decompressing in the guest costs more
    than the host's page cache saves. The kernel opens /dev/console on the
    root before /init runs, so the node is in the image.
    """
    require_tool("mkfs.erofs", "erofs-utils")
    console = root / CONSOLE.path
    console.parent.mkdir(parents=True, exist_ok=True)
    if not console.exists():
        os.mknod(console, CONSOLE.mode, os.makedev(5, 1))
    proc = subprocess.run(["mkfs.erofs", "-T0", "--all-root", "--quiet", str(dest), str(root)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"mkfs.erofs failed: {(proc.stderr or proc.stdout).strip()[-1000:]}")


def _write_initrd(root: Path, dest: Path, compression: str) -> int:
    entries = [e for e in cpio.entries_from_tree(root) if e.path != CONSOLE.path]
    return write_cpio(entries + [cpio.Entry(CONSOLE.path, CONSOLE.mode, b"", CONSOLE.rdev)],
                      dest, compression)


def _write_floor(inputs: Inputs, ux: Path, dest: Path) -> None:
    entries = [
        cpio.Entry.directory("bin"), cpio.Entry.directory("dev"),
        cpio.Entry.file("bin/busybox", (ux / "bin" / "busybox").read_bytes(), 0o755),
        cpio.Entry.file("init", (inputs.guest_dir / "floor-init").read_bytes(), 0o755),
        cpio.Entry(CONSOLE.path, CONSOLE.mode, b"", CONSOLE.rdev),
    ]
    write_cpio(entries, dest, "none")


def read_initrd(path: Path) -> list[cpio.Entry]:
    data = path.read_bytes()
    if data.startswith(kernel.LZ4_LEGACY):
        proc = subprocess.run(["lz4", "-dc"], input=data, capture_output=True)
        data = proc.stdout
    return cpio.read(data)


def initrd_with_init(initrd: Path, init: bytes, dest: Path) -> Path:
    """A copy of ``initrd`` whose /init is ``init``: lets tests and benchmarks
    boot the real image's userland with a different first program."""
    entries = [e for e in read_initrd(initrd) if e.path != "init"]
    entries.append(cpio.Entry.file("init", init, 0o755))
    write_cpio(entries, dest, "none")
    return dest

