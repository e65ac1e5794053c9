"""A root filesystem made from the host's busybox-static, and the mounts
`runc spec` gives a container. No image registry is needed: the binary is
Debian's busybox-static, each applet a symlink to it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

# What `runc spec` gives a container: the usual kernel filesystems.
DEFAULT_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755",
                                                                             "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
     "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
]


def install_busybox(bin_dir: Path) -> Path:
    """busybox and a symlink to it for each of its applets, in `bin_dir`."""
    try:
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(f"cannot run {BUSYBOX} (Debian package busybox-static): {exc}") from None
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, bin_dir / "busybox")
    for applet in applets:
        link = bin_dir / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    return bin_dir


def make_busybox_rootfs(rootfs: Path) -> Path:
    """Fill `rootfs` with busybox, its applets in /bin, and the directories
    and account files a shell expects."""
    install_busybox(rootfs / "bin")
    for directory in ("proc", "sys", "dev", "tmp", "etc", "root", "var"):
        (rootfs / directory).mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    return rootfs
