"""Containers inside the guest: the rootfs share and the process set-up.

A container's rootfs is a host directory shared into the VM (virtio-9p, one
mount tag per container) and mounted under /run/kata/containers/<id>/rootfs.
Its init process gets new mount, UTS and IPC namespaces, the rootfs moved to
/ of its mount namespace and chroot'ed into (runc's --no-pivot way: the
guest's own root is an initramfs, which pivot_root refuses). Further
processes (`exec`) join the init's namespaces and root.

The set-up functions run in the forked child, between fork and exec.
"""

from __future__ import annotations

import os
import threading

from .cgroups import Cgroup, CgroupError
from .processes import ProcessError
from .syscalls import (CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWUTS, MS_BIND, MS_MOVE, MS_NODEV,
                       MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, MS_SLAVE)

CONTAINERS_DIR = "/run/kata/containers"
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap,access=client"


class Container:
    def __init__(self, container_id: str, rootfs: str, readonly: bool, hostname: str) -> None:
        self.id = container_id
        self.rootfs = rootfs
        self.readonly = readonly
        self.hostname = hostname
        self.init_pid: int | None = None
        self.cgroup = Cgroup(container_id)


class Containers:
    MODULES_TIMEOUT = 60.0

    def __init__(self, sys_, modules_ready: threading.Event | None = None) -> None:
        self.sys = sys_
        self.modules_ready = modules_ready
        self.lock = threading.Lock()
        self.by_id: dict[str, Container] = {}

    def get(self, container_id: str) -> Container:
        with self.lock:
            container = self.by_id.get(container_id)
        if container is None:
            raise ProcessError("not_found", f"no container {container_id!r}")
        return container

    def create(self, container_id: str, mount_tag: str, readonly: bool, hostname: str,
               resources: dict | None = None) -> Container:
        rootfs = f"{CONTAINERS_DIR}/{container_id}/rootfs"
        # 9p is among the modules the agent loads after it starts listening.
        if self.modules_ready is not None and not self.modules_ready.wait(self.MODULES_TIMEOUT):
            raise ProcessError("failed", "the guest's 9p modules did not load")
        with self.lock:
            if container_id in self.by_id:
                raise ProcessError("exists", f"container {container_id!r} already exists")
            os.makedirs(rootfs, exist_ok=True)
            flags = MS_RDONLY if readonly else 0
            try:
                self.sys.mount(mount_tag, rootfs, "9p", flags, NINEP_OPTIONS)
            except OSError as exc:
                raise ProcessError("failed", f"cannot mount the rootfs share {mount_tag!r}: {exc.strerror}") from None
            container = Container(container_id, rootfs, readonly, hostname)
            try:
                container.cgroup.create()
                container.cgroup.apply(resources or {})
            except OSError as exc:
                container.cgroup.remove()
                try:
                    self.sys.umount(rootfs)
                except OSError:
                    pass
                raise ProcessError("invalid", f"container resources: {exc.strerror}") from None
            self.by_id[container_id] = container
        return container

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

    def init_setup(self, container: Container):
        """Set-up for the container's first process (runs in the child)."""
        sys_ = self.sys

        def setup() -> None:
            container.cgroup.enter()
            # After entering: the new cgroup namespace is rooted at the container's cgroup.
            sys_.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP)
            # Nothing mounted from here on may leak back into the guest's namespace.
            sys_.mount("none", "/", "", MS_REC | MS_SLAVE)
            root = container.rootfs
            sys_.mount(root, root, "", MS_BIND | MS_REC)
            for source, target, fstype, flags, data in (
                    ("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, ""),
                    ("sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, ""),
                    ("cgroup2", "sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, ""),
                    ("/dev", "dev", "", MS_BIND | MS_REC, "")):
                path = f"{root}/{target}"
                try:
                    os.makedirs(path, exist_ok=True)
                except OSError:
                    continue  # a read-only rootfs without the mount point: do without
                sys_.mount(source, path, fstype, flags, data)
            if container.readonly:
                sys_.mount(root, root, "", MS_REMOUNT | MS_BIND | MS_RDONLY)
            if container.hostname:
                sys_.sethostname(container.hostname)
            os.chdir(root)
            sys_.mount(root, "/", "", MS_MOVE)
            sys_.chroot(".")
            os.chdir("/")
        return setup

    def join_setup(self, container: Container):
        """Set-up for a further process: enter the init's namespaces and root."""
        sys_ = self.sys
        if container.init_pid is None:
            raise ProcessError("state", f"container {container.id!r} has no running init process")
        pid = container.init_pid
        try:
            fds = [(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag)
                   for name, flag in (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("cgroup", CLONE_NEWCGROUP),
                                      ("mnt", CLONE_NEWNS))]
            root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise ProcessError("state", f"the init process of container {container.id!r} is gone") from None

        def setup() -> None:
            container.cgroup.enter()
            for fd, flag in fds:
                sys_.setns(fd, flag)
            os.fchdir(root_fd)
            sys_.chroot(".")
            os.chdir("/")

        def cleanup() -> None:
            for fd, _ in fds:
                os.close(fd)
            os.close(root_fd)
        return setup, cleanup
