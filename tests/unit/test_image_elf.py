"""The ELF reader the builder uses instead of binutils."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kata_py.image import elf


def _a_dynamic_binary() -> Path:
    for candidate in ("/bin/ls", "/usr/bin/env", sys.executable):
        p = Path(candidate).resolve()
        if p.exists() and elf.is_elf(p) and elf.needed(p):
            return p
    pytest.skip("no dynamically linked binary found")


def test_needed_of_a_real_binary():
    binary = _a_dynamic_binary()
    needed = elf.needed(binary)
    assert "libc.so.6" in needed
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
        expected = [l.split("[", 1)[1].rstrip("]") for l in out.splitlines() if "(NEEDED)" in l]
        assert needed == expected


def test_libc_needs_the_loader():
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if not libc.exists():
        pytest.skip("no multiarch libc on this host")
    assert elf.needed(libc) == ["ld-linux-x86-64.so.2"]


def test_not_elf_is_rejected():
    with pytest.raises(elf.ELFFormatError):
        elf.ELFFile(b"#!/bin/sh\n" + b"\0" * 64)


def test_a_static_binary_has_no_needed():
    busybox = Path("/bin/busybox")  # Debian's busybox-static, a guest-image input too
    if not busybox.exists():
        pytest.skip("no busybox here")
    assert elf.needed(busybox) == []
