"""The container's host monitor process.

`create` starts it; its pid is the container's pid (the one in --pid-file).
It owns the sandbox VM for the container's whole life, relays the init
process's stdio (the stdio it inherited from `create`, or a console socket
pty), and exits with the container's exit status (128+N when killed by
signal N) once the VM is torn down, so that a subreaper (containerd's shim,
conmon) reaps the right status.

It reports to `create` over a status pipe: one line "ok <json>" once the
container is created (held before exec), or "error <message>".
In exec mode it does the same for one process of a running container.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import KataError
from ..timing import mark
from .state import Status, StateStore

log = logging.getLogger("kata_py.monitor")


class StatusPipe:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, kind: str, payload) -> None:
        if self.fd < 0:
            return
        line = f"{kind} {json.dumps(payload)}\n".encode()
        try:
            os.write(self.fd, line)
        finally:
            os.close(self.fd)
            self.fd = -1


def _stdio_fds(console) -> dict:
    if console is not None:
        return {"stdin_fd": console.slave, "stdout_fd": console.slave, "stderr_fd": None, "tty": True}
    return {"stdin_fd": 0, "stdout_fd": 1, "stderr_fd": 2}


async def run_container(args, report: StatusPipe, loaded, claimed=None) -> int:
    from ..image import ensure_image
    from ..network import attach_container, configure_guest, detach_container
    from ..sandbox.handle import SandboxHandle
    from ..sandbox.process import ProcessSession
    from ..sandbox.sandbox import Sandbox, Share
    from ..sandbox.share import ContainerShare, remove_share_dir
    from .console import HostConsole
    from .guest_spec import create_container_args
    from .hooks import run_guest_hooks
    from .process_spec import agent_container_id, process_args, seccomp_args, vm_size
    from .share import ROOTFS_ENTRY, sandbox_dir_for, share_dir_for

    store = StateStore(args.root)
    state, (bundle, config, rootfs) = loaded
    process = config["process"]
    memory, cpus = vm_size(config)
    console = HostConsole() if process.get("terminal") else None
    # A pooled VM's export is its standby's, already in this mount namespace.
    share = ContainerShare(claimed.share_dir if claimed else share_dir_for(args.root, args.id),
                           existing=claimed is not None)
    sandbox: SandboxHandle | None = None
    network = None
    try:
        share.add(str(rootfs), name=ROOTFS_ENTRY, exist_ok=True)
        cid = agent_container_id(args.id)
        create_args = create_container_args(cid, config, str(bundle), share, no_pivot=state.no_pivot)
        if claimed is not None:
            from ..sandbox.pool import PooledSandbox
            sandbox = PooledSandbox(claimed)
            await sandbox.start()
        else:
            network = await attach_container(config, store.dir(args.id))
            sandbox = Sandbox(ensure_image(progress=False), memory_mib=memory, cpus=cpus,
                              run_dir=sandbox_dir_for(args.root, args.id),
                              shares=[Share("rootfs", share.path)], qmp_socket=True,
                              name=f"kata-py-{args.id[:40]}", nics=network.nics)
            await sandbox.start()
            await configure_guest(network, sandbox.agent)
        await sandbox.agent.request("create_container", {**create_args, **seccomp_args(config)})
        spec = process_args(process)
        if console is not None:
            console.send_master(args.console_socket)
            rows, cols = console.size()
            spec.setdefault("rows", rows)
            spec.setdefault("cols", cols)
        session = ProcessSession(sandbox, spec["argv"], env=spec["env"], cwd=spec["cwd"], user=spec["user"],
                                 security=spec["security"],
                                 rows=spec.get("rows", 0), cols=spec.get("cols", 0), container_id=cid, init=True,
                                 process_id="init", **_stdio_fds(console))
        await session.create()
        guest_pid = await session.prepare()
        # The container's namespaces exist now (its init waits at the barrier).
        hook_state = dict(state.oci_state(), status=Status.CREATING.value, pid=os.getpid())
        await run_guest_hooks(sandbox, args.id, "createContainer",
                              config.get("hooks", {}).get("createContainer", []), hook_state)
        report.send("ok", {"run_dir": str(sandbox.run_dir), "vsock": sandbox.transport.address(),
                           "init_process": session.process_id, "guest_pid": guest_pid})
        if console is not None:
            console.attach_session(session)
        session.forward_signals()
        status = await session.relay_and_wait()
    finally:
        # Cleaned up before main() reports a failure: `create` kills this
        # process as soon as it reads the report.
        if sandbox is not None:
            await sandbox.stop()
        elif claimed is not None:
            claimed.release()
        if network is not None:
            await detach_container(network)
        if claimed is None:
            remove_share_dir(share.path)  # a standby removes its own
    _record_exit(store, args.id, status)
    return status


def _detach_stdio() -> None:
    """With a terminal the container's stdio is the pty: this process keeps
    none of its caller's. containerd's runc shim reads `create`'s (and `exec
    --detach`'s) output through a pipe until end of file, so holding that pipe
    for the container's life would hang the shim (`docker run -it`). runc's
    init, too, holds only the pty."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _wait_for_go(fd: int) -> None:
    """`create` says go once the prestart hooks ran; end of file means they
    failed (or create died): there is nothing to build."""
    with os.fdopen(fd, "rb") as pipe:
        word = pipe.readline(16)
    if word != b"go\n":
        raise KataError("create did not finish its prestart hooks")


def _load(args):
    """The container's state and bundle; `create` has validated the bundle."""
    from .spec import load_bundle

    state = StateStore(args.root).load(args.id)
    return state, load_bundle(state.bundle, validate=False)


def _pool_size(config: dict) -> tuple[int, int] | None:
    """(memory MiB, vCPUs) to claim for this container, or None when it must
    boot its own VM: a pooled VM has no NIC (microvm cannot hot-plug one)."""
    from ..network.guard import network_entry
    from .process_spec import vm_size

    present, path = network_entry(config)
    if path is not None:
        return None
    hooks = config.get("hooks") or {}
    if present and (hooks.get("prestart") or hooks.get("createRuntime")):
        return None     # a hook may put interfaces into the new namespace (Docker's does)
    return vm_size(config)


def _claim_pooled_vm(config: dict):
    """A VM from the factory's pool when one runs and fits, else None (boot one)."""
    from ..sandbox.pool import claim

    size = _pool_size(config)
    claimed = claim(*size) if size else None
    if claimed is not None:
        log.info("using pooled VM of standby %d", claimed.pid)
        mark("vm_claimed")
    return claimed


def _record_exit(store: StateStore, container_id: str, status: int) -> None:
    # Not waiting for the lock: its holder may be `delete`, which waits for
    # this process to exit (a blocking lock here would stall it until it kills
    # us). Skipping the record loses nothing the status needs: a container
    # whose monitor is gone reads as stopped anyway.
    try:
        with store.lock(container_id, wait=False):
            state = store.load(container_id)
            state.status = Status.STOPPED.value
            state.exit_status = status
            store.save(state)
    except KataError as exc:  # deleted or being deleted: nothing left to record
        log.debug("recording exit: %s", exc)


async def run_exec(args, report: StatusPipe) -> int:
    """One more process in a running container (`exec --detach`)."""
    from .exec_process import exec_in_container

    spec = json.loads(Path(args.process_json).read_text())
    os.unlink(args.process_json)
    return await exec_in_container(StateStore(args.root), args.id, spec, args.console_socket, report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kata-py-monitor")
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--console-socket")
    parser.add_argument("--log")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--exec-process-json", dest="process_json")
    parser.add_argument("--go-fd", type=int, default=-1,
                        help="wait for 'go' on this fd first (create runs the prestart hooks meanwhile)")
    args = parser.parse_args(argv)
    if args.log and args.log_format == "json":
        # The shim reads this file as JSON lines (its last error is the runtime's).
        from ..logformat import JsonFormatter

        handler = logging.FileHandler(args.log)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(handlers=[handler], level=logging.INFO)
    elif args.log:
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s monitor %(levelname)s %(message)s")
    else:
        # Never Python's last-resort stderr handler: this process's stderr is
        # the container's, and `create` reports the error itself.
        logging.basicConfig(handlers=[logging.NullHandler()])
    if args.console_socket:
        _detach_stdio()
    report = StatusPipe(args.status_fd)
    mark("monitor_started")
    try:
        if args.process_json:
            status = asyncio.run(run_exec(args, report))
        else:
            if args.go_fd >= 0:
                _wait_for_go(args.go_fd)
            # Before any thread exists: the container's share mounts live and die
            # with this process and its QEMU (see sandbox/share.py), or with the
            # standby of a pooled VM, whose mount namespace this joins.
            loaded = _load(args)
            claimed = _claim_pooled_vm(loaded[1][1])
            if claimed is not None:
                claimed.enter_mount_namespace()
            else:
                from ..sandbox.share import enter_private_mount_namespace
                enter_private_mount_namespace()
            status = asyncio.run(run_container(args, report, loaded, claimed))
    except KataError as exc:
        log.error("%s", exc)
        report.send("error", str(exc))
        sys.exit(1)
    except BaseException as exc:
        log.exception("monitor failed")
        report.send("error", repr(exc))
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    main()
