"""Leak checker: what kata-py left on the host, as a snapshot before and a
comparison after.

Scoped to this test session, so that other users of the machine (their VMs,
their namespaces) never count: a process is ours when its command line names
this session's run directory or one of the test's roots, or its environment
carries this session's KATA_PY_RUN_DIR; a mount, socket or file is ours when
its path is under one of those directories; taps and tc filters are looked
for in the network namespaces the test made (and kata-py's tap names in the
host's); cgroups are kata cgroups that name one of `tokens` (the test's
container ids and their VMs' run directory names); temp entries are those of the temp
directory the test gave kata-py (TMPDIR), or, without one, those of the
system's that carry kata-py's prefixes.

    checker = LeakChecker(roots=[root], netns=[name], temp_dir=private_tmp,
                          tokens=[container_id, sandbox_dir_for(root, container_id).name])
    before = checker.snapshot()
    ...                                 # create, kill, delete --force
    checker.assert_clean(before)        # waits a bounded time for exits to finish
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import RUN_DIR

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_DEPTH = 4            # kata-py would put its own cgroups near the top of a hierarchy
TAP_PREFIX = "kp-tap"       # kata_py.network names its taps kp-tapN
INGRESS_PARENT = 0xFFFFFFF2
# Names kata-py could give to entries of the temp directory, were it to use it
# (it keeps run directories under KATA_PY_RUN_DIR; this catches a regression).
TEMP_PREFIXES = ("kata", ".kata", "vm-", "share-", "exec-")


@dataclass(frozen=True, order=True)
class Proc:
    """One process, told apart by pid and start time, and by being a zombie
    or not: a process that was running before and sleeps now (or the other
    way round) is the same process, not a leak."""
    pid: int
    start: int              # /proc/PID/stat field 22: tells a reused pid apart
    zombie: bool
    state: str = field(compare=False)
    what: str = field(compare=False)    # the command line, shortened

    def __str__(self) -> str:
        return f"{self.pid} [{self.state}] {self.what}"


@dataclass
class Snapshot:
    processes: set = field(default_factory=set)
    mounts: set = field(default_factory=set)
    sockets: set = field(default_factory=set)
    files: set = field(default_factory=set)
    state_dirs: set = field(default_factory=set)
    temp_entries: set = field(default_factory=set)
    net: set = field(default_factory=set)
    cgroups: set = field(default_factory=set)

    KINDS = ("processes", "mounts", "sockets", "files", "state_dirs", "temp_entries", "net", "cgroups")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat_fields(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from /proc/PID/stat."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    rest = raw.rsplit(b")", 1)[1].split()
    return rest[0].decode(), int(rest[1]), int(rest[19])


def _ancestors() -> set[int]:
    """This process and those above it: pytest may itself carry the session's environment."""
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        fields = _stat_fields(pid)
        if fields is None:
            break
        pid = fields[1]
    return found


class LeakChecker:
    def __init__(self, roots=(), netns=(), tokens=(), temp_dir: Path | None = None,
                 run_dir: Path = RUN_DIR) -> None:
        self.run_dir = Path(run_dir)
        self.roots = [Path(r) for r in roots]
        self.netns = list(netns)
        self.tokens = [str(t) for t in tokens] + [self.run_dir.name]
        self.temp_dir = Path(temp_dir) if temp_dir else None

    # -- what "ours" means -------------------------------------------------

    def _scope_paths(self) -> list[str]:
        return [str(self.run_dir)] + [str(r) for r in self.roots]

    def _under_scope(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self._scope_paths())

    def _is_ours(self, pid: int) -> tuple[bool, bytes]:
        cmdline = _read(f"/proc/{pid}/cmdline")
        needles = [p.encode() for p in self._scope_paths()]
        if any(n in cmdline for n in needles):
            return True, cmdline
        environ = _read(f"/proc/{pid}/environ").split(b"\0")
        return f"KATA_PY_RUN_DIR={self.run_dir}".encode() in environ, cmdline

    # -- the parts of a snapshot -------------------------------------------

    def processes(self) -> set[Proc]:
        skip = _ancestors()
        ours: dict[int, Proc] = {}
        parents: dict[int, int] = {}
        zombies: list[tuple[int, int, int]] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in skip:
                continue
            pid = int(entry)
            fields = _stat_fields(pid)
            if fields is None:
                continue
            state, ppid, start = fields
            parents[pid] = ppid
            if state == "Z":        # no command line or environment left to read
                zombies.append((pid, ppid, start))
                continue
            mine, cmdline = self._is_ours(pid)
            if mine:
                what = b" ".join(cmdline.split(b"\0")).decode(errors="replace").strip()
                ours[pid] = Proc(pid, start, False, state, what[:160])
        # A zombie counts when a process of ours fails to reap it.
        for pid, ppid, start in zombies:
            if ppid in ours:
                ours[pid] = Proc(pid, start, True, "Z", f"<zombie child of {ppid}>")
        return set(ours.values())

    def mounts(self) -> set[str]:
        found = set()
        for line in _read("/proc/self/mountinfo").decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) > 4:
                mountpoint = parts[4].replace("\\040", " ")
                if self._under_scope(mountpoint):
                    found.add(f"{mountpoint} ({parts[0]})")
        return found

    def sockets(self) -> set[str]:
        found = set()
        for line in _read("/proc/net/unix").decode(errors="replace").splitlines()[1:]:
            parts = line.split(None, 7)
            if len(parts) == 8 and self._under_scope(parts[7]):
                found.add(parts[7])
        return found

    def files(self) -> set[str]:
        """Everything under the session's run directory (sockets, logs, shares)."""
        found = set()
        if self.run_dir.is_dir():
            for dirpath, dirnames, filenames in os.walk(self.run_dir):
                for name in dirnames + filenames:
                    found.add(os.path.join(dirpath, name))
        return found

    def state_dirs(self) -> set[str]:
        found = set()
        for root in self.roots:
            if root.is_dir():
                found.update(str(p) for p in root.iterdir())
        return found

    def temp_entries(self) -> set[str]:
        temp = self.temp_dir or Path(tempfile.gettempdir())
        try:
            return {str(p) for p in temp.iterdir() if self.temp_dir or p.name.startswith(TEMP_PREFIXES)}
        except OSError:
            return set()

    def net(self) -> set[str]:
        """Taps, qdiscs and ingress filters in the test's namespaces; kata-py's
        taps in the host's (it never makes any there)."""
        from pyroute2 import IPRoute

        found = set()
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                if name.startswith(TAP_PREFIX):
                    found.add(f"host: link {name}")
        for ns in self.netns:
            if not os.path.exists(f"/run/netns/{ns}"):
                found.add(f"{ns}: namespace gone")
                continue
            with IPRoute(netns=ns, flags=0) as ipr:
                links = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
                for index, name in links.items():
                    found.add(f"{ns}: link {name}")
                for qdisc in ipr.get_qdiscs():
                    found.add(f"{ns}: qdisc {qdisc.get_attr('TCA_KIND')} on {links.get(qdisc['index'])} "
                              f"parent {qdisc['parent']:#x}")
                for index, name in links.items():
                    for flt in ipr.get_filters(index, parent=INGRESS_PARENT):
                        found.add(f"{ns}: filter {flt.get_attr('TCA_KIND')} on {name} "
                                  f"pref {flt['info'] >> 16} handle {flt['handle']:#x}")
        return found

    def cgroups(self) -> set[str]:
        """kata cgroups that name one of the tokens: kata-py names a VM's host
        cgroups after its run directory (<hierarchy>/kata-py/vm-*), and a
        container's VM's run directory after (root, id), so the test passes
        that name (kata_py.oci.share.sandbox_dir_for). Other sessions' VMs,
        and what they leak, are not ours to count."""
        found = set()
        if not CGROUP_ROOT.is_dir():
            return found
        base_depth = len(CGROUP_ROOT.parts)
        for dirpath, dirnames, _ in os.walk(CGROUP_ROOT):
            depth = len(Path(dirpath).parts) - base_depth
            if depth >= CGROUP_DEPTH:
                dirnames[:] = []
            name = os.path.basename(dirpath)
            if "kata" in dirpath.lower() and any(t in name for t in self.tokens):
                found.add(dirpath)
        return found

    def snapshot(self) -> Snapshot:
        return Snapshot(**{kind: getattr(self, kind)() for kind in Snapshot.KINDS})

    # -- comparing -----------------------------------------------------------

    def leaks(self, before: Snapshot) -> dict[str, list[str]]:
        """What is here now that was not before, by kind (empty kinds left out)."""
        after = self.snapshot()
        found = {}
        for kind in Snapshot.KINDS:
            new = getattr(after, kind) - getattr(before, kind)
            if kind == "net":
                # A filter or qdisc that went missing is a leak of another
                # kind: kata-py removed what it did not make.
                new |= {f"missing: {item}" for item in getattr(before, kind) - getattr(after, kind)}
            if new:
                found[kind] = sorted(str(item) for item in new)
        return found

    def wait_clean(self, before: Snapshot, timeout: float = 20.0) -> dict[str, list[str]]:
        """The leaks once processes had `timeout` seconds to finish exiting
        (a SIGKILLed monitor's QEMU and back end go a moment later)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.leaks(before)
            if not found or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)

    def assert_clean(self, before: Snapshot, timeout: float = 20.0) -> None:
        found = self.wait_clean(before, timeout)
        assert not found, "leaked: " + "; ".join(f"{kind}: {items}" for kind, items in found.items())

