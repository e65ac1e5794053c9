"""One pod in one VM: the containers a shim holds, their processes and stdio.

The first container created (the pod's sandbox container under CRI, or the
only container under `ctr run`) boots the VM and attaches the network
namespace its spec names (every interface CNI made there becomes a NIC of
the VM). Each further container joins that VM: its rootfs and bind sources
are bound into the VM's one 9p export under names of its own (`k<N>-...`),
and the agent gives it its own mount/pid/ipc/uts namespaces and cgroup, or
joins the sandbox container's where the spec names them by path (CRI names
`/proc/<sandbox pid>/ns/<type>`: the sandbox's task pid is this shim's, so
such a path means "the pod's").

Pids: containerd gets this shim's pid for every task (there is no host
process per container; guest pids mean nothing on the host), and guest pids
from Pids.

stdio: containerd passes FIFO paths (or files); they are opened here and
relayed by kata_py.sandbox.process.ProcessSession. Output FIFOs are opened
read-write, so that the open never blocks; the stdin FIFO read-only and
non-blocking, so that the client's close ends the guest's stdin (as does
CloseIO).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import hostsys
from ..errors import KataError
from ..protocol.oci_names import FLAG_OPTIONS
from ..sandbox.process import ProcessSession
from ..sandbox.share import TAG, ContainerShare

log = logging.getLogger("kata_py.shim.pod")

POD_MEMORY_MIB = 512            # a pod's VM unless its first container asks for more
SANDBOX_TYPES = ("sandbox",)    # io.kubernetes.cri.container-type of the pause container
JOINABLE = ("uts", "ipc", "pid")


class PodError(KataError):
    """A request the pod cannot carry out; `kind` picks the ttrpc code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind        # not_found | exists | state | invalid | failed


@dataclass
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    fds: dict = field(default_factory=dict)

    def open(self) -> dict:
        """The fds ProcessSession relays (None where containerd gave no path)."""
        for name in ("stdin", "stdout", "stderr"):
            path = getattr(self, name)
            if not path or (name == "stderr" and self.terminal):
                self.fds[name] = None
                continue
            self.fds[name] = _open_stdio(path, name)
        return {"stdin_fd": self.fds["stdin"], "stdout_fd": self.fds["stdout"],
                "stderr_fd": self.fds["stderr"], "tty": self.terminal}

    def close(self) -> None:
        for name, fd in list(self.fds.items()):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.fds[name] = None


def _open_stdio(path: str, name: str) -> int:
    if path.startswith("file://"):
        path = path[len("file://"):]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = 0
    try:
        if stat.S_ISFIFO(mode) and name == "stdin":
            # Read-only, so that the client's close is our end of input; non-
            # blocking to open before the client's writer (the relay polls).
            return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if stat.S_ISFIFO(mode):
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if name == "stdin":
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise PodError("invalid", f"{name} {path}: {exc.strerror}") from exc


class Proc:
    """A container's init (exec_id "") or one exec'd process."""

    def __init__(self, task: "Task", exec_id: str, spec: dict, stdio: Stdio) -> None:
        self.task = task
        self.exec_id = exec_id
        self.spec = spec                # create_process arguments (argv, env, cwd, user, security)
        self.stdio = stdio
        self.session: ProcessSession | None = None
        self.guest_pid = 0
        self.status = "created"         # created | running | stopped
        self.exit_status: int | None = None
        self.exited_at: int | None = None  # ns since the epoch, as containerd's Timestamps take it
        self.done = asyncio.Event()
        self.relay: asyncio.Task | None = None
        self.rows = int(spec.get("rows", 0))
        self.cols = int(spec.get("cols", 0))

    @property
    def process_id(self) -> str:
        return f"{self.task.agent_id}-{'init' if not self.exec_id else 'x-' + _short(self.exec_id)}"

    async def create(self, pod: "Pod", init: bool) -> None:
        spec = self.spec
        fds = self.stdio.open()
        self.session = ProcessSession(pod.sandbox, spec["argv"], env=spec["env"], cwd=spec["cwd"],
                                      user=spec["user"], security=spec["security"], rows=self.rows,
                                      cols=self.cols, container_id=self.task.agent_id, init=init,
                                      process_id=self.process_id, **fds)
        await self.session.create()

    def watch(self, pod: "Pod") -> None:
        """Relay stdio until the process exits; then record and announce it."""
        async def run() -> None:
            try:
                status = await self.session.relay_and_wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:     # the VM went away: the process is gone with it
                log.warning("process %s of %s: %s", self.exec_id or "init", self.task.id, exc)
                status = 128 + 9
            self.exited(status)
            pod.process_exited(self)
        self.relay = asyncio.ensure_future(run())

    def exited(self, status: int) -> None:
        if self.status == "stopped":
            return
        self.status = "stopped"
        self.exit_status = status
        self.exited_at = time.time_ns()
        self.stdio.close()
        self.done.set()


def _short(exec_id: str) -> str:
    import hashlib

    return hashlib.sha256(exec_id.encode()).hexdigest()[:16]


class Task:
    """One container of the pod."""

    def __init__(self, container_id: str, bundle: str, number: int, config: dict) -> None:
        self.id = container_id
        self.bundle = bundle
        self.number = number
        self.config = config
        self.agent_id = f"k{number}-{_short(container_id)[:12]}"
        self.init: Proc | None = None
        self.execs: dict[str, Proc] = {}
        self.entries: list[str] = []        # its names in the VM's export
        self.rootfs_mounts: list[str] = []  # what Create mounted on the host (in the shim's namespace)
        self.paused = False
        self.oom_watch: asyncio.Task | None = None

    def process(self, exec_id: str) -> Proc:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise PodError("not_found", f"process {exec_id} does not exist in {self.id}") from None

    @property
    def is_sandbox(self) -> bool:
        annotations = self.config.get("annotations") or {}
        return annotations.get("io.kubernetes.cri.container-type") in SANDBOX_TYPES


def mount_rootfs(mounts: list, target: Path) -> list[str]:
    """containerd's rootfs mounts (an overlay of the image's snapshots, or a
    bind) on <bundle>/rootfs, in the shim's own mount namespace: they go
    with the shim however it ends."""
    made = []
    for mount in mounts:
        flags, data = 0, []
        for option in mount.options:    # flag options as the agent reads a spec's; the rest is the fs's data
            if option in FLAG_OPTIONS:
                clear, add = FLAG_OPTIONS[option]
                flags = (flags & ~clear) | add
            else:
                data.append(option)
        kind = mount.type
        if kind == "bind" or flags & hostsys.MS_BIND:
            flags |= hostsys.MS_BIND
            kind = ""
        target.mkdir(exist_ok=True)
        try:
            hostsys.mount(mount.source, str(target), kind, flags & ~hostsys.MS_RDONLY if flags & hostsys.MS_BIND
                          else flags, ",".join(data))
            if flags & hostsys.MS_BIND and flags & hostsys.MS_RDONLY:
                hostsys.mount("", str(target), "", hostsys.MS_REMOUNT | hostsys.MS_BIND | hostsys.MS_RDONLY)
        except OSError as exc:
            unmount_all(made)
            raise PodError("failed", f"mounting the rootfs ({mount.type} {mount.source}): {exc.strerror}") from exc
        made.append(str(target))
    return made


def unmount_all(targets: list[str]) -> None:
    for target in reversed(targets):
        try:
            hostsys.umount(target, hostsys.MNT_DETACH)
        except OSError as exc:
            log.warning("unmounting %s: %s", target, exc)
    targets.clear()


def pod_vm_size(config: dict) -> tuple[int, int]:
    """(memory MiB, vCPUs) of a pod's VM, from its first container's spec:
    the CRI's pod annotations (the sum of the pod's containers' limits, as
    containerd passes them to the sandbox container) when present, else that
    container's own resources; at least POD_MEMORY_MIB without a pod figure."""
    import math

    from ..oci.process_spec import MAX_MEMORY_MIB, vm_mib_for, vm_size

    memory, cpus = vm_size(config)
    annotations = config.get("annotations") or {}
    try:
        pod_memory = int(annotations.get("io.kubernetes.cri.sandbox-memory") or 0)
        quota = int(annotations.get("io.kubernetes.cri.sandbox-cpu-quota") or 0)
        period = int(annotations.get("io.kubernetes.cri.sandbox-cpu-period") or 0) or 100000
    except ValueError as exc:
        raise PodError("invalid", f"a CRI sandbox annotation is not a number: {exc}") from exc
    if pod_memory > 0:
        memory = max(memory, vm_mib_for(pod_memory))
    else:
        memory = max(memory, POD_MEMORY_MIB)
    if memory > MAX_MEMORY_MIB:
        raise PodError("invalid", f"the pod needs a {memory} MiB VM; the most kata-py gives one VM is "
                                  f"{MAX_MEMORY_MIB} MiB")
    if quota > 0:
        cpus = max(cpus, min(math.ceil(quota / period), os.cpu_count() or 1))
    return memory, cpus


def vm_dir(pod_dir: Path, key: str) -> Path:
    """The VM's run directory, beside the pod's (its sockets' paths must stay
    under AF_UNIX's 108 bytes); its host cgroups take its name, so it is the
    pod's own."""
    return pod_dir.parent / f"vm-{key}"


class Pod:
    """The VM and the containers in it."""

    def __init__(self, pod_id: str, publish, run_dir: Path) -> None:
        self.id = pod_id
        self.publish = publish          # publish(topic, event message)
        self.run_dir = run_dir          # the shim's own directory (export, network record)
        self.sandbox = None
        self.export: ContainerShare | None = None
        self.network = None
        self.tasks: dict[str, Task] = {}
        self.numbers = 0
        self.lock = asyncio.Lock()
        self.memory_mib = 0
        self.gone: str | None = None    # why the VM is gone, once it is

    # -- the VM -----------------------------------------------------------------
    async def boot(self, config: dict) -> None:
        from ..image import ensure_image
        from ..network.attach import attach
        from ..network.guard import network_entry, open_carriable
        from ..sandbox.sandbox import Sandbox, Share
        from ..vmm.host_cgroup import HostLimits

        self.memory_mib, cpus = pod_vm_size(config)
        # The pod's host cgroup: the first container's cgroupsPath (under CRI
        # the sandbox container's, <cgroup_parent>/<sandbox id>). A sandbox
        # container's resources are the pause process's (cpu shares 2), not
        # the pod's, whose limits kubelet puts on the cgroup parent: the VM's
        # RAM bounds its memory there. A lone container's (ctr run) are its own.
        linux = config.get("linux") or {}
        cgroups_path = linux.get("cgroupsPath") or None
        pause = (config.get("annotations") or {}).get("io.kubernetes.cri.container-type") in SANDBOX_TYPES
        limits = HostLimits() if pause else HostLimits.from_resources(linux.get("resources"))
        self.export = ContainerShare(self.run_dir / "share")
        _, path = network_entry(config)
        if path is not None:
            open_carriable(path).close()    # never the host's, nor one another VM carries
        self.network = await asyncio.to_thread(attach, path, self.run_dir / "network.json",
                                               config.get("hostname") or "")
        self.sandbox = Sandbox(ensure_image(progress=False), memory_mib=self.memory_mib, cpus=cpus,
                               run_dir=vm_dir(self.run_dir, self.id), shares=[Share(TAG, self.export.path)],
                               name=f"kata-py-pod-{self.id[:32]}", nics=self.network.nics,
                               host_cgroup=cgroups_path, host_limits=limits)
        await self.sandbox.start()
        # This shim serves the pod for its whole life: accounted with it, and
        # moved back out before the cgroup is removed when the VM ends.
        self.sandbox.adopt_host_process(os.getpid())
        await self.sandbox.agent.request("configure_network", self.network.request, timeout=60)
        self.network.release()
        asyncio.ensure_future(self._watch_vm())

    async def _watch_vm(self) -> None:
        code = await self.sandbox.machine.process.wait()
        if self.gone is None:
            self.gone = f"the pod's VM exited (QEMU status {code})"
            log.error("%s", self.gone)
            for task in self.tasks.values():
                for proc in [task.init, *task.execs.values()]:
                    if proc is not None and proc.status != "stopped":
                        proc.exited(128 + 9)    # they died with the VM, as if SIGKILLed
                        self.process_exited(proc)

    async def stop(self) -> None:
        """The VM, the network made for it, the export: all of it."""
        self.gone = self.gone or "the pod is shut down"
        for task in list(self.tasks.values()):
            self._forget(task)
        if self.sandbox is not None:
            try:
                await self.sandbox.stop()
            except Exception as exc:
                log.error("stopping the VM: %s", exc)
        if self.network is not None:
            try:
                await asyncio.to_thread(self.network.detach)
            except KataError as exc:
                log.error("network teardown: %s", exc)
        if self.export is not None:
            self.export.close()

    def require_vm(self) -> None:
        if self.gone is not None:
            raise PodError("failed", self.gone)

    # -- containers -----------------------------------------------------------------
    def task(self, container_id: str) -> Task:
        try:
            return self.tasks[container_id]
        except KeyError:
            raise PodError("not_found", f"container {container_id} does not exist") from None

    def sandbox_task(self) -> Task | None:
        return next((t for t in self.tasks.values() if t.is_sandbox), None) or next(iter(self.tasks.values()), None)

    async def create(self, request) -> Task:
        from ..oci.guest_spec import create_container_args
        from ..oci.process_spec import process_args, seccomp_args
        from ..oci.spec import load_bundle
        from ..sandbox.single import PlannedShare

        async with self.lock:
            if request.id in self.tasks:
                raise PodError("exists", f"container {request.id} already exists")
            bundle = Path(request.bundle)
            mounted = mount_rootfs(list(request.rootfs), bundle / "rootfs") if request.rootfs else []
            try:
                _, config, rootfs = load_bundle(str(bundle))
                if self.sandbox is None:
                    try:
                        await self.boot(config)
                    except BaseException:
                        await self.stop()   # what the boot made; the next create boots afresh
                        self.sandbox = self.network = self.export = None
                        self.gone = None
                        raise
                self.require_vm()
                self.numbers += 1
                task = Task(request.id, str(bundle), self.numbers, config)
                task.rootfs_mounts = mounted
                planned = PlannedShare(prefix=f"k{task.number}-")
                args = create_container_args(task.agent_id, config, str(bundle), planned,
                                             rootfs_entry=f"k{task.number}-rootfs")
                args["mount_tag"] = TAG
                args.update(seccomp_args(config))
                join = self._joins(config)
                if join:
                    args["join"] = join
                    args["namespaces"] = [ns for ns in args["namespaces"] if ns not in join]
                    if "uts" in join:
                        args.pop("hostname", None)
                self._check_size(config)
                self._export(task, rootfs, planned)
                process = config.get("process") or {}
                spec = process_args(process)
                init = Proc(task, "", spec, Stdio(request.stdin, request.stdout, request.stderr, request.terminal))
                task.init = init
                try:
                    await self.sandbox.agent.request("create_container", args)
                    await init.create(self, init=True)
                    init.guest_pid = await init.session.prepare()
                except BaseException:
                    init.stdio.close()
                    self._unexport(task)
                    raise
            except BaseException:
                unmount_all(mounted)
                raise
            self.tasks[task.id] = task
            init.watch(self)
            task.oom_watch = asyncio.ensure_future(self._watch_oom(task))
            return task

    def _joins(self, config: dict) -> dict:
        """Namespaces the spec names by path: the pod's sandbox container's."""
        sandbox = self.sandbox_task()
        join = {}
        for ns in (config.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") in JOINABLE and ns.get("path"):
                if sandbox is None:
                    raise PodError("invalid", f"namespace {ns['type']} path {ns['path']}: no container to join")
                join[ns["type"]] = sandbox.agent_id
        return join

    def _check_size(self, config: dict) -> None:
        from ..oci.process_spec import vm_mib_for

        limit = (((config.get("linux") or {}).get("resources") or {}).get("memory") or {}).get("limit")
        if isinstance(limit, int) and limit > 0:
            needed = vm_mib_for(limit)
            if needed > self.memory_mib:
                raise PodError("invalid", f"a memory limit of {limit} needs a {needed} MiB VM; this pod's VM "
                                          f"has {self.memory_mib} MiB")

    def _export(self, task: Task, rootfs, planned) -> None:
        name = f"k{task.number}-rootfs"
        self.export.add(str(rootfs), name=name)
        task.entries.append(name)
        try:
            for bind in planned.binds:
                self.export.add(bind["source"], readonly=bool(bind["readonly"]),
                                recursive=bool(bind["recursive"]), name=bind["name"])
                task.entries.append(bind["name"])
        except KataError:
            self._unexport(task)
            raise

    def _unexport(self, task: Task) -> None:
        for name in task.entries:
            self.export.remove(name)
        task.entries.clear()

    async def _watch_oom(self, task: Task) -> None:
        seen = 0
        while self.gone is None and task.id in self.tasks:
            try:
                result = await self.sandbox.agent.request("watch_oom", {"container_id": task.agent_id,
                                                                        "seen": seen}, timeout=None)
            except (KataError, OSError):
                return
            if result["oom_kill"] > seen:
                seen = result["oom_kill"]
                self.publish("/tasks/oom", "TaskOOM", container_id=task.id)
            if result["ended"]:
                return

    async def start(self, task: Task, exec_id: str) -> Proc:
        self.require_vm()
        proc = task.process(exec_id)
        if proc.status != "created":
            raise PodError("state", f"process {exec_id or task.id} is {proc.status}, not created")
        if not exec_id:
            await self.sandbox.agent.request("start_process", {"process_id": proc.process_id})
            proc.status = "running"
            self.publish("/tasks/start", "TaskStart", container_id=task.id, pid=os.getpid())
            return proc
        await proc.create(self, init=False)
        try:
            proc.guest_pid = await proc.session.start()
        except BaseException:
            proc.stdio.close()
            raise
        proc.status = "running"
        proc.watch(self)
        self.publish("/tasks/exec-started", "TaskExecStarted", container_id=task.id, exec_id=exec_id,
                     pid=os.getpid())
        return proc

    def add_exec(self, task: Task, exec_id: str, spec: dict, stdio: Stdio) -> None:
        self.require_vm()
        if exec_id in task.execs:
            raise PodError("exists", f"process {exec_id} already exists")
        if task.init.status != "running":
            raise PodError("state", f"container {task.id} is not running")
        task.execs[exec_id] = Proc(task, exec_id, spec, stdio)
        self.publish("/tasks/exec-added", "TaskExecAdded", container_id=task.id, exec_id=exec_id)

    def process_exited(self, proc: Proc) -> None:
        self.publish("/tasks/exit", "TaskExit", container_id=proc.task.id, id=proc.exec_id or proc.task.id,
                     pid=os.getpid(), exit_status=proc.exit_status, exited_at=proc.exited_at)

    async def kill(self, task: Task, exec_id: str, signum: int, all_processes: bool) -> None:
        proc = task.process(exec_id)
        if proc.status == "stopped":
            # containerd takes NotFound as "nothing left to kill" (as from runc's shim)
            raise PodError("not_found", "process already finished")
        self.require_vm()
        if task.paused:
            await self.resume(task)
        if all_processes and not exec_id and proc.status == "running":
            await self.sandbox.agent.request("signal_container", {"container_id": task.agent_id, "signal": signum})
        else:
            await self.sandbox.agent.request("signal_process", {"process_id": proc.process_id, "signal": signum})

    async def delete(self, task: Task, exec_id: str) -> Proc:
        proc = task.process(exec_id)
        if proc.status == "running":
            raise PodError("state", f"cannot delete a running process ({exec_id or task.id})")
        if exec_id:
            del task.execs[exec_id]
            proc.stdio.close()
            return proc
        if proc.status == "created":      # never started: end the held init
            if self.gone is None:
                await self.sandbox.agent.request("signal_process", {"process_id": proc.process_id, "signal": 9})
            await asyncio.wait_for(proc.done.wait(), 30)
        if self.gone is None:
            try:
                await self.sandbox.agent.request("delete_container", {"container_id": task.agent_id})
            except KataError as exc:
                log.warning("deleting %s in the guest: %s", task.id, exc)
        self._forget(task)
        self.publish("/tasks/delete", "TaskDelete", container_id=task.id, id=task.id, pid=os.getpid(),
                     exit_status=proc.exit_status or 0, exited_at=proc.exited_at)
        return proc

    def _forget(self, task: Task) -> None:
        self.tasks.pop(task.id, None)
        if task.oom_watch is not None:
            task.oom_watch.cancel()
        for proc in [task.init, *task.execs.values()]:
            if proc is not None:
                if proc.relay is not None and not proc.relay.done():
                    proc.relay.cancel()
                proc.stdio.close()
        if self.export is not None:
            self._unexport(task)
        unmount_all(task.rootfs_mounts)

    async def pause(self, task: Task) -> None:
        self.require_vm()
        await self.sandbox.machine.qmp.execute("stop")   # the whole VM: every container of the pod
        for each in self.tasks.values():
            each.paused = True
        self.publish("/tasks/paused", "TaskPaused", container_id=task.id)

    async def resume(self, task: Task) -> None:
        self.require_vm()
        await self.sandbox.machine.qmp.execute("cont")
        for each in self.tasks.values():
            each.paused = False
        self.publish("/tasks/resumed", "TaskResumed", container_id=task.id)

    def status_of(self, task: Task, proc: Proc) -> str:
        if proc.status == "running" and task.paused:
            return "paused"
        return proc.status
