"""Kernel modules: dependency resolution and load order for the guest.

The guest has no modprobe and no depmod run: the agent loads an explicit,
already ordered list with finit_module(2). So the order computed here must put
every module after the modules it depends on.

Debian's kernel package ships no ``modules.dep`` (depmod runs at install time),
so when the extracted tree has none the dependency map is built from each
module's own ``.modinfo`` ``depends=`` entry, which is what depmod reads too.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

from .elf import ELFFile

COMPRESSED_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst")


class ModuleError(ValueError):
    pass


def module_name(path: str) -> str:
    """``kernel/net/9p/9pnet_virtio.ko.xz`` -> ``9pnet_virtio`` (``-`` counts as ``_``)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in COMPRESSED_SUFFIXES + (".ko",):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: ``path: dep-path dep-path ...`` per line."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ModuleError(f"bad modules.dep line: {line!r}")
        deps[path.strip()] = rest.split()
    return deps


def format_modules_dep(deps: dict[str, list[str]]) -> str:
    return "".join(f"{p}: {' '.join(d)}\n" if d else f"{p}:\n" for p, d in sorted(deps.items()))


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def read_wanted(path: Path) -> list[str]:
    """Module names from a list file: one per line, ``#`` comments allowed."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.replace("-", "_"))
    return names


def order_modules(wanted: list[str], deps: dict[str, list[str]],
                  builtin: set[str] = frozenset()) -> list[str]:
    """Module paths to load, dependencies first, otherwise in ``wanted`` order.

    Built-in modules are skipped (they cannot and need not be loaded); a
    wanted module that is neither built in nor known is an error, because a
    guest missing e.g. its vsock transport would only fail much later.
    """
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(path: str) -> None:
        if path in done:
            return
        if path in active:
            cycle = " -> ".join(module_name(p) for p in active[active.index(path):] + [path])
            raise ModuleError(f"module dependency cycle: {cycle}")
        active.append(path)
        for dep in deps.get(path, []):
            if dep not in deps and module_name(dep) in builtin:
                continue
            visit(dep)
        active.pop()
        done.add(path)
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise ModuleError(f"kernel module {name!r} is neither built in nor in modules.dep")
    return order


def index_tree(modroot: Path) -> dict[str, str]:
    """name -> path relative to ``modroot`` for every module file under it."""
    index = {}
    for p in sorted(modroot.rglob("*.ko*")):
        rel = p.relative_to(modroot).as_posix()
        if rel.endswith((".ko",) + COMPRESSED_SUFFIXES):
            index[module_name(rel)] = rel
    return index


def read_module(path: Path) -> bytes:
    """Module contents, decompressed: the guest loads them with finit_module
    and flags 0, which takes a plain ELF object."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise ModuleError(f"{path} is zstd-compressed and the zstd tool is missing")
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    return path.read_bytes()


def deps_from_modinfo(modroot: Path, wanted: list[str], builtin: set[str]) -> dict[str, list[str]]:
    """A modules.dep-shaped map covering ``wanted`` and everything they pull in."""
    index = index_tree(modroot)
    deps: dict[str, list[str]] = {}
    todo = [n.replace("-", "_") for n in wanted]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in index:
            if name in builtin:
                continue
            raise ModuleError(f"kernel module {name!r} is neither built in nor shipped")
        rel = index[name]
        info = ELFFile(read_module(modroot / rel)).modinfo()
        direct = [d for v in info.get("depends", []) for d in v.split(",") if d]
        paths = []
        for d in direct:
            d = d.replace("-", "_")
            if d in index:
                paths.append(index[d])
                todo.append(d)
            elif d not in builtin:
                raise ModuleError(f"{name} depends on {d!r}, which is not shipped")
        deps[rel] = paths
    return deps
