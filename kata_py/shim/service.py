"""containerd's Task service (runtime/v2/task/shim.proto) over one Pod.

Each handler checks what containerd sent and delegates to the pod; the pod's
errors become ttrpc codes containerd acts on (NotFound for a process already
finished, which containerd's CRI takes as "already stopped";
FailedPrecondition for a wrong state; AlreadyExists).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from ..errors import KataError
from . import ttrpc
from .pod import Pod, PodError, Stdio
from .protos import Protos

log = logging.getLogger("kata_py.shim.service")

SERVICE = "containerd.task.v2.Task"
VERSION = "kata-py shim v2"
MAX_SPEC = 1 << 20
_CODES = {"not_found": ttrpc.NotFound, "exists": ttrpc.AlreadyExists, "state": ttrpc.FailedPrecondition,
          "invalid": ttrpc.InvalidArgument, "failed": ttrpc.Unknown}


def map_error(exc: Exception) -> ttrpc.RpcError | None:
    log.info("answering an error: %r", exc, exc_info=log.isEnabledFor(logging.DEBUG))
    if isinstance(exc, PodError):
        return _CODES.get(exc.kind, ttrpc.Unknown)(str(exc))
    if isinstance(exc, KataError):
        return ttrpc.Unknown(str(exc))
    return None


class TaskService:
    def __init__(self, protos: Protos, pod: Pod, on_shutdown) -> None:
        self.p = protos
        self.pod = pod
        self.on_shutdown = on_shutdown      # called once no container is left and Shutdown came
        self.shim = protos.shim
        self.empty = protos.message_class("google.protobuf.Empty")

    def methods(self) -> dict:
        s = self.shim
        table = {
            "State": (s.StateRequest, self.state), "Create": (s.CreateTaskRequest, self.create),
            "Start": (s.StartRequest, self.start), "Delete": (s.DeleteRequest, self.delete),
            "Pids": (s.PidsRequest, self.pids), "Pause": (s.PauseRequest, self.pause),
            "Resume": (s.ResumeRequest, self.resume), "Kill": (s.KillRequest, self.kill),
            "Exec": (s.ExecProcessRequest, self.exec), "ResizePty": (s.ResizePtyRequest, self.resize_pty),
            "CloseIO": (s.CloseIORequest, self.close_io), "Update": (s.UpdateTaskRequest, self.update),
            "Wait": (s.WaitRequest, self.wait), "Stats": (s.StatsRequest, self.stats),
            "Connect": (s.ConnectRequest, self.connect), "Shutdown": (s.ShutdownRequest, self.shutdown),
            "Checkpoint": (s.CheckpointTaskRequest, self.checkpoint),
        }
        return table

    # -- tasks ------------------------------------------------------------------------
    async def create(self, request, ctx):
        if request.checkpoint or request.parent_checkpoint:
            raise ttrpc.Unimplemented("checkpoint/restore is not supported")
        if not request.id or not os.path.isabs(request.bundle):
            raise ttrpc.InvalidArgument("create needs an id and an absolute bundle path")
        task = await self.pod.create(request)
        stdio = task.init.stdio
        event = dict(container_id=task.id, bundle=task.bundle, pid=os.getpid())
        self.pod.publish("/tasks/create", "TaskCreate", **event,
                         io=self.p.events.TaskIO(stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                                                 terminal=stdio.terminal))
        return self.shim.CreateTaskResponse(pid=os.getpid())

    async def start(self, request, ctx):
        task = self.pod.task(request.id)
        await self.pod.start(task, request.exec_id)
        return self.shim.StartResponse(pid=os.getpid())

    async def delete(self, request, ctx):
        task = self.pod.task(request.id)
        proc = await self.pod.delete(task, request.exec_id)
        reply = self.shim.DeleteResponse(pid=os.getpid(), exit_status=proc.exit_status or 0)
        if proc.exited_at:
            reply.exited_at.FromNanoseconds(proc.exited_at)
        return reply

    async def exec(self, request, ctx):
        from ..oci.exec_process import with_container_defaults
        from ..oci.process_spec import process_args

        task = self.pod.task(request.id)
        if not request.exec_id:
            raise ttrpc.InvalidArgument("exec needs an exec id")
        try:
            if len(request.spec.value) > MAX_SPEC:
                raise ValueError("larger than 1 MiB")
            process = json.loads(request.spec.value)
            # runc's rules: what the exec does not name it takes from the container's process
            spec = process_args(with_container_defaults(process, task.config.get("process") or {}))
        except (ValueError, KeyError, TypeError, KataError) as exc:
            raise ttrpc.InvalidArgument(f"exec {request.exec_id}: the process spec: {exc}") from exc
        self.pod.add_exec(task, request.exec_id, spec,
                          Stdio(request.stdin, request.stdout, request.stderr, request.terminal))
        return self.empty()

    async def resize_pty(self, request, ctx):
        proc = self.pod.task(request.id).process(request.exec_id)
        proc.rows, proc.cols = request.height, request.width
        if proc.session is not None and proc.status == "running" and proc.stdio.terminal:
            await proc.session.resize(request.height, request.width)
        return self.empty()

    async def close_io(self, request, ctx):
        proc = self.pod.task(request.id).process(request.exec_id)
        if request.stdin and proc.session is not None:
            stream = proc.session.connections.get("stdin")
            if stream is not None:
                writer = stream[1]
                if writer.can_write_eof():
                    writer.write_eof()
        return self.empty()

    async def state(self, request, ctx):
        task = self.pod.task(request.id)
        proc = task.process(request.exec_id)
        status = self.pod.status_of(task, proc)
        reply = self.shim.StateResponse(
            id=request.id, bundle=task.bundle, pid=os.getpid(), exec_id=request.exec_id,
            status=getattr(self.p.task_types, status.upper()), stdin=proc.stdio.stdin, stdout=proc.stdio.stdout,
            stderr=proc.stdio.stderr, terminal=proc.stdio.terminal, exit_status=proc.exit_status or 0)
        if proc.exited_at:
            reply.exited_at.FromNanoseconds(proc.exited_at)
        return reply

    async def pids(self, request, ctx):
        task = self.pod.task(request.id)
        self.pod.require_vm()
        reply = await self.pod.sandbox.agent.request("list_processes", {"container_id": task.agent_id})
        return self.shim.PidsResponse(processes=[self.p.task_types.ProcessInfo(pid=p["pid"])
                                                 for p in reply["processes"]])

    async def pause(self, request, ctx):
        await self.pod.pause(self.pod.task(request.id))
        return self.empty()

    async def resume(self, request, ctx):
        await self.pod.resume(self.pod.task(request.id))
        return self.empty()

    async def kill(self, request, ctx):
        if not 0 <= request.signal <= 64:
            raise ttrpc.InvalidArgument(f"invalid signal {request.signal}")
        await self.pod.kill(self.pod.task(request.id), request.exec_id, request.signal, request.all)
        return self.empty()

    async def update(self, request, ctx):
        task = self.pod.task(request.id)
        try:
            resources = json.loads(request.resources.value or b"{}")
        except ValueError as exc:
            raise ttrpc.InvalidArgument(f"update: resources: {exc}") from exc
        self.pod.require_vm()
        self.pod._check_size({"linux": {"resources": resources}})
        await self.pod.sandbox.agent.request("update_container", {"container_id": task.agent_id,
                                                                  "resources": resources})
        return self.empty()

    async def wait(self, request, ctx):
        proc = self.pod.task(request.id).process(request.exec_id)
        await proc.done.wait()
        reply = self.shim.WaitResponse(exit_status=proc.exit_status or 0)
        reply.exited_at.FromNanoseconds(proc.exited_at)
        return reply

    async def stats(self, request, ctx):
        task = self.pod.task(request.id)
        self.pod.require_vm()
        stats = await self.pod.sandbox.agent.request("container_stats", {"container_id": task.agent_id})
        v2 = self.p.cgroups_v2
        metrics = v2.Metrics()
        cpu, memory, pids = stats["cpu"], stats["memory"], stats["pids"]
        metrics.cpu.usage_usec = cpu.get("usage_usec", 0)
        metrics.cpu.user_usec = cpu.get("user_usec", 0)
        metrics.cpu.system_usec = cpu.get("system_usec", 0)
        metrics.memory.usage = memory.get("usage", 0)
        limit = memory.get("limit")
        metrics.memory.usage_limit = limit if isinstance(limit, int) else self.pod.memory_mib << 20
        metrics.memory.swap_usage = memory.get("swap_usage", 0)
        metrics.memory.anon = memory.get("anon", 0)
        metrics.memory.file = memory.get("file", 0)
        metrics.memory_events.oom = memory.get("oom", 0)
        metrics.memory_events.oom_kill = memory.get("oom_kill", 0)
        metrics.pids.current = pids.get("current", 0)
        if isinstance(pids.get("limit"), int):
            metrics.pids.limit = pids["limit"]
        return self.shim.StatsResponse(stats=self.p.pack_any(metrics))

    async def connect(self, request, ctx):
        return self.shim.ConnectResponse(shim_pid=os.getpid(), task_pid=os.getpid(), version=VERSION)

    async def shutdown(self, request, ctx):
        if self.pod.tasks and not request.now:
            return self.empty()         # containers remain: the shim stays
        asyncio.get_running_loop().call_soon(self.on_shutdown)
        return self.empty()

    async def checkpoint(self, request, ctx):
        raise ttrpc.Unimplemented("checkpoint is not supported by kata-py")

