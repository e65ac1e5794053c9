"""The posture of the process that holds the boundary, read on the host.

A container that escapes lands in whatever process stands between it and
the host: for kata-py the VM's QEMU, for runsc its sandbox process, for
runc and crun the container's init itself. These probes read that process
from the host's /proc while the container runs: its uid and gid, its
capabilities, no_new_privs, its seccomp mode, its namespaces against the
host's, and its root directory. Nothing the container prints decides; its
script only proves that the container was up when the host looked.

Finding the process, from what the harness knows (its container id, its
rootfs):
- a process whose command line names the container id (kata-py's sandbox
  owner, runsc's sandbox): its QEMU child if it has one (kata-py), else
  runsc's sandbox process (`runsc-sandbox`, or `boot`);
- else the container's init: the first process whose root directory is
  the harness's rootfs and whose parent's is not (runc, crun).
"""

from __future__ import annotations

import os
from pathlib import Path

from .probe import Output, Probe, broke, held, inconclusive

PROC = Path("/proc")
NAMESPACES = ("mnt", "pid", "ipc", "uts")
SCRIPT = 'echo "posture=up"\n'
EVIDENCE = ("posture",)


def _cmdline(pid: int) -> list[bytes]:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _status(pid: int) -> dict[str, str]:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def _ppid(pid: int) -> int | None:
    value = _status(pid).get("PPid")
    return int(value) if value and value.isdigit() else None


def _pids() -> list[int]:
    return sorted(int(entry) for entry in os.listdir(PROC) if entry.isdigit())


def boundary_process(container_id: str, rootfs: Path) -> tuple[int, str] | None:
    """(pid, what it is) of the process that holds the container's boundary."""
    word = container_id.encode()
    pids = _pids()
    named = [pid for pid in pids if any(word in arg for arg in _cmdline(pid)) and pid != os.getpid()]
    for pid in named:
        for child in pids:
            argv = _cmdline(child)
            if argv and b"qemu-system" in os.path.basename(argv[0]) and _ppid(child) == pid:
                return child, f"QEMU (pid {child}, child of {pid})"
    for pid in named:
        argv = _cmdline(pid)
        if argv and (b"runsc-sandbox" in argv[0] or b"boot" in argv):
            return pid, f"runsc sandbox (pid {pid})"
    # A root in another mount namespace reads as "/" through readlink: the inode decides.
    try:
        wanted = os.stat(rootfs)
    except OSError:
        return None
    inside = []
    for pid in pids:
        try:
            root = os.stat(f"{PROC}/{pid}/root/")
        except OSError:
            continue
        if (root.st_dev, root.st_ino) == (wanted.st_dev, wanted.st_ino) and pid != os.getpid():
            inside.append(pid)
    # The init: the first of them whose parent is outside (pid 1 of the
    # container's pid namespace, or the first process of one without).
    for pid in inside:
        if _ppid(pid) not in inside:
            return pid, f"container init (pid {pid})"
    return None


def _container_id(host) -> str:
    return f"kata-py-harness-{host.token}"


def _posture(check):
    """A host-side check on the boundary process; inconclusive when it cannot be found."""

    def decide(output: Output, host):
        found = boundary_process(_container_id(host), host.rootfs)
        if found is None:
            return inconclusive("no process holding the container's boundary was found on the host")
        pid, what = found
        status = _status(pid)
        if not status:
            return inconclusive(f"{what}: /proc/{pid}/status is unreadable (gone?)")
        return check(pid, what, status, host)

    return decide


def _ids(pid: int, what: str, status: dict, host):
    uid = status.get("Uid", "").split()
    gid = status.get("Gid", "").split()
    if len(uid) < 4 or len(gid) < 4:
        return inconclusive(f"{what}: no Uid/Gid in its status")
    text = f"{what}: uid {'/'.join(uid)}, gid {'/'.join(gid)}"
    if "0" in uid or "0" in gid:
        return broke(f"{text}: root on the host")
    return held(text)


def _caps(pid: int, what: str, status: dict, host):
    values = {key: status.get(key, "") for key in ("CapEff", "CapPrm", "CapBnd")}
    if not all(values.values()):
        return inconclusive(f"{what}: no capability sets in its status")
    text = f"{what}: " + ", ".join(f"{key} {value}" for key, value in values.items())
    if int(values["CapEff"], 16) or int(values["CapPrm"], 16):
        return broke(text)
    return held(text)


def _nnp(pid: int, what: str, status: dict, host):
    value = status.get("NoNewPrivs")
    if value is None:
        return inconclusive(f"{what}: no NoNewPrivs in its status")
    return held(f"{what}: NoNewPrivs {value}") if value == "1" else broke(f"{what}: NoNewPrivs {value}")


def _seccomp(pid: int, what: str, status: dict, host):
    value = status.get("Seccomp")
    if value is None:
        return inconclusive(f"{what}: no Seccomp in its status")
    text = f"{what}: Seccomp {value} (0 none, 1 strict, 2 filter), filters {status.get('Seccomp_filters', '?')}"
    return held(text) if value in ("1", "2") else broke(text)


def host_namespaces() -> tuple[str, dict[str, str]]:
    """The host's namespaces: PID 1's, or (where PID 1's cannot be read) this process's."""
    for who in ("1", "self"):
        try:
            return who, {ns: os.readlink(PROC / who / "ns" / ns) for ns in NAMESPACES}
        except OSError:
            continue
    return "", {}


def _namespaces(pid: int, what: str, status: dict, host):
    who, ours = host_namespaces()
    if not ours:
        return inconclusive("the host's namespaces cannot be read")
    try:
        theirs = {ns: os.readlink(PROC / str(pid) / "ns" / ns) for ns in NAMESPACES}
    except OSError as exc:
        return inconclusive(f"{what}: its namespaces cannot be read: {exc.strerror}")
    shared = [ns for ns in NAMESPACES if theirs[ns] == ours[ns]]
    reference = "PID 1" if who == "1" else "the harness"
    if shared:
        return broke(f"{what} shares the {', '.join(shared)} namespace(s) of {reference}")
    return held(f"{what}: {', '.join(f'{ns} {theirs[ns]}' for ns in NAMESPACES)}, none of them {reference}'s")


def _root(pid: int, what: str, status: dict, host):
    # readlink names a root in another mount namespace "/" too: the inode decides.
    link = PROC / str(pid) / "root"
    canaries = str(host.canary_dir).lstrip("/")
    try:
        theirs, ours = os.stat(f"{link}/"), os.stat("/")
        reachable = os.path.isdir(os.path.join(link, canaries))
        entries = sorted(os.listdir(link))
    except OSError as exc:
        return inconclusive(f"{what}: its root cannot be read: {exc.strerror}")
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return broke(f"{what}: its root directory is the host's /")
    # Something of the host's beside the rootfs (the canary directory) must not be reachable.
    if reachable:
        return broke(f"{what}: the host directory {host.canary_dir} is reachable in its root")
    return held(f"{what}: its root (device {theirs.st_dev}, inode {theirs.st_ino}) holds "
                f"{' '.join(entries)[:120]}; {host.canary_dir} is not in it")


def _probe(name: str, title: str, check) -> Probe:
    return Probe(name, title, SCRIPT, _posture(check), evidence=EVIDENCE, control="privileged")


PROBES = [
    _probe("vmm-uid", "boundary process posture: not root on the host (VMM escape lands unprivileged)", _ids),
    _probe("vmm-capabilities", "boundary process posture: no capabilities (VMM escape keeps none)", _caps),
    _probe("vmm-no-new-privs", "boundary process posture: no_new_privs (no gain through setuid exec)", _nnp),
    _probe("vmm-seccomp", "boundary process posture: a seccomp filter (VMM escape meets a syscall filter)",
           _seccomp),
    _probe("vmm-namespaces", "boundary process posture: mount, pid, ipc, uts namespaces not the host's", _namespaces),
    _probe("vmm-root", "boundary process posture: root directory not the host's, no host directory in it", _root),
]
