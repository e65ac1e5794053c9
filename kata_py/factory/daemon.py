"""The factory daemon: keeps `size` standbys booted and hands them out.

Requests on its socket (one JSON line each): {"op": "status"},
{"op": "claim", "memory_mib", "cpus"} -> the socket of one ready standby,
which leaves the pool at once (the claimant then claims it from the standby
itself), and {"op": "stop"}. Standbys boot one at a time, so that refilling
the pool never takes both cores from running containers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import hostsys
from ..sandbox.pool_wire import WireError, decode, encode, read_message
from ..vmm.host_cgroup import remove_vm_run_dir

log = logging.getLogger("kata_py.factory")
READY_TIMEOUT = 180.0      # a standby's boot under TCG on a loaded machine
RETRY_DELAY = 5.0


@dataclass
class Standby:
    pid: int
    socket: str
    process: asyncio.subprocess.Process
    ready_at: float = field(default_factory=time.monotonic)


class Factory:
    def __init__(self, directory: Path, size: int, memory_mib: int, cpus: int) -> None:
        self.directory = directory
        self.size = size
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.ready: list[Standby] = []
        self.booting = 0
        self.handed_out = 0
        self.failures = 0
        self.children: set[asyncio.subprocess.Process] = set()
        self.changed = asyncio.Event()
        self.stopping = asyncio.Event()
        self.counter = itertools.count()

    def status(self) -> dict:
        return {"pid": os.getpid(), "size": self.size, "ready": len(self.ready), "booting": self.booting,
                "handed_out": self.handed_out, "failures": self.failures, "memory_mib": self.memory_mib,
                "cpus": self.cpus, "standbys": [s.pid for s in self.ready]}

    async def fill(self) -> None:
        while not self.stopping.is_set():
            if len(self.ready) + self.booting < self.size:
                await self._boot_one()
                continue
            self.changed.clear()
            await self.changed.wait()

    async def _boot_one(self) -> None:
        directory = self.directory / f"standby-{os.getpid()}-{next(self.counter)}"
        directory.mkdir(mode=0o700)
        log_file = open(self.directory / "standby.log", "ab")
        self.booting += 1
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kata_py.factory.standby", "--dir", str(directory),
                "--memory", str(self.memory_mib), "--cpus", str(self.cpus),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                preexec_fn=hostsys.die_with_parent)
        finally:
            log_file.close()
        self.children.add(process)
        asyncio.ensure_future(self._reap(process, directory))
        try:
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
            kind, _, payload = line.partition(b" ")
            if kind != b"ready":
                raise WireError(f"standby said {line[:200]!r}")
            info = decode(payload)
            standby = Standby(pid=int(info["pid"]), socket=str(info["socket"]), process=process)
        except (WireError, asyncio.TimeoutError, KeyError, ValueError) as exc:
            log.error("a standby failed to boot: %s", exc)
            self.failures += 1
            if process.returncode is None:
                process.kill()
            self.booting -= 1
            await asyncio.sleep(RETRY_DELAY)
            return
        self.booting -= 1
        if self.stopping.is_set():
            process.terminate()
            return
        self.ready.append(standby)
        log.info("standby %d ready (%d/%d)", standby.pid, len(self.ready), self.size)

    async def _reap(self, process: asyncio.subprocess.Process, directory: Path) -> None:
        await process.wait()
        self.children.discard(process)
        self.ready = [s for s in self.ready if s.process is not process]
        self.changed.set()
        # What a killed standby could not remove itself: empty mount points only
        # (its mounts died with its namespace).
        from ..sandbox.share import remove_share_dir
        remove_share_dir(directory / "share")
        (directory / "standby.sock").unlink(missing_ok=True)
        for run_dir in directory.glob("vm-*"):
            remove_vm_run_dir(run_dir)
        try:
            directory.rmdir()
        except OSError:
            pass

    def claim(self, memory_mib: int, cpus: int) -> dict:
        if memory_mib > self.memory_mib or cpus > self.cpus:
            return {"ok": False, "error": f"the pool's VMs have {self.memory_mib} MiB and {self.cpus} vCPUs"}
        while self.ready:
            standby = self.ready.pop(0)
            if standby.process.returncode is None:
                self.handed_out += 1
                self.changed.set()
                return {"ok": True, "socket": standby.socket, "pid": standby.pid}
        self.changed.set()
        return {"ok": False, "error": "no idle VM in the pool"}

    async def handle(self, reader, writer) -> None:
        try:
            request = await asyncio.wait_for(read_message(reader), 10)
            op = request.get("op")
            if op == "status":
                reply = dict(self.status(), ok=True)
            elif op == "claim":
                reply = self.claim(int(request.get("memory_mib", 0)), int(request.get("cpus", 1)))
            elif op == "stop":
                self.stopping.set()
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            writer.write(encode(reply))
            await writer.drain()
        except (WireError, asyncio.TimeoutError, OSError, ValueError, TypeError) as exc:
            log.warning("bad request: %s", exc)
        finally:
            writer.close()

    async def run(self, socket_path: Path) -> None:
        server = await asyncio.start_unix_server(self.handle, path=str(socket_path))
        os.chmod(socket_path, 0o600)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        filler = asyncio.ensure_future(self.fill())
        await self.stopping.wait()
        server.close()
        socket_path.unlink(missing_ok=True)
        filler.cancel()
        idle = [s.process for s in self.ready]
        self.ready.clear()
        for process in idle:
            if process.returncode is None:
                process.terminate()  # an idle standby stops its VM and exits
        # Claimed standbys serve containers: they outlive the factory.
        await asyncio.gather(*(asyncio.wait_for(p.wait(), 30) for p in idle), return_exceptions=True)
        for process in idle:
            if process.returncode is None:
                process.kill()
        log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kata-py-factory")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--memory", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    logging.basicConfig(filename=directory / "factory.log", level=logging.INFO,
                        format="%(asctime)s factory %(levelname)s %(message)s")
    factory = Factory(directory, args.size, args.memory, args.cpus)
    try:
        asyncio.run(factory.run(directory / "factory.sock"))
    finally:
        (directory / "factory.pid").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
