"""A standby: one pooled VM, booted idle, handed to exactly one container monitor.

It boots the VM as a container monitor would (in a mount namespace of its
own, with the container share exported empty), tells the factory it is ready
(one "ready <json>" line on stdout), and waits on its socket. The first
monitor that claims it gets the VM's sockets and the share's place; the
standby then stops listening, so no second container can have this VM. It
ends the VM when the claiming connection closes — the monitor is done, or
dead — or when the VM ends, or on SIGTERM while idle (`factory stop`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .. import hostsys
from ..sandbox.pool_wire import WireError, encode, read_message

log = logging.getLogger("kata_py.factory.standby")
CLAIM_TIMEOUT = 10.0


def _outlive_the_factory() -> None:
    # Idle, a standby dies with the factory (PDEATHSIG, set by the factory at
    # spawn); claimed, it serves a container and must not.
    hostsys.set_parent_death_signal(0)


async def serve(directory: Path, memory: int, cpus: int) -> int:
    from ..image import ensure_image
    from ..oci.share import ROOTFS_ENTRY
    from ..sandbox.share import ContainerShare, remove_share_dir
    from ..sandbox.sandbox import Sandbox, Share
    from .warmup import warm_up

    share = ContainerShare(directory / "share")
    (share.path / ROOTFS_ENTRY).mkdir(mode=0o755)
    sandbox = Sandbox(ensure_image(progress=False), memory_mib=memory, cpus=cpus,
                      shares=[Share("rootfs", share.path)], qmp_socket=True, name=f"kata-py-pool-{os.getpid()}")
    socket_path = directory / "standby.sock"
    loop = asyncio.get_running_loop()
    claimed: asyncio.Future = loop.create_future()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = None

    async def on_connect(reader, writer) -> None:
        if claimed.done():
            writer.close()
            return
        try:
            request = await asyncio.wait_for(read_message(reader), CLAIM_TIMEOUT)
            owner = request.get("owner")
            if request.get("op") != "claim" or not isinstance(owner, int) or owner <= 0:
                raise WireError("expected a claim with the owner's pid")
        except (WireError, asyncio.TimeoutError, OSError) as exc:
            log.warning("bad claim: %s", exc)
            writer.close()
            return
        if claimed.done():
            writer.close()
            return
        claimed.set_result((reader, writer, owner))

    try:
        await sandbox.start()
        await warm_up(sandbox, share.path)
        server = await asyncio.start_unix_server(on_connect, path=str(socket_path))
        os.chmod(socket_path, 0o600)
        sys.stdout.write("ready " + json.dumps({"pid": os.getpid(), "socket": str(socket_path)}) + "\n")
        sys.stdout.flush()
        vm_end = asyncio.ensure_future(sandbox.machine.process.wait())
        stop_wait = asyncio.ensure_future(stop.wait())
        await asyncio.wait([claimed, vm_end, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        server.close()
        server = None
        socket_path.unlink(missing_ok=True)
        if not claimed.done():
            claimed.cancel()
            return 0  # stopped while idle, or the VM died: nothing was handed out
        _outlive_the_factory()
        reader, writer, owner = claimed.result()
        log.info("claimed by pid %d", owner)
        writer.write(encode({"ok": True, "pid": os.getpid(), "run_dir": str(sandbox.run_dir),
                             "uds": str(sandbox.transport.uds_path), "share_dir": str(share.path),
                             "memory_mib": memory, "cpus": cpus}))
        await writer.drain()
        # The owner keeps the connection for the container's life.
        owner_gone = asyncio.ensure_future(reader.read(1))
        await asyncio.wait([owner_gone, vm_end], return_when=asyncio.FIRST_COMPLETED)
        owner_gone.cancel()
        writer.close()
        return 0
    finally:
        if server is not None:
            server.close()
        socket_path.unlink(missing_ok=True)
        await sandbox.stop()
        remove_share_dir(share.path)
        _remove_empty(directory)


def _remove_empty(directory: Path) -> None:
    """Never a recursive delete here (see sandbox/share.py): everything in it is gone."""
    try:
        directory.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kata-py-standby")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--memory", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s standby %(process)d %(levelname)s %(message)s")
    from ..sandbox.share import enter_private_mount_namespace

    # The VM's run directory goes in the standby's own, which the factory
    # cleans up should this process be killed.
    os.environ["KATA_PY_RUN_DIR"] = args.dir
    enter_private_mount_namespace()  # before any thread: see sandbox/share.py
    try:
        sys.exit(asyncio.run(serve(Path(args.dir), args.memory, args.cpus)))
    except Exception:
        log.exception("standby failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
