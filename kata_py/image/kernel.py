"""Turn Debian's bzImage into an uncompressed vmlinux that QEMU boots via PVH.

``-kernel vmlinux`` on ``-M microvm`` skips the bzImage's real-mode setup and
its self-decompression (slow under TCG); QEMU jumps straight to the PVH entry
named by a Xen ELF note. The bzImage setup header (boot protocol >= 2.08) says
where the compressed payload is and how long; its first bytes say the format.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from ..errors import ImageError
from .elf import ELFFile, ELFFormatError
from .host_tools import require_tool

LZ4_LEGACY = b"\x02\x21\x4c\x18"
FORMATS = [
    (b"\xfd7zXZ\x00", "xz"),
    (LZ4_LEGACY, "lz4"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
]


def payload(bzimage: bytes) -> tuple[str, bytes]:
    """(format, compressed bytes) of the kernel inside a bzImage."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("kernel image is not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise ImageError(f"boot protocol {version:#x} is too old to locate the payload")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    blob = bzimage[start:start + length]
    for magic, fmt in FORMATS:
        if blob.startswith(magic):
            return fmt, blob
    raise ImageError(f"unknown kernel compression (payload starts {blob[:6].hex()})")


def _lz4_cli(blob: bytes) -> bytes:
    require_tool("lz4", "lz4")
    # The kernel's lz4 stream may be followed by padding the CLI warns about;
    # what counts is that the output is the ELF checked below.
    proc = subprocess.run(["lz4", "-dc"], input=blob, capture_output=True)
    if not proc.stdout:
        raise ImageError("lz4 could not decompress the kernel: " + proc.stderr.decode()[-500:])
    return proc.stdout


def decompress(fmt: str, blob: bytes) -> bytes:
    if fmt == "xz":
        # The kernel's xz stream carries the x86 BCJ filter, which liblzma
        # (behind Python's lzma) understands; trailing bytes are padding.
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)
    if fmt == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)
    if fmt == "gzip":
        return zlib.decompressobj(wbits=31).decompress(blob)
    if fmt == "lz4":
        return _lz4_cli(blob)
    if fmt == "zstd":
        if not shutil.which("zstd"):
            raise ImageError("the kernel is zstd-compressed and the zstd tool is missing")
        proc = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True)
        return proc.stdout
    raise ImageError(f"unsupported kernel compression {fmt}")


def extract_vmlinux(bzimage_path: Path, dest: Path) -> str:
    """Write the uncompressed vmlinux to ``dest``; returns the compression found."""
    fmt, blob = payload(bzimage_path.read_bytes())
    data = decompress(fmt, blob)
    try:
        elf = ELFFile(data)
    except ELFFormatError as e:
        raise ImageError(f"decompressed kernel ({fmt}) is not an ELF: {e}") from e
    if not elf.has_pvh_entry():
        raise ImageError("vmlinux has no PVH entry note (Xen note type 18); "
                         "QEMU could not boot it with -kernel")
    dest.write_bytes(data)
    return fmt
