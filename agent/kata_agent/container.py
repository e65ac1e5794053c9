"""Containers inside the guest: the shared rootfs and each process's set-up.

A container's files come from one host directory shared into the VM
(virtio-fs or virtio-9p, one mount tag per export) and mounted under
/run/kata/containers/<id>/share: the rootfs at `rootfs_path` in it, the
sources of its bind mounts beside it. Its init process gets the namespaces
the spec lists (the guest's network namespace is the VM's own, so never a new
one), the spec's mounts, devices, masked and read-only paths, then
pivot_root into the rootfs (or MS_MOVE + chroot with no_pivot), and last a
user namespace when the spec maps ids. Further processes (`exec`) join the
init's namespaces and root.

A container may instead join the uts, ipc or pid namespace of another
container's init (`join`): a Kubernetes pod's containers share its sandbox
container's. Its init enters them (setns) where it would have made its own;
nothing of them is undone when it exits, and they outlive the init that
made them for as long as a process holds them.

The set-up functions run in the forked child, between fork and exec; only
the pid namespace is chosen in the parent, which is where it must be (a
process's own pid namespace never changes: only its children's can).
"""

from __future__ import annotations

import errno
import os
import threading
import time

from . import mounts as mountlib
from .cgroups import Cgroup, CgroupError
from .processes import ProcessError
from .spawn import StepFailed, ask_parent_for_id_maps
from .syscalls import (CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWUTS,
                       MNT_DETACH, MS_BIND, MS_MOVE, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SHARED,
                       MS_SLAVE, MS_UNBINDABLE)

CONTAINERS_DIR = "/run/kata/containers"
NETWORK_FILES = {"/etc/hosts": "/run/kata/network/hosts", "/etc/resolv.conf": "/run/kata/network/resolv.conf",
                 "/etc/hostname": "/run/kata/network/hostname"}

# Namespaces a container may ask for, and the flag each is made with.
NAMESPACE_FLAGS = {"mount": CLONE_NEWNS, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "cgroup": CLONE_NEWCGROUP}
DEFAULT_NAMESPACES = ("mount", "uts", "ipc", "cgroup")
# Namespaces a container may join instead (the protocol's JOINABLE_NAMESPACES),
# and the flag each is entered with.
JOIN_FLAGS = {"uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "pid": CLONE_NEWPID}
# Sysctls that would set what a joined uts namespace holds: the pod's.
UTS_SYSCTLS = ("kernel.hostname", "kernel.domainname")
OWNED_FILESYSTEMS = ("tmpfs", "devpts", "mqueue")
ROOTFS_PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "slave": MS_SLAVE,
                      "rslave": MS_SLAVE | MS_REC, "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
                      "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC}


class Container:
    def __init__(self, container_id: str, share: str, spec: dict) -> None:
        self.id = container_id
        self.share = share
        self.spec = spec                       # as created: a pre-forked process rebuilds it from this
        self.rootfs = share + ("/" + spec["rootfs_path"] if spec.get("rootfs_path") else "")
        self.readonly = bool(spec.get("readonly"))
        self.hostname = spec.get("hostname", "")
        self.domainname = spec.get("domainname", "")
        # Type -> id of the container whose init's namespace this one's init enters.
        self.join: dict[str, str] = dict(spec.get("join", {}))
        # A joined type is never made as well (an explicit list naming one is refused).
        self.namespaces = set(spec.get("namespaces", DEFAULT_NAMESPACES)) - set(self.join)
        self.uid_mappings = spec.get("uid_mappings", [])
        self.gid_mappings = spec.get("gid_mappings", [])
        self.mounts = spec.get("mounts", [])
        self.devices = spec.get("devices", [])
        self.masked_paths = spec.get("masked_paths", [])
        self.readonly_paths = spec.get("readonly_paths", [])
        self.rootfs_propagation = spec.get("rootfs_propagation", "")
        self.sysctl = [(item["key"], item["value"]) for item in spec.get("sysctl", [])]
        self.no_pivot = bool(spec.get("no_pivot"))
        self.init_pid: int | None = None
        self.init_process = None               # its processes.Process, for a pidfd while it runs
        self.mount_tag: str | None = None      # the tag its share came from
        self.cgroup = Cgroup(container_id)
        self.seccomp = None

    @property
    def user_namespace(self) -> bool:
        return "user" in self.namespaces

    def guest_id(self, container_id: int, group: bool = False) -> int:
        """The guest's id for an id inside the container (itself without a user
        namespace; unmapped ids become the overflow id, as the kernel shows them)."""
        if not self.user_namespace:
            return container_id
        for m in self.gid_mappings if group else self.uid_mappings:
            if m["container_id"] <= container_id < m["container_id"] + m["size"]:
                return m["host_id"] + container_id - m["container_id"]
        return 65534

    def owned_mount(self, mount: dict) -> dict:
        """A filesystem mount with its owner options in guest ids.

        The agent mounts as the guest's root, before the container enters its
        user namespace; runc mounts inside it. So that a tmpfs belongs to the
        container's root (and a devpts gid=5 is the container's tty group), the
        ids are translated here.
        """
        if not self.user_namespace or mount.get("type") not in OWNED_FILESYSTEMS or mount.get("from"):
            return mount
        options = []
        seen = set()
        for option in mount.get("options", []):
            key, sep, value = option.partition("=")
            if sep and key in ("uid", "gid") and value.isdigit():
                option = f"{key}={self.guest_id(int(value), group=key == 'gid')}"
                seen.add(key)
            options.append(option)
        if mount.get("type") == "tmpfs":
            options += [f"{key}={self.guest_id(0, group=key == 'gid')}" for key in ("uid", "gid") if key not in seen]
        return dict(mount, options=options)


def validate_spec(spec: dict) -> None:
    """What the schema cannot check; raises ProcessError("invalid")."""
    if "user" in spec.get("namespaces", ()) and not (spec.get("uid_mappings") and spec.get("gid_mappings")):
        raise ProcessError("invalid", "a user namespace needs uid_mappings and gid_mappings")
    _validate_join(spec)
    for mount in spec.get("mounts", []):
        if not mount["destination"].startswith("/"):
            raise ProcessError("invalid", f"mount destination {mount['destination']!r} is not absolute")
        if mount.get("from") == "guest" and not mount.get("source", "").startswith("/dev/"):
            raise ProcessError("invalid", f"a guest bind source must be a device under /dev: {mount.get('source')!r}")


def _validate_join(spec: dict) -> None:
    join = spec.get("join", {})
    for name, target in sorted(join.items()):
        if name in spec.get("namespaces", ()):
            raise ProcessError("invalid", f"the {name} namespace is both new and joined from container {target!r}")
        if target == spec.get("container_id"):
            raise ProcessError("invalid", f"container {target!r} cannot join its own {name} namespace")
    if "uts" in join:
        for item in spec.get("sysctl", []):
            if item["key"] in UTS_SYSCTLS:
                raise ProcessError("invalid", f"sysctl {item['key']} would change the uts namespace joined "
                                              f"from container {join['uts']!r}")


class Containers:
    MODULES_TIMEOUT = 60.0

    def __init__(self, sys_, modules_ready: threading.Event | None = None) -> None:
        self.sys = sys_
        self.modules_ready = modules_ready
        self.lock = threading.Lock()
        self.by_id: dict[str, Container] = {}
        self._own_pid_ns: int | None = None

    def get(self, container_id: str) -> Container:
        with self.lock:
            container = self.by_id.get(container_id)
        if container is None:
            raise ProcessError("not_found", f"no container {container_id!r}")
        return container

    def create(self, container_id: str, mount_tag: str, spec: dict, resources: dict | None = None) -> Container:
        validate_spec(spec)
        share = f"{CONTAINERS_DIR}/{container_id}/share"
        # virtio-fs and 9p are among the modules the agent loads after it starts listening.
        if self.modules_ready is not None and not self.modules_ready.wait(self.MODULES_TIMEOUT):
            raise ProcessError("failed", "the guest's shared filesystem modules did not load")
        with self.lock:
            if container_id in self.by_id:
                raise ProcessError("exists", f"container {container_id!r} already exists")
            os.makedirs(share, exist_ok=True)
            holder = self._share_holder(mount_tag)
            try:
                if holder is not None:
                    # A virtio-9p channel takes one mount at a time: a second
                    # container on the same tag (one export per sandbox, an
                    # entry per container) binds the mount the first one made.
                    self.sys.mount(holder, share, "", MS_BIND)
                else:
                    # Read-write even for a read-only root: mount points may have to be
                    # made first; the container's view is remounted read-only after.
                    self._mount_share(mount_tag, share)
            except OSError as exc:
                raise ProcessError("failed", f"cannot mount the share {mount_tag!r}: {exc.strerror}") from None
            container = Container(container_id, share, spec)
            container.mount_tag = mount_tag
            if not os.path.isdir(container.rootfs):
                self._undo(container)
                raise ProcessError("invalid", f"the rootfs {spec.get('rootfs_path')!r} is not in the share")
            try:
                container.cgroup.create()
                container.cgroup.apply(resources or {})
            except OSError as exc:
                container.cgroup.remove()
                self._undo(container)
                raise ProcessError("invalid", f"container resources: {exc.strerror}") from None
            self.by_id[container_id] = container
        return container

    BUSY_TIMEOUT = 2.0

    def _mount_share(self, mount_tag: str, share: str) -> None:
        """A container deleted a moment ago may still hold the channel (its
        lazily detached mount goes once its last file is closed): EBUSY for
        a short while is worth a retry."""
        deadline = time.monotonic() + self.BUSY_TIMEOUT
        while True:
            try:
                mountlib.mount_share(self.sys, mount_tag, share)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _share_holder(self, mount_tag: str) -> str | None:
        """Where a live container has `mount_tag` mounted (call with the lock held)."""
        for container in self.by_id.values():
            if container.mount_tag == mount_tag:
                return container.share
        return None

    DELETE_TIMEOUT = 5.0

    def delete(self, container_id: str) -> None:
        """Undo create: kill what still runs in the container, remove its cgroup,
        unmount its share. Afterwards the VM holds nothing of it (a pooled VM is
        warmed up with a container it then deletes)."""
        container = self.get(container_id)
        if not container.cgroup.kill_and_remove(self.DELETE_TIMEOUT):
            raise ProcessError("failed", f"container {container_id!r}: its processes did not die")
        with self.lock:
            self.by_id.pop(container_id, None)
        self._undo(container, MNT_DETACH)
        for directory in (container.share, os.path.dirname(container.share)):
            try:
                os.rmdir(directory)
            except OSError:
                pass

    def _undo(self, container: Container, flags: int = 0) -> None:
        try:
            self.sys.umount(container.share, flags)
        except OSError:
            pass

    def update(self, container: Container, resources: dict) -> None:
        try:
            container.cgroup.apply(resources)
        except CgroupError as exc:
            raise ProcessError("invalid", f"update: {exc.strerror}") from None

    def stats(self, container: Container) -> dict:
        return container.cgroup.stats()

    def processes(self, container: Container) -> list[dict]:
        """Guest processes in the container: those in its init's mount namespace."""
        if container.init_pid is None:
            return []
        try:
            ns = os.readlink(f"/proc/{container.init_pid}/ns/mnt")
        except OSError:
            return []
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{name}/ns/mnt") != ns:
                    continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read(4096).replace(b"\0", b" ").strip().decode(errors="replace")
            except OSError:
                continue  # exited while we looked
            found.append({"pid": int(name), "cmd": cmd[:4096]})
        return found

    def signal_all(self, container: Container, signum: int) -> None:
        for proc in self.processes(container):
            try:
                os.kill(proc["pid"], signum)
            except ProcessLookupError:
                pass

    # -- namespaces joined from other containers ------------------------------------
    def check_join(self, spec: dict, pidfd_of) -> None:
        """At create: a clear error now, not at start, when a container to
        join does not exist or its init does not run (checked again at start)."""
        _validate_join(spec)
        for fd in self.open_joined(spec.get("join", {}), pidfd_of).values():
            os.close(fd)

    def open_joined(self, join: dict, pidfd_of) -> dict[str, int]:
        """Namespace type -> a pidfd of the init whose namespace is joined.

        `pidfd_of(process)` is the process table's: None once the init was
        reaped. A pidfd rather than /proc/<pid>/ns/<type>: the pid of an init
        that exited may by now be another process's, and setns() through a
        pidfd fails (ESRCH) if its process has exited since, rather than
        entering the namespaces of a dead pid namespace's init.
        """
        fds: dict[str, int] = {}
        try:
            for name, target_id in sorted(join.items()):
                with self.lock:
                    target = self.by_id.get(target_id)
                what = f"cannot join the {name} namespace of container {target_id!r}"
                if target is None:
                    raise ProcessError("not_found", f"{what}: no such container")
                fd = pidfd_of(target.init_process) if target.init_process is not None else None
                if fd is None:
                    raise ProcessError("state", f"{what}: it has no running init process")
                fds[name] = fd
                if _is_agents_namespace(target.init_pid, name):
                    # Its init made none of that type: joining would put the
                    # container in the guest's own, which a caller asking to
                    # share a pod's namespace cannot mean.
                    raise ProcessError("invalid", f"{what}: it has no {name} namespace of its own")
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    # -- pid namespace: chosen in the parent, around fork ---------------------------
    def _pid_ns_switch(self, enter):
        """A callable for the process table: run `enter()` before fork (this
        thread's children go to another pid namespace) and return how to undo it."""
        sys_ = self.sys
        if self._own_pid_ns is None:
            self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        own = self._own_pid_ns

        def around_fork():
            enter()
            return lambda: sys_.setns(own, CLONE_NEWPID)
        return around_fork

    def new_pid_namespace(self, container: Container):
        if "pid" not in container.namespaces:
            return None
        return self._pid_ns_switch(lambda: self.sys.unshare(CLONE_NEWPID))

    def joined_pid_namespace(self, container: Container, pidfd: int):
        """The init is forked into the joined init's pid namespace (it is not
        its pid 1, and is killed with the rest when that pid 1 exits)."""
        def enter() -> None:
            try:
                self.sys.setns(pidfd, CLONE_NEWPID)
            except OSError as exc:
                raise ProcessError("state", f"cannot join the pid namespace of container {container.join['pid']!r}: "
                                            f"{exc.strerror}") from None
        return self._pid_ns_switch(enter)

    def write_id_maps(self, container: Container):
        if not container.user_namespace:
            return None

        def write(pid: int) -> None:
            for name, mappings in (("uid_map", container.uid_mappings), ("gid_map", container.gid_mappings)):
                text = "".join(f"{m['container_id']} {m['host_id']} {m['size']}\n" for m in mappings)
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
        return write

    # -- the init process -------------------------------------------------------------
    def init_setup(self, container: Container, joined: dict[str, int] | None = None):
        """Set-up for the container's first process: (setup, which runs in the
        child, cleanup, around_fork). `joined`: open_joined's pidfds, which
        cleanup closes (it may be called more than once)."""
        sys_ = self.sys
        root = container.rootfs
        network_files = {dest: path for dest, path in NETWORK_FILES.items() if os.path.exists(path)}
        joined = dict(joined or {})
        entered = [(name, fd) for name, fd in sorted(joined.items()) if name != "pid"]
        # The pod's uts namespace keeps its own names: the pod's hostname wins.
        set_names = "uts" not in joined

        def setup() -> None:
            container.cgroup.enter()
            # Before anything is mounted: an mqueue mount shows the ipc
            # namespace of the process that makes it.
            for name, fd in entered:
                try:
                    sys_.setns(fd, JOIN_FLAGS[name])
                except OSError as exc:
                    raise StepFailed(f"join the {name} namespace of container {container.join[name]!r}",
                                     exc.errno or 0) from None
            # After entering: the new cgroup namespace is rooted at the container's cgroup.
            flags = CLONE_NEWNS  # always: the container's mounts must never touch the agent's view
            for name, flag in NAMESPACE_FLAGS.items():
                if name in container.namespaces:
                    flags |= flag
            sys_.unshare(flags)
            # Nothing mounted from here on may leak back into the guest's namespace.
            sys_.mount("", "/", "", MS_REC | MS_SLAVE)
            sys_.mount(root, root, "", MS_BIND | MS_REC)
            _spec_mounts(sys_, container, network_files)
            mountlib.make_devices(root, [dict(d, uid=container.guest_id(d.get("uid", 0)),
                                              gid=container.guest_id(d.get("gid", 0), group=True))
                                         for d in container.devices])
            for path in container.masked_paths:
                mountlib.mask_path(sys_, root, path)
            for path in container.readonly_paths:
                mountlib.readonly_path(sys_, root, path)
            for key, value in container.sysctl:
                # Through the guest's /proc: the VM is the container's own, and the
                # namespaced keys resolve to the namespaces just made or joined
                # (an ipc key in a joined namespace is the pod's, as under runc).
                with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                    f.write(value)
            if container.hostname and set_names:
                sys_.sethostname(container.hostname)
            if container.domainname and set_names:
                sys_.setdomainname(container.domainname)
            if container.readonly:
                sys_.mount("", root, "", MS_REMOUNT | MS_BIND | MS_RDONLY
                           | (os.statvfs(root).f_flag & mountlib.ST_FLAGS_KEPT))
            _enter_root(sys_, root, container.no_pivot)
            if container.rootfs_propagation:
                sys_.mount("", "/", "", ROOTFS_PROPAGATION[container.rootfs_propagation])
            if container.user_namespace:
                sys_.unshare(CLONE_NEWUSER)
                ask_parent_for_id_maps()

        def cleanup() -> None:
            while joined:
                os.close(joined.popitem()[1])

        if "pid" in joined:
            around_fork = self.joined_pid_namespace(container, joined["pid"])
        else:
            around_fork = self.new_pid_namespace(container)
        return setup, cleanup, around_fork

    # -- further processes -----------------------------------------------------------
    def join_setup(self, container: Container):
        """Set-up for a further process: enter the init's namespaces and root."""
        sys_ = self.sys
        if container.init_pid is None:
            raise ProcessError("state", f"container {container.id!r} has no running init process")
        pid = container.init_pid
        joined = [("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("cgroup", CLONE_NEWCGROUP), ("mnt", CLONE_NEWNS)]

        def ns_fd(name: str) -> int:
            return os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fds = [(ns_fd(name), flag) for name, flag in joined]
            root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # A joined pid namespace is the init's as much as one it made.
            pid_fd = ns_fd("pid") if "pid" in container.namespaces or "pid" in container.join else None
            user_fd = ns_fd("user") if container.user_namespace else None
        except OSError:
            raise ProcessError("state", f"the init process of container {container.id!r} is gone") from None

        def setup() -> None:
            container.cgroup.enter()
            for fd, flag in fds:
                sys_.setns(fd, flag)
            os.fchdir(root_fd)
            sys_.chroot(".")
            if user_fd is not None:
                # Last: the other namespaces belong to the guest's own user namespace.
                sys_.setns(user_fd, CLONE_NEWUSER)
            os.chdir("/")

        def cleanup() -> None:
            for fd, _ in fds:
                os.close(fd)
            os.close(root_fd)
            for fd in (pid_fd, user_fd):
                if fd is not None:
                    os.close(fd)

        around_fork = None
        if pid_fd is not None:
            around_fork = self._pid_ns_switch(lambda: sys_.setns(pid_fd, CLONE_NEWPID))
        return setup, cleanup, around_fork


def _is_agents_namespace(pid: int | None, name: str) -> bool:
    """Whether process `pid` is in the agent's own namespace of type `name`
    (False when that cannot be read: setns through the pidfd then tells)."""
    try:
        return os.stat(f"/proc/{pid}/ns/{name}").st_ino == os.stat(f"/proc/self/ns/{name}").st_ino
    except OSError:
        return False


def _spec_mounts(sys_, container: Container, network_files: dict) -> None:
    root = container.rootfs
    destinations = {os.path.normpath(mount["destination"]) for mount in container.mounts}
    if "/dev" not in destinations:
        # Device nodes are made in /dev, and never on the host's share.
        mountlib.mount_one(sys_, root, container.owned_mount({"destination": "/dev", "type": "tmpfs",
                                                              "options": ["nosuid", "mode=755", "size=64k"]}),
                           "tmpfs")
    for mount in container.mounts:
        if mount.get("from") == "share":
            source = container.share + "/" + mount["source"]
        else:
            source = mount.get("source", "")
        if mount.get("type") == "devpts":
            # The agent opens a process's terminal in the guest's devpts before
            # fork; a new instance here would not hold it, and `tty`/ttyname()
            # would fail. The guest serves this one container, so its own
            # instance (it holds this container's terminals only) is bound.
            mount = dict(mount, type="bind", options=[o for o in mount.get("options", []) if "=" not in o
                                                      and o != "newinstance"] + ["bind"])
            source = "/dev/pts"
        elif mount.get("type") in ("cgroup", "cgroup2") and "cgroup" not in container.namespaces:
            # Without a cgroup namespace a new cgroup2 mount would show the whole
            # guest tree: bind the container's own cgroup instead (runc's way).
            options = [o for o in mount.get("options", []) if o not in ("bind", "rbind")] + ["rbind"]
            mount = dict(mount, type="bind", options=options)
            source = container.cgroup.path
        mountlib.mount_one(sys_, root, container.owned_mount(mount), source)
    # The guest's network files, where the spec brings none of its own.
    for dest, path in network_files.items():
        if dest not in destinations:
            mountlib.mount_one(sys_, root, {"destination": dest, "type": "bind", "options": ["ro"]}, path)


def _enter_root(sys_, root: str, no_pivot: bool) -> None:
    os.chdir(root)
    if no_pivot:
        sys_.mount(root, "/", "", MS_MOVE)
        sys_.chroot(".")
    else:
        # pivot_root(".", "."): the old root ends up on top of the new one and is
        # detached at once, so the container never sees the guest's own files.
        sys_.pivot_root(".", ".")
        sys_.umount(".", MNT_DETACH)
    os.chdir("/")

