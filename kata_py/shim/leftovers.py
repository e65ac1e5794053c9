"""What a shim's pod leaves on the host (its socket, log, pod and VM
directories, network, export and host cgroups), and who removes it: the
shim itself as it ends, containerd's `shim delete`, and the shim's guardian.

The guardian is a small process, started by the shim daemon before it does
anything else, that cleans up after the daemon once it is gone.

containerd's own cleanup of a dead shim (`shim delete`) is run with the
bundle as its working directory; when the CRI removes the pod's containers
first (kubelet does, and so does a quick `crictl rmp`), those bundles are
gone, the `delete` never starts, and the pod's VM run directory, host
cgroups, network and export would stay. The guardian reads a pipe whose
write end only the daemon holds: end of file means the daemon has exited,
however it ended (SIGKILL included), and then what its pod left is removed
here (`python -m kata_py.shim.leftovers KEY`), unless a new shim for the pod
already serves.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .. import paths

# A killed shim's QEMU gets SIGKILL by PDEATHSIG, but a guest with much
# memory mapped takes a while to go; its host cgroups can be removed only
# after it has.
QEMU_EXIT_WAIT = 30.0
TITLE = "kata-py shim guardian"


def shim_dir() -> Path:
    return paths.run_dir() / "shim"


def socket_path(key: str) -> Path:
    return shim_dir() / f"{key}.sock"


def pod_dir(key: str) -> Path:
    return shim_dir() / f"pod-{key}"


def log_path(key: str) -> Path:
    return shim_dir() / f"{key}.log"


def serving(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def clean_up_pod(key: str, qemu_exit_wait: float = 2.0) -> None:
    """What a dead shim's pod left on the host. Its QEMU dies with it (its
    host cgroups are removed once it has gone, waiting up to
    `qemu_exit_wait`); its mounts went with its mount namespace. The shim
    itself, its guardian and containerd's `delete` may each get here: one
    at a time, under a lock on the pod's directory."""
    import fcntl

    try:
        lock = os.open(pod_dir(key), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        lock = None     # removed already, or never made: the rest is idempotent
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_pod_leftovers(key, qemu_exit_wait)
    finally:
        if lock is not None:
            os.close(lock)


def _remove_pod_leftovers(key: str, qemu_exit_wait: float) -> None:
    from ..network import detach_container_recorded
    from ..sandbox.share import remove_share_dir
    from ..vmm.host_cgroup import remove_vm_run_dir
    from .pod import vm_dir

    directory = pod_dir(key)
    if (directory / "network.json").exists():
        detach_container_recorded(directory)        # reads <dir>/network.json
    remove_vm_run_dir(vm_dir(directory, key), qemu_exit_wait)
    remove_share_dir(directory / "share")
    for leftover in (socket_path(key), log_path(key)):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass
    shutil.rmtree(directory, ignore_errors=True)
    try:
        shim_dir().rmdir()      # when no other pod's shim is left in it
    except OSError:
        pass


# The guardian waits as a shell (about 1 MiB, where a forked Python kept
# ~9 MiB of the shim's pages as the shim wrote its own) and becomes Python
# only to clean up: `read` returns false at end of file, when the shim is gone.
_GUARDIAN_SCRIPT = 'trap "" HUP INT TERM; while read -r _; do :; done; exec "$0" -m kata_py.shim.leftovers "$1"'


def start_guardian(key: str) -> int:
    """Start the guardian of the pod `key` (its stdin the read end of a
    pipe); returns the write end, which this process keeps open (and no child
    of it inherits) until it exits."""
    read_end, write_end = os.pipe()     # not inheritable: no exec'd child holds it
    try:
        subprocess.Popen([TITLE, "-c", _GUARDIAN_SCRIPT, sys.executable, key], executable="/bin/sh",
                         stdin=read_end, stdout=subprocess.DEVNULL, cwd="/", close_fds=True)
    finally:
        os.close(read_end)
    return write_end


def guard(key: str) -> None:
    """The guardian's last part: the shim is gone; remove what its pod left
    unless a new shim for the pod serves already."""
    from setproctitle import setproctitle

    setproctitle(f"{TITLE} {key}")     # HUP, INT and TERM stay ignored: the shell's trap carries over exec
    left = (pod_dir(key), socket_path(key), log_path(key))
    if any(path.exists() for path in left) and not serving(socket_path(key)):
        print(f"{TITLE}: the shim of pod {key} is gone; removing what it left", file=sys.stderr, flush=True)
        clean_up_pod(key, qemu_exit_wait=QEMU_EXIT_WAIT)


if __name__ == "__main__":
    guard(sys.argv[1])
