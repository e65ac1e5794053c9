"""containerd-shim-kata-py-v2: the shim v2 binary of runtime type io.containerd.kata-py.v2.

containerd 1.6 runs it three ways (its flags are Go's: one dash, `-flag value`):

    ... -namespace NS -address A -publish-binary B -id ID start    (cwd: the bundle)
    ... -namespace NS -address A -publish-binary B -id ID -bundle DIR delete
    ... (the daemon that `start` leaves behind; it serves ttrpc)

`start` finds the pod the container belongs to (the CRI annotation
`io.kubernetes.cri.sandbox-id`, else the container's own id): if that pod's
shim already serves, it prints that shim's address and is done (containerd
then creates the container there); otherwise it binds the pod's socket,
starts the daemon with the listening socket as fd 3, its stdio on
/dev/null and a session of its own, and prints the address. containerd reads
`start`'s whole output as the address.

`delete` runs after a shim is gone (killed, or its start failed): it removes
what the dead shim's pod left on the host (the network it carried, its VM's
run directory and host cgroups, its export) and writes a DeleteResponse
(status 137, as a SIGKILLed process) on stdout.

The daemon holds the pod (pod.py) in a mount namespace of its own, entered
before any thread: containers' rootfs mounts and the VM's export binds go
with it however it ends; its QEMU dies with it (PDEATHSIG). Its guardian
(leftovers.py) removes what else the pod left once the daemon has gone,
killed or not, as `delete` would, had containerd been able to run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .. import paths
from .leftovers import clean_up_pod, log_path, pod_dir, serving, shim_dir, socket_path, start_guardian

log = logging.getLogger("kata_py.shim")

SOCKET_FD = 3
FLAGS = ("namespace", "address", "publish-binary", "id", "bundle", "socket-fd")
BOOL_FLAGS = ("debug", "v")


class Args:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.debug = False
        self.action = ""

    def __getattr__(self, name: str) -> str:
        return self.values.get(name.replace("_", "-"), "")


def parse(argv: list[str]) -> Args:
    """Go's flag syntax: -name value, -name=value, --name value; a bool flag alone."""
    args = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg != "-":
            name, eq, value = arg.lstrip("-").partition("=")
            if name in BOOL_FLAGS:
                args.debug = args.debug or (name == "debug" and value in ("", "true", "1"))
            elif name in FLAGS:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise SystemExit(f"flag needs an argument: -{name}")
                    value = argv[i]
                args.values[name] = value
            else:
                raise SystemExit(f"flag provided but not defined: -{name}")
        else:
            args.action = arg
        i += 1
    return args


def pod_of(bundle: Path, container_id: str) -> str:
    """The pod a container belongs to: its CRI sandbox's id, or its own."""
    try:
        with open(bundle / "config.json", "rb") as f:
            config = json.loads(f.read(8 << 20))
        annotations = config.get("annotations") or {}
    except (OSError, ValueError, AttributeError):
        annotations = {}
    return annotations.get("io.kubernetes.cri.sandbox-id") or container_id


def pod_key(namespace: str, pod: str) -> str:
    return hashlib.sha256(f"{namespace}/{pod}".encode()).hexdigest()[:24]


# -- start ----------------------------------------------------------------------------
def start(args: Args) -> str:
    bundle = Path(args.bundle or os.getcwd())
    key = pod_key(args.namespace, pod_of(bundle, args.id))
    path = socket_path(key)
    address = f"unix://{path}"
    paths.ensure_private_dir(shim_dir())
    if not serving(path):
        _start_daemon(args, key, path)
    try:
        (bundle / "address").write_text(address)
    except OSError:
        pass
    return address


def _start_daemon(args: Args, key: str, path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        try:
            listener.bind(str(path))
        except FileNotFoundError:   # the last other pod's shim removed the directory just now
            paths.ensure_private_dir(shim_dir())
            listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(64)
    argv = [sys.executable, "-m", "kata_py.shim.main", "-namespace", args.namespace, "-address", args.address,
            "-publish-binary", args.publish_binary, "-id", key, "-socket-fd", str(SOCKET_FD)]
    if args.debug:
        argv.append("-debug")
    fd = listener.fileno()

    def place_socket() -> None:
        os.dup2(fd, SOCKET_FD)
        os.set_inheritable(SOCKET_FD, True)

    with open(os.devnull, "rb") as null, open(log_path(key), "ab") as log_file:
        subprocess.Popen(argv, stdin=null, stdout=null, stderr=log_file, start_new_session=True,
                         cwd=str(shim_dir()), preexec_fn=place_socket, close_fds=True, pass_fds=(fd,))
    listener.close()


# -- delete -------------------------------------------------------------------------------
def delete(args: Args) -> bytes:
    from .protos import load

    bundle = Path(args.bundle or os.getcwd())
    key = pod_key(args.namespace, pod_of(bundle, args.id))
    if not serving(socket_path(key)):
        clean_up_pod(key)
    protos = load()
    reply = protos.shim.DeleteResponse(pid=0, exit_status=128 + signal.SIGKILL)
    reply.exited_at.FromNanoseconds(time.time_ns())
    return reply.SerializeToString()


# -- the daemon -------------------------------------------------------------------------
def serve(args: Args) -> int:
    from ..sandbox.share import enter_private_mount_namespace

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s shim %(levelname)s %(name)s: %(message)s")
    key = args.id
    start_guardian(key)                 # in the host's mount namespace, as containerd's `delete` runs
    enter_private_mount_namespace()     # before any thread exists
    directory = pod_dir(key)
    paths.ensure_private_dir(directory)
    try:
        return asyncio.run(_serve(args, key, directory))
    finally:
        clean_up_pod(key)


async def _serve(args: Args, key: str, directory: Path) -> int:
    from . import ttrpc
    from .events import Publisher
    from .pod import Pod
    from .protos import load
    from .service import SERVICE, TaskService, map_error

    protos = load()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    publisher = Publisher(protos, os.environ.get("TTRPC_ADDRESS"), args.namespace)
    pod = Pod(key, publisher.publish, directory)
    service = TaskService(protos, pod, done.set)
    server = ttrpc.Server(error_mapper=map_error)
    server.register(SERVICE, service.methods())
    listener = socket.socket(fileno=int(args.socket_fd or SOCKET_FD))
    await server.start(sock=listener)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    log.info("shim for pod %s serving", key)
    await done.wait()
    log.info("shutting down")
    await pod.stop()
    await publisher.drain()
    await server.close()
    return 0


def run() -> None:
    args = parse(sys.argv[1:])
    if args.action == "start":
        sys.stdout.write(start(args))
        sys.stdout.flush()
        return
    if args.action == "delete":
        sys.stdout.buffer.write(delete(args))
        sys.stdout.buffer.flush()
        return
    if args.action:
        raise SystemExit(f"unknown action {args.action!r}")
    sys.exit(serve(args))


if __name__ == "__main__":
    run()
