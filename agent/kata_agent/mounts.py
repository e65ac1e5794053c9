"""A container's filesystem view, built inside the guest from the OCI spec.

Everything here runs in the container init's forked child, in its new mount
namespace, before pivot_root: `root` is the container's rootfs as the agent
sees it. Destinations are resolved inside `root` the way the container will
see them (a symlink in the rootfs is followed as if `root` were `/`), so a
hostile image cannot point a mount outside its own root. Each mount is then
made on an fd the kernel resolved once more inside `root` (`pinned`), so a
component renamed into a symlink after that check (a volume another
container changes while this one starts) cannot lead it out either.

The functions take the syscall object so that unit tests can record the
calls with a fake instead of mounting.
"""

from __future__ import annotations

import contextlib
import os
import stat

from kata_py.protocol.oci_names import (FLAG_OPTIONS, MS_NOATIME, MS_NODIRATIME, MS_NOSYMFOLLOW, MS_STRICTATIME,
                                        PROPAGATION_OPTIONS)

from .syscalls import (MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT,
                       RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS)

ELOOP = 40
MAX_SYMLINKS = 40

# Options runtimes or engines add that are not for the kernel.
IGNORED_OPTIONS = {"tmpcopyup", "notmpcopyup", "copy-symlink", "z", "Z", "U", "defaults", "newinstance-only"}
# Flags a bind remount can change per mount point.
BIND_REMOUNT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME \
    | MS_STRICTATIME | MS_NOSYMFOLLOW
ST_FLAGS_KEPT = MS_NOSUID | MS_NODEV | MS_NOEXEC  # statvfs f_flag bits equal the MS_ ones for these


# A virtio-9p device names its mount tag in sysfs; virtio-fs (in the kernels
# the guest runs) does not: a tag no 9p device carries is virtio-fs's.
NINEP_DEVICES = "/sys/bus/virtio/drivers/9pnet_virtio"
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap,access=client"


def ninep_tags() -> set[str]:
    tags = set()
    try:
        names = os.listdir(NINEP_DEVICES)
    except OSError:
        return tags     # no 9p driver: every share is virtio-fs
    for name in names:
        try:
            with open(os.path.join(NINEP_DEVICES, name, "mount_tag"), "rb") as f:
                tags.add(f.read(256).strip(b"\0\n ").decode("ascii", "replace"))
        except OSError:
            continue    # not a device entry (bind, uevent, ...)
    return tags


def mount_share(sys_, tag: str, target: str) -> str:
    """Mount the host's export `tag` on `target` with the filesystem that
    carries it; return that filesystem's name."""
    if tag in ninep_tags():
        sys_.mount(tag, target, "9p", 0, NINEP_OPTIONS)
        return "9p"
    sys_.mount(tag, target, "virtiofs", 0, "")
    _no_readahead(target)
    return "virtiofs"


def _no_readahead(target: str) -> None:
    """No readahead on a virtio-fs mount: every read is one the reader waits
    for. Under 6.1, a readahead request that completes after its inode is
    gone (a container whose process exits at once, its share unmounted)
    makes the completion work touch freed memory (a general protection
    fault in fuse_readpages_end -> fuse_invalidate_atime, seen in the guest)."""
    st = os.stat(target)
    try:
        with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb", "w") as f:
            f.write("0")
    except OSError:
        pass    # no sysfs entry: the kernel's default stays


class MountError(OSError):
    """A spec mount that cannot be made; the message names the destination."""


def parse_options(options) -> tuple[int, list[int], str]:
    """(mount flags, propagation flags in order, data string) for an OCI options list."""
    flags = 0
    propagation = []
    data = []
    for option in options or ():
        if option in FLAG_OPTIONS:
            clear, set_ = FLAG_OPTIONS[option]
            flags = (flags & ~clear) | set_
        elif option in PROPAGATION_OPTIONS:
            propagation.append(PROPAGATION_OPTIONS[option])
        elif option in IGNORED_OPTIONS or option.startswith("x-"):
            continue
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


def secure_join(root: str, path: str) -> str:
    """`root` + `path`, following symlinks as if `root` were `/`.

    A component that does not exist yet ends the symlink walk: the rest is
    taken literally (it will be created inside `root`).
    """
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join(resolved + [part])
        try:
            mode = os.lstat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise MountError(ELOOP, f"{path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending[0:0] = [p for p in target.split("/") if p not in ("", ".")]
    return root + ("/" + "/".join(resolved) if resolved else "")


@contextlib.contextmanager
def pinned(sys_, root: str, target: str):
    """`target` (under `root`, as secure_join found it) opened O_PATH with
    the kernel resolving it again with `root` as `/` (openat2
    RESOLVE_IN_ROOT); yields the /proc/self/fd path that names exactly what
    was opened. mount(2) on that path mounts there, not wherever the path's
    components lead by then: the check-then-mount race on a destination
    (runc's CVE-2021-30465) stays inside `root`."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = sys_.openat2(root_fd, os.path.relpath(target, root), os.O_PATH | os.O_CLOEXEC, 0,
                          RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root_fd)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def make_mount_point(target: str, file_source: bool) -> None:
    """Create a directory (or an empty file, for a file bind) to mount on."""
    if os.path.lexists(target):
        return
    if file_source:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    else:
        os.makedirs(target, exist_ok=True)


def mount_one(sys_, root: str, mount: dict, source: str) -> str:
    """Make one spec mount under `root`; return its resolved target.

    `source` is where the data comes from in the guest (a path for a bind,
    the mount's own source otherwise).
    """
    destination = mount["destination"]
    flags, propagation, data = parse_options(mount.get("options"))
    fstype = mount.get("type") or ""
    if fstype == "bind":
        flags |= MS_BIND
    if fstype == "cgroup":  # the guest runs cgroup v2 only, as runc does on a v2 host
        fstype, data = "cgroup2", ""
    target = secure_join(root, destination)
    bind = bool(flags & MS_BIND)
    wanted = flags & BIND_REMOUNT_FLAGS if bind else 0
    try:
        make_mount_point(target, bind and not os.path.isdir(source))
        with pinned(sys_, root, target) as at:
            if bind:
                sys_.mount(source, at, "", flags & (MS_BIND | MS_REC))
            else:
                sys_.mount(source or fstype, at, fstype, flags & ~(MS_BIND | MS_REC), data)
        if wanted or propagation:
            with pinned(sys_, root, target) as at:      # the new mount, now on top
                if wanted:
                    # A bind takes no flags of its own: remount it with them, keeping
                    # the lock-in flags the source already had.
                    kept = os.statvfs(at).f_flag & ST_FLAGS_KEPT
                    sys_.mount("", at, "", MS_REMOUNT | MS_BIND | wanted | kept)
                for prop in propagation:
                    sys_.mount("", at, "", prop)
    except OSError as exc:
        raise MountError(exc.errno or 0, f"mount {destination} ({fstype or 'bind'}): "
                                         f"{os.strerror(exc.errno) if exc.errno else exc}") from None
    return target


# The devices every container gets (runc's list): path, major, minor.
DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
                   ("tty", 5, 0))
DEFAULT_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                 ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
DEVICE_TYPES = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def make_devices(root: str, devices) -> None:
    """The default devices and `linux.devices` in the container's /dev."""
    dev = secure_join(root, "/dev")
    for name, major, minor in DEFAULT_DEVICES:
        path = f"{dev}/{name}"
        if not os.path.lexists(path):
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)  # mknod obeys the umask
    for name, target in DEFAULT_LINKS:
        path = f"{dev}/{name}"
        if not os.path.lexists(path):
            os.symlink(target, path)
    for device in devices or ():
        path = secure_join(root, device["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = device.get("file_mode", 0o666) & 0o7777
        if os.path.lexists(path):
            os.unlink(path)
        os.mknod(path, mode | DEVICE_TYPES[device["type"]],
                 os.makedev(device.get("major", 0), device.get("minor", 0)))
        os.chmod(path, mode)
        os.chown(path, device.get("uid", 0), device.get("gid", 0))


def mask_path(sys_, root: str, path: str) -> None:
    """Make a path unreadable: /dev/null over a file, an empty read-only tmpfs over a directory."""
    target = secure_join(root, path)
    try:
        is_dir = os.path.isdir(target)
        if not os.path.lexists(target):
            return
        with pinned(sys_, root, target) as at:
            if is_dir:
                sys_.mount("tmpfs", at, "tmpfs", MS_RDONLY)
            else:
                sys_.mount("/dev/null", at, "", MS_BIND)
    except OSError as exc:
        raise MountError(exc.errno or 0, f"masking {path}: {os.strerror(exc.errno or 0)}") from None


def readonly_path(sys_, root: str, path: str) -> None:
    target = secure_join(root, path)
    if not os.path.lexists(target):
        return
    try:
        with pinned(sys_, root, target) as at:
            sys_.mount(at, at, "", MS_BIND | MS_REC)
        with pinned(sys_, root, target) as at:          # the bind, now on top
            kept = os.statvfs(at).f_flag & ST_FLAGS_KEPT
            sys_.mount("", at, "", MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    except OSError as exc:
        raise MountError(exc.errno or 0, f"read-only {path}: {os.strerror(exc.errno or 0)}") from None
