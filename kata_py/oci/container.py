"""Container operations behind the OCI CLI: one function per operation.

Each takes the state store and an id, holds the container's lock while it
changes anything, and leaves nothing behind when it fails.
"""

from __future__ import annotations

import json
import os
import pwd
import signal as signal_module
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError, KataError
from ..sandbox import record as sandbox_record
from ..sandbox.guest_hooks import run_guest_hooks
from ..sandbox.single import Launch, PlannedShare
from . import forked
from .hooks import run_hooks
from .process_spec import agent_container_id, vm_size
from .share import owner_dir_for, sandbox_dir_for, sandbox_id_for
from .spec import load_bundle
from .state import (ContainerNotFound, ContainerState, StateStore, Status, process_start_time,
                    validate_id)

CREATE_TIMEOUT = 600.0      # a first create may build the guest image
OWNER_EXIT_TIMEOUT = 15.0
UNREACHABLE_EXIT_TIMEOUT = 3.0   # delete --force: the agent did not take the SIGKILL


def _owner_argv(store: StateStore, container_id: str, launch_file: str, size: tuple[int, int], pool: bool,
                status_fd: int, go_fd: int, log_file: str | None, log_format: str, exit_fd: int = -1) -> list[str]:
    """The container's sandbox owner (kata_py.sandbox.owner, one container's sandbox)."""
    memory, cpus = size
    argv = [sys.executable, "-m", "kata_py.sandbox.owner", "--id", sandbox_id_for(str(store.root), container_id),
            "--memory-mib", str(memory), "--cpus", str(cpus), "--container", launch_file,
            "--status-fd", str(status_fd)]
    if go_fd >= 0:
        argv += ["--go-fd", str(go_fd)]
    if exit_fd >= 0:
        argv += ["--exit-fd", str(exit_fd)]
    if pool:
        argv.append("--pool")
    if log_file:
        argv += ["--log", log_file, "--log-format", log_format]
    return argv


def _relay_argv(job_file: str, status_fd: int, console_socket: str | None, log_file: str | None,
                log_format: str) -> list[str]:
    """An `exec --detach` relay (kata_py.sandbox.relay)."""
    argv = [sys.executable, "-m", "kata_py.sandbox.relay", "--exec", job_file, "--status-fd", str(status_fd)]
    if console_socket:
        argv += ["--console-socket", console_socket]
    if log_file:
        argv += ["--log", log_file, "--log-format", log_format]
    return argv


def spawn_reporting(argv_for, timeout: float = CREATE_TIMEOUT, preexec_fn=None,
                    prepare=None, pass_fds: tuple = ()) -> tuple[subprocess.Popen | forked.ForkedChild, dict]:
    """Start a sandbox owner or exec relay (forked: kata_py.oci.forked) and
    wait for its one-line report; (process, payload).

    With `prepare`, the process waits before it does anything until
    prepare(process) has returned (the prestart hooks, which must see the
    owner's pid and network namespace before the VM's network is read);
    if prepare raises, the process is ended and the error goes on."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    go_read, go_write = os.pipe2(os.O_CLOEXEC) if prepare else (-1, -1)
    try:
        proc = forked.start(argv_for(write_fd, go_read), tuple(fd for fd in (write_fd, go_read, *pass_fds) if fd >= 0),
                            preexec_fn=preexec_fn)
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(read_fd)
        if go_write >= 0:
            os.close(go_write)
        raise KataError(f"cannot start the sandbox owner: {getattr(exc, 'strerror', None) or exc}") from exc
    finally:
        os.close(write_fd)
        if go_read >= 0:
            os.close(go_read)
    if prepare is not None:
        try:
            prepare(proc)
            os.write(go_write, b"go\n")
        except BaseException:
            os.close(read_fd)
            _stop(proc)
            raise
        finally:
            os.close(go_write)
    try:
        line = _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)
    kind, _, payload = line.partition(" ")
    if kind == "ok":
        return proc, json.loads(payload)
    _stop(proc)
    message = json.loads(payload) if kind == "error" and payload else "the sandbox owner exited without a report"
    raise KataError(message)


def _read_line(fd: int, timeout: float | None, limit: int = 1 << 20) -> str:
    """The first line the owner writes to a pipe (at most `limit` bytes read);
    with `timeout` None, however long that takes."""
    import select

    deadline = None if timeout is None else time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "error " + json.dumps(f"the sandbox owner did not report within {timeout:.0f} s")
        chunk = os.read(fd, min(65536, limit))
        if not chunk:
            break
        data += chunk
        if len(data) >= limit:
            break
    return data.decode(errors="replace").split("\n", 1)[0]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _write_pid_file(path: str, pid: int) -> None:
    target = Path(path).resolve()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".kata-py-pid")
    with os.fdopen(fd, "w") as f:
        f.write(str(pid))
    os.replace(tmp, target)


def _owner() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def create(store: StateStore, container_id: str, bundle: str, pid_file: str | None = None,
           console_socket: str | None = None, log_file: str | None = None,
           no_pivot: bool = False, log_format: str = "text", exit_fd: int = -1) -> subprocess.Popen:
    """Create the container; its owner process. With `exit_fd` (the write end
    of a pipe), the owner reports there "exit N" when the init exits, before
    it tears the VM down (`run`: wait_exit_report)."""
    validate_id(container_id)
    bundle_dir, config, rootfs = load_bundle(bundle)
    process = config.get("process")
    if process is None:
        raise ConfigError("config.json /process: required to create a container")
    if process.get("terminal") and not console_socket:
        raise ConfigError("config.json /process/terminal is true: --console-socket is required")
    if console_socket and not process.get("terminal"):
        raise ConfigError("--console-socket needs config.json /process/terminal to be true")
    from ..network import monitor_namespace

    placement = monitor_namespace(config)
    try:
        return _create(store, container_id, bundle_dir, config, rootfs, placement, pid_file, console_socket,
                       log_file, log_format, no_pivot, exit_fd)
    finally:
        if placement is not None:
            placement.close()


def _plan(store: StateStore, state: ContainerState, config: dict, rootfs, console_socket: str | None) -> Launch:
    """What the owner builds in the guest, computed here from the bundle
    (so that a bad spec fails before any process starts)."""
    from ..vmm.host_cgroup import cgroup_path
    from .guest_spec import create_container_args
    from .process_spec import process_args, seccomp_args

    agent_id = agent_container_id(state.id)
    planned = PlannedShare()
    create_args = create_container_args(agent_id, config, state.bundle, planned, no_pivot=state.no_pivot)
    linux = config.get("linux") or {}
    cgroups_path = linux.get("cgroupsPath") or None
    if cgroups_path is not None:
        cgroup_path(cgroups_path)   # ConfigError now, before any process starts
    return Launch(agent_id=agent_id, create={**create_args, **seccomp_args(config)},
                  process=process_args(config["process"]), rootfs=str(rootfs), binds=planned.binds,
                  terminal=state.terminal, console_socket=console_socket,
                  hooks=list(state.config_hooks.get("createContainer") or []),
                  hook_state=dict(state.oci_state(), status=Status.CREATING.value),
                  network_config=config, state_dir=str(store.dir(state.id)), name=f"kata-py-{state.id[:40]}",
                  cgroups_path=cgroups_path, host_resources=linux.get("resources") or {})


def _poolable(config: dict) -> bool:
    """Whether this container may take a pooled VM, or must boot its own: a
    pooled VM has no NIC (microvm cannot hot-plug one)."""
    from ..network.guard import network_entry

    present, path = network_entry(config)
    if path is not None:
        return False
    if (config.get("linux") or {}).get("cgroupsPath"):
        # A pooled VM's QEMU is its standby's, in a cgroup of its own: it
        # cannot be moved into the one the spec names.
        return False
    hooks = config.get("hooks") or {}
    # A hook may put interfaces into the new namespace (Docker's does).
    return not (present and (hooks.get("prestart") or hooks.get("createRuntime")))


def _create(store: StateStore, container_id: str, bundle_dir, config: dict, rootfs, placement,
            pid_file: str | None, console_socket: str | None, log_file: str | None, log_format: str,
            no_pivot: bool, exit_fd: int = -1) -> subprocess.Popen:
    process = config["process"]
    with store.lock(container_id, create=True):
        state = ContainerState(id=container_id, bundle=str(bundle_dir), rootfs=str(rootfs), owner=_owner(),
                               annotations=config.get("annotations", {}), terminal=bool(process.get("terminal")),
                               config_hooks=config.get("hooks", {}), no_pivot=no_pivot)
        proc = None
        hooks = state.config_hooks
        def prestart(owner: subprocess.Popen) -> None:
            # runc's order: the namespaces exist (the owner's network namespace
            # is the container's), the process has not started, and the hooks
            # run in the runtime's namespaces with the owner's pid. A hook may
            # put interfaces into /proc/PID/ns/net (Docker's does): the owner
            # reads the namespace only after this.
            hook_state = dict(state.oci_state(), status=Status.CREATED.value, pid=owner.pid)
            run_hooks("prestart", hooks.get("prestart", []), hook_state)
            run_hooks("createRuntime", hooks.get("createRuntime", []), hook_state)

        has_hooks = bool(hooks.get("prestart") or hooks.get("createRuntime"))
        try:
            launch = _plan(store, state, config, rootfs, console_socket)
            store.save(state)
            launch_file = str(store.dir(container_id) / "launch.json")
            launch.write(launch_file)
            size, pool = vm_size(config), _poolable(config)
            proc, report = spawn_reporting(
                lambda fd, go_fd: _owner_argv(store, container_id, launch_file, size, pool, fd, go_fd, log_file,
                                              log_format, exit_fd),
                preexec_fn=placement.enter if placement is not None else None,
                prepare=prestart if has_hooks else None, pass_fds=(exit_fd,))
            state.pid = proc.pid
            state.pid_start_time = process_start_time(proc.pid)
            state.run_dir = report["run_dir"]
            state.vsock = report["vsock"]
            state.init_process = report["init_process"]
            state.status = Status.CREATED.value
            store.save(state)
            if pid_file:
                _write_pid_file(pid_file, proc.pid)
        except BaseException:
            if proc is not None:
                # The owner reported a VM but create cannot finish (a full
                # disk, a pid file it cannot write): end it, and what a
                # SIGKILLed owner cannot remove itself (its QEMU and back end
                # go with it).
                _stop(proc)
            _remove_sandbox_leftovers(store, container_id)
            _undo_network(store, container_id)
            store.remove(container_id)
            raise
    return proc


def start(store: StateStore, container_id: str) -> None:
    with store.locked(container_id) as state:
        state.require("start", Status.can_start)
        state.status = Status.RUNNING.value
        commit = store.prepare(state)  # before the process is released: see prepare()
        if state.config_hooks.get("startContainer"):
            import asyncio

            asyncio.run(_start(state))
        else:
            _agent_call(state, "start_process", {"process_id": state.init_process})
        commit()
    run_hooks("poststart", state.config_hooks.get("poststart", []), state.oci_state(), fatal=False)


async def _start(state: ContainerState) -> None:
    """start with startContainer hooks, which run in the guest (asyncio)."""
    from .exec_process import connect

    handle = await connect(state)
    try:
        hooks = state.config_hooks.get("startContainer", [])
        if hooks:
            try:
                # The state as the hook must see it: still created (the record
                # already says running, written ahead of the release).
                await run_guest_hooks(handle, agent_container_id(state.id), "startContainer", hooks,
                                      dict(state.oci_state(), status=Status.CREATED.value))
            except KataError:
                # The spec: a failing startContainer hook stops the container.
                await handle.agent.request("signal_process", {"process_id": state.init_process, "signal": 9})
                raise
        await handle.agent.request("start_process", {"process_id": state.init_process})
    finally:
        await handle.stop()


def _agent_call(state: ContainerState, request: str, args: dict, timeout: float = 30.0) -> dict:
    """One request to the container's agent. Blocking, without asyncio: the
    short commands (kill, start, ps, ...) would spend as much CPU importing
    asyncio as on everything else."""
    from ..errors import VsockError
    from ..sandbox import agent_sync

    try:
        transport = agent_sync.transport_of(state.vsock, state.run_dir)
        return agent_sync.request(transport, request, args, timeout=timeout)
    except (VsockError, OSError) as exc:
        raise KataError(f"container {state.id!r}: cannot reach its VM's agent: {exc}") from None


def parse_signal(text: str) -> int:
    text = text.strip().upper()
    if text.isdigit():
        number = int(text)
        if 1 <= number <= 64:
            return number
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        try:
            return int(getattr(signal_module.Signals, name))
        except AttributeError:
            pass
    raise ConfigError(f"invalid signal {text!r}")


def kill(store: StateStore, container_id: str, signum: int, all_processes: bool = False) -> None:
    state = store.load(container_id)
    if all_processes and state.live_status() is Status.STOPPED:
        # As runc: nothing is left to signal, which is what --all asked for.
        # containerd's CRI sends `kill --all ID 9` after every exit and only
        # records the exit once that succeeds.
        return
    status = state.require("kill", Status.can_kill)
    if status is Status.PAUSED:
        # A paused VM cannot deliver a signal; let it run for that (runc, too,
        # delivers a SIGKILL to a frozen container once thawed).
        resume_vm(state)
    if all_processes and status is not Status.CREATED:
        _agent_call(state, "signal_container", {"container_id": agent_container_id(container_id),
                                                "signal": signum})
    else:
        _agent_call(state, "signal_process", {"process_id": state.init_process, "signal": signum})


def update(store: StateStore, container_id: str, resources: dict) -> None:
    """Change the container's cgroup limits in the guest. The VM's memory is
    fixed at boot: a limit beyond it is refused rather than silently unmet."""
    from .process_spec import vm_mib_for

    with store.locked(container_id) as state:
        state.require("update", lambda status: status in (Status.CREATED, Status.RUNNING, Status.PAUSED))
        limit = (resources.get("memory") or {}).get("limit")
        if isinstance(limit, int) and limit > 0:
            booted_mib, _ = vm_size(load_bundle(state.bundle, validate=False)[1])
            needed = vm_mib_for(limit)
            if needed > booted_mib:
                raise ConfigError(f"update: a memory limit of {limit} needs a {needed} MiB VM; this container's "
                                  f"VM has {booted_mib} MiB (sized at create): recreate it with the larger limit")
        _agent_call(state, "update_container", {"container_id": agent_container_id(container_id),
                                                "resources": resources})


def stats(store: StateStore, container_id: str) -> dict:
    state = store.load(container_id)
    state.require("read stats of", lambda status: status in (Status.CREATED, Status.RUNNING))
    return _agent_call(state, "container_stats", {"container_id": agent_container_id(container_id)})


def processes(store: StateStore, container_id: str) -> list[dict]:
    state = store.load(container_id)
    if state.live_status() is Status.STOPPED:
        return []       # as runc: a stopped container has no processes, which is no error
    state.require("list processes of", lambda status: status in (Status.RUNNING, Status.PAUSED, Status.CREATED))
    reply = _agent_call(state, "list_processes", {"container_id": agent_container_id(container_id)})
    return reply["processes"]


def _wait_owner_exit(state: ContainerState, timeout: float) -> bool:
    from .state import pid_alive

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(state.pid, state.pid_start_time):
            return True
        time.sleep(0.05)
    return False


def delete(store: StateStore, container_id: str, force: bool = False) -> None:
    try:
        _delete(store, container_id, force)
    except ContainerNotFound:
        # As runc: a directory left by an aborted create goes; and with --force
        # a container that is already gone is not an error (containerd's shim
        # cleans up with `delete --force` after the fact).
        _undo_network(store, container_id)
        store.remove(container_id)
        if not force:
            raise


def wait_exit_report(fd: int) -> int | None:
    """The init's exit status from the owner's exit pipe (create's `exit_fd`),
    once it has exited; None when the owner ended without one (its VM died,
    it was killed): then only its own exit says how it ended."""
    kind, _, payload = _read_line(fd, None, limit=64).partition(" ")
    if kind != "exit":
        return None
    try:
        status = json.loads(payload)
    except ValueError:
        return None
    return status if isinstance(status, int) and not isinstance(status, bool) and status >= 0 else None


def mark_exited(store: StateStore, container_id: str) -> None:
    """The init has exited while its owner still tears the VM down: the
    container is stopped from now on (state, and delete, which waits for the
    owner to finish, as it always does, rather than signal a VM that is going)."""
    with store.locked(container_id) as state:
        if state.status != Status.STOPPED.value:
            state.status = Status.STOPPED.value
            store.save(state)


def delete_after_teardown(store: StateStore, container_id: str) -> None:
    """`run`'s delete of a container that has exited, in a child of this
    process, so that `run` returns the exit status while the owner tears the
    VM down: the child waits for the owner to exit (as `delete` does),
    removes the container, and exits; nothing of the sandbox outlives the
    owner. The child holds none of the caller's stdio, so a caller reading
    `run`'s output sees its end as `run` exits."""
    import logging

    if os.fork():
        return
    status = 1
    try:
        os.setsid()     # a terminal's signals are for what the caller runs next
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        delete(store, container_id, force=True)
        status = 0
    except BaseException:
        logging.getLogger("kata_py.cli").exception("deleting %s after its run", container_id)
    finally:
        os._exit(status)


def _delete(store: StateStore, container_id: str, force: bool) -> None:
    with store.locked(container_id) as state:
        status = state.require("delete", lambda status: force or status.can_delete())
        exit_timeout = OWNER_EXIT_TIMEOUT
        if status is not Status.STOPPED:
            try:
                if status is Status.PAUSED:
                    resume_vm(state)
                _agent_call(state, "signal_process", {"process_id": state.init_process, "signal": 9}, timeout=10)
            except KataError:
                # The VM is going, gone or hung: an owner whose VM is going
                # exits at once; one whose guest hangs never will.
                exit_timeout = UNREACHABLE_EXIT_TIMEOUT
        if not _wait_owner_exit(state, exit_timeout) and state.pid:
            try:
                os.kill(state.pid, signal_module.SIGKILL)  # QEMU dies with it (PDEATHSIG)
            except ProcessLookupError:
                pass
            _wait_owner_exit(state, 5.0)
        _remove_sandbox_leftovers(store, container_id)
        _undo_network(store, container_id)
        store.remove(container_id)
    run_hooks("poststop", state.config_hooks.get("poststop", []), dict(state.oci_state(), status="stopped"),
              fatal=False)


def _remove_sandbox_leftovers(store: StateStore, container_id: str) -> None:
    """What an owner killed before it could clean up (or even report) left:
    its run directory and export, its VM's run directory and host cgroups,
    found by (root, id). Its QEMU died with it (PDEATHSIG), its binds with
    its mount namespace. (A pooled VM's run directory is its standby's.)"""
    from ..vmm.host_cgroup import remove_vm_run_dir

    sandbox_record.remove_leftovers(owner_dir_for(str(store.root), container_id))
    remove_vm_run_dir(sandbox_dir_for(str(store.root), container_id))


def _undo_network(store: StateStore, container_id: str) -> None:
    """What the owner made in the container's network namespace, if it
    could not remove it itself (killed): its record is in the state dir."""
    from ..network import RECORD_NAME, detach_container_recorded

    if (store.dir(container_id) / RECORD_NAME).exists():
        detach_container_recorded(store.dir(container_id))


def _qmp(state: ContainerState, command: str) -> None:
    import asyncio

    from qemu.qmp import QMPClient

    async def go():
        client = QMPClient(f"kata-py-{state.id[:40]}")
        try:
            await asyncio.wait_for(client.connect(str(Path(state.run_dir) / "qmp.sock")), 10)
            await asyncio.wait_for(client.execute(command), 10)
        finally:
            await client.disconnect()
    try:
        asyncio.run(go())
    except (OSError, asyncio.TimeoutError, Exception) as exc:
        raise KataError(f"container {state.id!r}: QMP {command} failed: {exc}") from None


def resume_vm(state: ContainerState) -> None:
    _qmp(state, "cont")


def pause(store: StateStore, container_id: str) -> None:
    with store.locked(container_id) as state:
        state.require("pause", Status.can_pause)
        state.status = Status.PAUSED.value
        commit = store.prepare(state)
        _qmp(state, "stop")  # the whole VM stops: the container is frozen with it
        commit()


def resume(store: StateStore, container_id: str) -> None:
    with store.locked(container_id) as state:
        state.require("resume", Status.can_resume)
        state.status = Status.RUNNING.value
        commit = store.prepare(state)
        resume_vm(state)
        commit()


def exec_detached(store: StateStore, container_id: str, spec: dict, pid_file: str | None,
                  console_socket: str | None, log_file: str | None, log_format: str = "text") -> int:
    from .process_spec import process_args

    state = store.load(container_id)
    state.require("exec in", Status.can_exec)
    job = {"vsock": state.vsock, "run_dir": state.run_dir, "agent_id": agent_container_id(container_id),
           "process": process_args(spec), "terminal": bool(spec.get("terminal"))}
    fd, job_file = tempfile.mkstemp(dir=store.dir(container_id), prefix="exec-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    try:
        proc, _ = spawn_reporting(lambda wfd, _go: _relay_argv(job_file, wfd, console_socket, log_file, log_format),
                                timeout=60)
    finally:
        if os.path.exists(job_file):
            os.unlink(job_file)
    if pid_file:
        _write_pid_file(pid_file, proc.pid)
    return proc.pid
