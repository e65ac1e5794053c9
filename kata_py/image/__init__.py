"""The guest image: kernel + initramfs the sandbox VMs boot.

Built from Debian packages plus the agent, content-addressed under
``<state>/images/<hash>/`` and rebuilt only when an input changes. The kernel
is the project's own (built from linux-source with guest-image/kernel.config);
``KATA_PY_GUEST_KERNEL=debian`` selects the same userland on Debian's generic
kernel instead, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import ImageError
from . import builder

__all__ = ["GuestImage", "build_image", "ensure_image", "find_image", "ImageError", "VARIANTS"]

VARIANTS = builder.VARIANTS


@dataclass(frozen=True)
class GuestImage:
    directory: Path        # <state>/images/<hash>/
    kernel: Path           # uncompressed vmlinux, booted via PVH with -kernel
    initrd: Path           # the agent initramfs
    floor_initrd: Path     # initramfs whose /init powers the VM off at once
    kernel_release: str    # e.g. "6.1.0-56-amd64"
    manifest: dict         # what went in: versions, sizes, build seconds, hashes
    # The same userland as a read-only erofs disk, booted as the root instead
    # of the initramfs where the kernel has erofs and virtio-blk built in.
    rootfs: Path | None = None

    @classmethod
    def from_directory(cls, directory: Path, manifest: dict) -> "GuestImage":
        rootfs = directory / builder.ROOTFS
        return cls(directory, directory / "vmlinux", directory / "initrd",
                   directory / "floor-initrd", manifest["kernel_release"], manifest,
                   rootfs if rootfs.is_file() else None)


def _state(state_dir: Path | None) -> Path:
    return Path(state_dir) if state_dir is not None else paths.state_dir()


def build_image(state_dir: Path | None = None, force: bool = False,
                progress: bool = True, variant: str | None = None) -> GuestImage:
    """Build the image for the current inputs (reusing an identical one unless ``force``)."""
    directory, manifest = builder.build(_state(state_dir), force=force, progress=progress,
                                        variant=variant or builder.variant_from_env())
    return GuestImage.from_directory(directory, manifest)


def find_image(state_dir: Path | None = None, variant: str | None = None) -> GuestImage | None:
    """The current image, if a complete one exists; never builds."""
    state = _state(state_dir)
    name = builder.current_name(state, variant or builder.variant_from_env())
    if not name:
        return None
    directory = builder.images_dir(state) / name
    manifest = builder.read_manifest(directory)
    if not builder._complete(directory, manifest) or "kernel_release" not in manifest:
        return None
    return GuestImage.from_directory(directory, manifest)


def ensure_image(state_dir: Path | None = None, progress: bool = True,
                 variant: str | None = None) -> GuestImage:
    """The current image if its local inputs are unchanged, else a fresh build.

    Runs on every VM start, so the up-to-date path only hashes the local
    input files; apt is consulted only when a build is needed. (New Debian
    package versions are picked up by ``build_image``, e.g. ``kata-py image build``.)
    """
    # The state dir holds the guest image, the accel probe and the package cache:
    # 0700, created so or tightened (an older kata-py made it 0755).
    paths.ensure_private_dir(_state(state_dir))
    variant = variant or builder.variant_from_env()
    image = find_image(state_dir, variant)
    if image is not None and image.manifest.get("local_hash") == builder.local_hash(
            builder.Inputs.from_repo()):
        return image
    return build_image(state_dir, progress=progress, variant=variant)
