"""QEMU in a jail: an unprivileged uid, namespaces of its own, an empty root.

A guest that takes over QEMU should land in a process that can do next to
nothing on the host. QEMU is started here

- as uid/gid `UID_BASE + its host pid` (unique among living VMs, derived so
  that nothing has to be allocated or freed, even after a crash; no passwd
  entry is needed), no supplementary groups, every capability dropped
  (effective, permitted, inheritable, ambient and the bounding set),
  `no_new_privs` set, and its own seccomp filter (`-sandbox`) on top;
- in new mount, pid, ipc and uts namespaces (and the network namespace of
  whoever starts it: the sandbox's), QEMU being pid 1 of its pid namespace;
- pivoted into a tmpfs mounted on the VM's `root` directory (in the jail's
  mount namespace only), read-only, holding the QEMU binary, its libraries
  and firmware (read-only binds), the guest kernel, initrd or root disk, the
  console log (chowned to the jail uid), and a /dev of its own with null,
  zero, random, urandom and, where used, kvm and vhost-vsock (nodes owned by
  the jail uid);
- in its host cgroup, as before (the launcher joins it before anything else).

Whatever QEMU would open on the host by name is opened here instead and
passed as a file descriptor: the vhost-user sockets it connects to (vsock,
virtio-fs), the QMP socket other processes reach (listening, made here), and
a 9p export, which an unprivileged QEMU cannot serve with passthrough
semantics: it goes through QEMU's `proxy` file system driver to
virtfs-proxy-helper, a root helper that chroots into the export and keeps
only the capabilities a file server needs (`FileHelper`).

The launch: `python -m kata_py.vmm.jail` (a child of the VM's owner) reads
the plan, clones QEMU's process with CLONE_PARENT and the new namespaces, so
that QEMU is the owner's own child (its pid, its exit status, its signals are
the owner's as before), reports that pid and exits. The clone sets itself
up and execs QEMU. Nothing it mounts outlives it: the mount namespace dies
with QEMU; the `root` directory, empty on the host, goes with the VM's run
directory.

$KATA_PY_JAIL=off runs QEMU as before (root, the host's namespaces), for
debugging.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from .. import hostsys
from ..hostsys import PR_SET_PDEATHSIG, MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT

UID_BASE = 0x50000000
ROOT_NAME = "root"
PROXY_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
# Firmware and option ROMs QEMU looks for by name (its data dir links into the
# others), and its modules (TCG itself is one in Debian's build).
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu", "/usr/share/ipxe",
                 "/usr/lib/x86_64-linux-gnu/qemu")
HOST_FILES = ("/etc/ld.so.cache",)
TMPFS_OPTIONS = "mode=0755,size=256k,nr_inodes=512"
# Device nodes: (name, major, minor, mode, owned by the jail uid)
DEVICES = {
    "null": (1, 3, 0o666, False),
    "zero": (1, 5, 0o666, False),
    "random": (1, 8, 0o666, False),
    "urandom": (1, 9, 0o666, False),
    "kvm": (10, 232, 0o600, True),
    "vhost-vsock": (10, 241, 0o600, True),
}

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PARENT = 0x00008000
SYS_CLONE = 56
SYS_PIVOT_ROOT = 155
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class JailError(Exception):
    """A jail could not be set up (reported by the launcher on its stderr)."""


def enabled() -> bool:
    return os.environ.get("KATA_PY_JAIL", "on").lower() not in ("0", "off", "no", "false")


def jail_id(host_pid: int) -> int:
    """The uid and gid of the jail whose QEMU has this host pid."""
    return UID_BASE + host_pid


# -- QEMU option strings ---------------------------------------------------------

def split_options(value: str) -> list[str]:
    """`a=1,b=x,,y` -> ["a=1", "b=x,y"] (QEMU escapes a comma by doubling it)."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


def join_options(parts: list[str]) -> str:
    return ",".join(part.replace(",", ",,") for part in parts)


def _option(parts: list[str], key: str) -> str | None:
    for part in parts[1:] if parts else []:
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


def _replace(parts: list[str], key: str, new: list[str]) -> list[str]:
    return [parts[0]] + [p for p in parts[1:] if not p.startswith(key + "=")] + new


# -- the plan ------------------------------------------------------------------------

@dataclass
class JailSpec:
    """What the launcher needs: everything host-side is resolved already."""

    root: str                                           # the VM's (empty) root directory
    binary: str                                         # QEMU, absolute
    argv: list[str]
    ro_binds: list[str] = field(default_factory=list)   # host paths, visible read-only at the same path
    rw_files: list[str] = field(default_factory=list)   # host files QEMU writes: chowned to the jail uid
    devices: list[str] = field(default_factory=list)    # names in DEVICES
    hostname: str = "kata-py-vm"


@dataclass
class Prepared:
    spec: JailSpec
    pass_fds: list[int]                 # for the launcher (inherited by QEMU)
    helpers: list["FileHelper"]
    closers: list[socket.socket]        # our ends: close once QEMU has been started

    def close(self) -> None:
        for sock in self.closers:
            sock.close()
        self.closers = []


@lru_cache(maxsize=4)
def runtime_paths(binary: str) -> tuple[str, ...]:
    """The directories of QEMU's libraries (as the loader names them), its
    firmware directories and the loader's cache: what the jail binds read-only."""
    found: list[str] = []
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JailError(f"cannot list the libraries of {binary}: {exc}") from exc
    for line in out.splitlines():
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else (words[0] if words else "")
        if path.startswith("/"):
            directory = os.path.dirname(path)
            if directory not in found:
                found.append(directory)
    if not found:
        raise JailError(f"ldd found no libraries for {binary}")
    found += [d for d in FIRMWARE_DIRS if os.path.isdir(d)]
    found += [f for f in HOST_FILES if os.path.isfile(f)]
    return tuple(found)


def qemu_binary(name: str) -> str:
    path = name if os.path.isabs(name) else shutil.which(name)
    if not path:
        raise JailError(f"{name} not found on PATH")
    return os.path.realpath(path)


def prepare(argv: list[str], root: Path, accel: str, hostname: str = "kata-py-vm") -> Prepared:
    """Rewrite QEMU's argv for the jail: host paths it opens by name become
    fds made here or binds into the jail. Starts a 9p export's file helper.
    On error, closes what it opened and raises JailError."""
    binary = qemu_binary(argv[0])
    spec = JailSpec(root=os.fspath(root), binary=binary, argv=[argv[0]],
                    ro_binds=[binary, *runtime_paths(binary)], devices=["null", "zero", "random", "urandom"],
                    hostname=hostname)
    prepared = Prepared(spec=spec, pass_fds=[], helpers=[], closers=[])
    if accel == "kvm":
        spec.devices.append("kvm")
    try:
        i = 1
        while i < len(argv):
            opt = argv[i]
            value = argv[i + 1] if i + 1 < len(argv) else None
            if value is None or not opt.startswith("-"):
                spec.argv.append(opt)
                i += 1
                continue
            spec.argv += _translate(opt, value, prepared)
            i += 2
    except BaseException:
        release(prepared)
        raise
    return prepared


def _translate(opt: str, value: str, prepared: Prepared) -> list[str]:
    spec = prepared.spec
    if opt in ("-kernel", "-initrd"):
        spec.ro_binds.append(value)
        return [opt, value]
    parts = split_options(value)
    if opt == "-drive":
        path = _option(["", *parts], "file")     # -drive has no type word first
        if path is not None:
            spec.ro_binds.append(path)
        return [opt, value]
    if opt == "-chardev" and parts[0] == "file":
        spec.rw_files.append(_option(parts, "path"))
        return [opt, value]
    if opt == "-chardev" and parts[0] == "socket" and _option(parts, "path") is not None \
            and _option(parts, "server") not in ("on", "yes", "true"):
        # A back end's socket (vsock, virtio-fs) that QEMU would connect to.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(_option(parts, "path"))
        except OSError as exc:
            sock.close()
            raise JailError(f"cannot connect to {_option(parts, 'path')}: {exc.strerror or exc}") from exc
        prepared.closers.append(sock)
        prepared.pass_fds.append(sock.fileno())
        return [opt, join_options(_replace(parts, "path", [f"fd={sock.fileno()}"]))]
    if opt == "-qmp" and value.startswith("unix:"):
        path, *rest = split_options(value[len("unix:"):])
        listener = _listen(path)
        prepared.closers.append(listener)
        prepared.pass_fds.append(listener.fileno())
        name = f"qmp-{len(prepared.closers)}"
        kept = [r for r in rest if r.startswith("wait=")]
        return ["-chardev", join_options(["socket", f"id={name}", f"fd={listener.fileno()}", "server=on", *kept]),
                "-mon", f"chardev={name},mode=control"]
    if opt == "-fsdev" and parts[0] == "local":
        helper = FileHelper(_option(parts, "path"))
        prepared.helpers.append(helper)
        fd = helper.start()
        prepared.pass_fds.append(fd)
        new = ["proxy", f"id={_option(parts, 'id')}", f"sock_fd={fd}"]
        if _option(parts, "readonly") in ("on", "yes", "true"):
            new.append("readonly=on")
        return [opt, join_options(new)]
    if opt == "-device" and parts[0].startswith("vhost-vsock"):
        spec.devices.append("vhost-vsock")
    return [opt, value]


def _listen(path: str) -> socket.socket:
    try:
        return hostsys.listen_private(path, 4)
    except OSError as exc:
        raise JailError(f"cannot listen on {path}: {exc.strerror or exc}") from exc


def release(prepared: Prepared) -> None:
    prepared.close()
    for helper in prepared.helpers:
        helper.stop()
    prepared.helpers = []


class FileHelper:
    """virtfs-proxy-helper serving one 9p export to one jailed QEMU over a
    socket pair: root, chrooted into the export by itself, keeping only the
    capabilities of a file server. It stays in the mount namespace of whoever
    starts it (binds added to the export later must reach it) and exits when
    QEMU closes its end, or dies with its parent."""

    def __init__(self, export: str | None) -> None:
        if not export:
            raise JailError("a 9p export without a path")
        self.export = export
        self.proc: subprocess.Popen | None = None
        self.ours: socket.socket | None = None

    def start(self) -> int:
        if not os.access(PROXY_HELPER, os.X_OK):
            raise JailError(f"{PROXY_HELPER} is missing: a jailed QEMU serves 9p through it "
                            "(Debian's qemu-system-common), or set KATA_PY_JAIL=off")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [PROXY_HELPER, "--nodaemon", "--fd", str(theirs.fileno()), "--path", self.export],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True, preexec_fn=hostsys.die_with_parent, start_new_session=True)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise JailError(f"cannot start {PROXY_HELPER}: {exc.strerror or exc}") from exc
        theirs.close()
        self.ours = ours
        return ours.fileno()

    def close_ours(self) -> None:
        # QEMU holds its own copy once started; the helper sees EOF when QEMU goes.
        if self.ours is not None:
            self.ours.close()
            self.ours = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, grace: float = 2.0) -> None:
        self.close_ours()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def encode_spec(spec: JailSpec) -> bytes:
    return json.dumps(asdict(spec)).encode()


def launcher_argv(spec_fd: int, report_fd: int) -> tuple[list[str], dict]:
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "kata_py.vmm.jail", str(spec_fd), str(report_fd)], env


# -- QEMU as a child that asyncio does not know ----------------------------------

class JailedProcess:
    """A child of the caller that asyncio does not know (QEMU, by
    CLONE_PARENT; the forked launcher), with the part of
    asyncio.subprocess.Process the VM uses: pid, returncode, wait, signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)
        self._exited: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _reap(self) -> None:
        if self._returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8        # reaped by someone else: unknown status
        if pid:
            self._returncode = os.waitstatus_to_exitcode(status)
            self._close_pidfd()
            # Whoever reaps (a waiter's callback, or a look at returncode) wakes the waiters.
            if self._exited is not None and not self._exited.done():
                self._exited.set_result(self._returncode)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        self._reap()
        return self._returncode

    async def wait(self) -> int:
        if self.returncode is not None:
            return self._returncode
        if self._exited is None:
            loop = self._loop = asyncio.get_running_loop()
            self._exited = loop.create_future()

            loop.add_reader(self._pidfd, self._reap)
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# -- inside: the clone that becomes QEMU -------------------------------------------

class Syscalls:
    """The system calls the jail makes (a fake stands in for it in unit tests)."""

    def __init__(self, owner_fd: int | None = None) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.owner_fd = owner_fd        # a pidfd on the process QEMU must die with

    def owner_gone(self) -> bool:
        return self.owner_fd is not None and bool(select.select([self.owner_fd], [], [], 0)[0])

    def _check(self, ret: int, what: str) -> None:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        self._check(self.libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                                    data.encode() or None), f"mount {source or fstype} on {target}")

    def umount(self, target: str, flags: int) -> None:
        self._check(self.libc.umount2(target.encode(), flags), f"umount {target}")

    def pivot_root(self, new: str, old: str) -> None:
        self._check(self.libc.syscall(SYS_PIVOT_ROOT, new.encode(), old.encode()), "pivot_root")

    def prctl(self, option: int, arg: int) -> None:
        self._check(self.libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")

    def capset_none(self) -> None:
        header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()
        self._check(self.libc.capset(header, data), "capset")

    def sethostname(self, name: str) -> None:
        self._check(self.libc.sethostname(name.encode(), len(name.encode())), "sethostname")

    def last_cap(self) -> int:
        try:
            return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        except (OSError, ValueError):
            return 40

    def host_pid(self) -> int:
        # The host's /proc (still mounted here) names us by our host pid.
        return int(os.readlink("/proc/self"))

    mkdir = staticmethod(os.mkdir)
    mknod = staticmethod(os.mknod)
    chown = staticmethod(os.chown)
    chmod = staticmethod(os.chmod)
    chdir = staticmethod(os.chdir)
    setgroups = staticmethod(os.setgroups)
    setresgid = staticmethod(os.setresgid)
    setresuid = staticmethod(os.setresuid)
    umask = staticmethod(os.umask)

    def touch(self, path: str) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def execv(self, path: str, argv: list[str]) -> None:
        os.execv(path, argv)


def _make_parents(sys_: Syscalls, root: str, path: str) -> str:
    """Make the directories of `path` below `root`; return the path there."""
    inside = root
    for name in Path(path).parent.parts[1:]:
        inside = os.path.join(inside, name)
        if not sys_.exists(inside):
            sys_.mkdir(inside, 0o755)
    return os.path.join(root, path.lstrip("/"))


def _bind(sys_: Syscalls, root: str, source: str, flags: int) -> None:
    target = _make_parents(sys_, root, source)
    if sys_.is_dir(source):
        if not sys_.exists(target):
            sys_.mkdir(target, 0o755)
    elif not sys_.exists(target):
        sys_.touch(target)
    sys_.mount(source, target, "", MS_BIND | MS_REC)
    sys_.mount("", target, "", MS_REMOUNT | MS_BIND | flags)


def build_root(spec: JailSpec, uid: int, sys_: Syscalls) -> None:
    """In a fresh mount namespace: an empty tmpfs on spec.root, filled, pivoted into, sealed."""
    root = spec.root
    sys_.mount("", "/", "", MS_REC | MS_PRIVATE)   # nothing of ours reaches the host
    sys_.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NOEXEC, TMPFS_OPTIONS)
    for source in spec.ro_binds:
        _bind(sys_, root, source, MS_RDONLY | MS_NOSUID | MS_NODEV)
    for source in spec.rw_files:
        sys_.touch(source)
        sys_.chown(source, uid, uid)
        sys_.chmod(source, 0o600)
        _bind(sys_, root, source, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = os.path.join(root, "dev")
    sys_.mkdir(dev, 0o755)
    for name in spec.devices:
        major, minor, mode, owned = DEVICES[name]
        node = os.path.join(dev, name)
        sys_.mknod(node, stat.S_IFCHR | mode, os.makedev(major, minor))
        sys_.chmod(node, mode)
        if owned:
            sys_.chown(node, uid, uid)
    sys_.chdir(root)
    sys_.pivot_root(".", ".")          # the old root is stacked on the new one...
    sys_.umount(".", MNT_DETACH)       # ...and detached here
    sys_.chdir("/")
    sys_.mount("", "/", "", MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def drop_privileges(uid: int, sys_: Syscalls) -> None:
    for cap in range(sys_.last_cap() + 1):
        sys_.prctl(PR_CAPBSET_DROP, cap)
    sys_.setgroups([])
    sys_.setresgid(uid, uid, uid)
    sys_.setresuid(uid, uid, uid)       # clears the permitted and effective sets
    sys_.capset_none()                  # and the inheritable one
    try:
        sys_.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass                            # a kernel without ambient capabilities
    sys_.prctl(PR_SET_NO_NEW_PRIVS, 1)


def become_qemu(spec: JailSpec, sys_: Syscalls) -> None:
    """The clone's life: set up the jail and exec QEMU (returns only on error)."""
    enter_jail(spec, sys_)
    sys_.execv(spec.binary, spec.argv)


def enter_jail(spec: JailSpec, sys_: Syscalls) -> None:
    """In the clone: its root, its hostname, its uid and no privileges; and
    gone if the owner is."""
    uid = jail_id(sys_.host_pid())
    old = sys_.umask(0o022)
    build_root(spec, uid, sys_)
    try:
        sys_.sethostname(spec.hostname)
    except OSError:
        pass
    drop_privileges(uid, sys_)
    # A change of uid clears the parent-death signal: set it again, then make
    # sure the owner did not die in between.
    sys_.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if sys_.owner_gone():
        raise JailError("the VM's owner exited")
    sys_.umask(old)


JAIL_NAMESPACES = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS


def clone_parent(namespaces: int) -> int:
    """clone(2) with CLONE_PARENT into new `namespaces`: the clone is our
    parent's child (0 here in the clone, its pid in the caller). The clone
    gets SIGKILL if that parent dies while it sets up (again after setuid,
    which clears it). OSError when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pid = libc.syscall(SYS_CLONE, ctypes.c_ulong(CLONE_PARENT | namespaces | signal.SIGCHLD), None, None, None, None)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    if pid == 0:
        hostsys.die_with_parent()
    return pid


def main(argv: list[str]) -> int:
    spec_fd, report_fd = int(argv[0]), int(argv[1])
    with os.fdopen(spec_fd, "rb") as f:
        spec = JailSpec(**json.loads(f.read()))
    os.set_inheritable(report_fd, False)
    owner = os.pidfd_open(os.getppid())
    try:
        pid = clone_parent(JAIL_NAMESPACES)
    except OSError as exc:
        os.write(2, f"kata-py jail: {exc.strerror}\n".encode())
        return 1
    if pid == 0:
        try:
            os.close(report_fd)
            become_qemu(spec, Syscalls(owner))     # the pidfd is close-on-exec
        except BaseException as exc:
            os.write(2, f"kata-py jail: {exc}\n".encode())
        os._exit(1)
    os.write(report_fd, f"{pid}\n".encode())
    return 0


def fork_launcher(spec_fd: int, report_fd: int, pass_fds: list[int], output_fd: int, preexec) -> int:
    """The launcher forked from this process, which has this module imported
    already, rather than started as a new interpreter (`launcher_argv`):
    about 70 ms less on every VM's start. Its pid (a child of ours).

    It runs only main() and exits, like a preexec_fn of subprocess's (which
    a process with threads runs too): the fds it needs, stdio on /dev/null
    and `output_fd`, its own session, umask 0177, no signal handler of ours."""
    pid = hostsys.fork_helper()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        os.umask(0o177)
        preexec()
        # QEMU inherits pass_fds
        hostsys.settle_forked_child({spec_fd, report_fd}, pass_fds, stdout=output_fd, stderr=output_fd)
        code = main([str(spec_fd), str(report_fd)])
    except BaseException as exc:
        try:
            os.write(2, f"kata-py jail: launcher: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
