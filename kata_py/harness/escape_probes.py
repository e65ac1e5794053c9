"""Known escape classes: each probe reproduces the step of an escape that
happened to a container runtime, aimed at a target the harness owns or at
a value it puts back at once, and is decided from what the host sees.

kernel-helper-paths  core_pattern / uevent_helper / modprobe: the kernel runs
                     the program these name as root on the host; the probe
                     writes an equivalent spelling of the current value
                     (`core` -> `./core`, `/sbin/modprobe` -> `/./sbin/modprobe`),
                     so even on a host it reaches nothing runs differently
cgroup-release-agent cgroup v1 `release_agent` (CVE-2022-0492): mount a v1
                     hierarchy, write a nonexistent agent path into it
sysrq-trigger        /proc/sysrq-trigger: `h` (the help text, into the kernel log)
mknod-kmsg           a host device made with mknod (/dev/kmsg, 1:11): a token
                     written into the host's kernel log
leaked-fd            a process holding a cwd or fd on a host directory (the 2024
                     "leaky vessels" class, CVE-2024-21626): `..` from it
runtime-exe          overwrite the runtime binary through /proc/PID/exe (runc
                     2019, CVE-2019-5736): a canary copy of the runtime's
                     executable, run by the host and stopped at its first
                     instruction, is the target
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shutil
import signal
import time
from pathlib import Path

from .fs_probes import canary_verdict, reason
from .host_state import KernelLog
from .probe import MISSING_EVIDENCE, Output, Probe, SkipProbe, Verdict, broke, held, inconclusive, one_line

# -- kernel helper paths

HELPERS = {"/proc/sys/kernel/core_pattern": "kernel.core_pattern", "/proc/sys/kernel/modprobe": "kernel.modprobe",
           "/sys/kernel/uevent_helper": "uevent_helper"}


def equivalent(value: str, token: str) -> str:
    """A spelling of a helper path that names the same thing (so a write
    that reaches the host changes nothing that runs); for an empty value, a
    helper that does not exist (the kernel's attempt to run it fails)."""
    if not value:
        return f"/nonexistent/kata-py-harness-{token}"
    pipe = "|" if value.startswith("|") else ""
    rest = value[len(pipe):]
    return pipe + ("/." + rest if rest.startswith("/") else "./" + rest)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().rstrip("\n")
    except OSError:
        return None


def _put_back(before: dict[str, str]) -> list[str]:
    changed = []
    for path, value in before.items():
        now = _read(path)
        if now is not None and now != value:
            changed.append(f"{HELPERS.get(path, path)} {value!r} -> {now!r}")
            Path(path).write_text(value + "\n")
    return changed


def _setup_helpers(host) -> dict[str, str]:
    before = {path: value for path in HELPERS if (value := _read(path)) is not None}
    if not before:
        raise SkipProbe("the host has none of core_pattern, modprobe, uevent_helper")
    host.fixtures["kernel-helper-paths"] = before
    host.on_close(lambda: _put_back(before))
    return {"H_WRITES": "\n".join(f"{path} {equivalent(value, host.token)}" for path, value in before.items())}


def _check_helpers(output: Output, host) -> Verdict:
    before = host.fixtures["kernel-helper-paths"]
    changed = _put_back(before)
    if changed:
        return broke(one_line("the host's " + "; ".join(changed) + " (an equivalent spelling, put back)"))
    tried = [f"{line.split(': ', 1)[0]}: {reason(line)}" for line in output.values("denied")]
    tried += [f"{line} absent" for line in output.values("absent")]
    tried += [f"wrote {line} (not the host's)" for line in output.values("wrote")]
    shown = ", ".join(HELPERS[path] for path in before)
    return held(one_line(f"the host's {shown} unchanged; container: {'; '.join(tried)}"))


HELPER_PATHS = Probe(
    name="kernel-helper-paths",
    title="point a kernel helper at a program of its choosing: core_pattern, uevent_helper, modprobe "
          "(the kernel runs it as host root)",
    setup=_setup_helpers,
    script=r"""
IFS='
'
for w in $H_WRITES; do
  p=${w%% *}; v=${w#* }
  if [ -e "$p" ]; then
    if echo "$v" 2>"$S/err" > "$p"; then echo "wrote=$p"; else echo "denied=$p: $(cat "$S/err")"; fi
  else echo "absent=$p"; fi
done
""",
    evidence=("wrote|denied|absent",),
    check=_check_helpers)


# -- cgroup v1 release_agent


def _release_agents() -> dict[str, str]:
    found = {}
    for path in sorted(Path("/sys/fs/cgroup").glob("*/release_agent")):
        value = _read(str(path))
        if value is not None:
            found[str(path)] = value
    top = _read("/sys/fs/cgroup/release_agent")  # a v1 hierarchy mounted at the top
    if top is not None:
        found["/sys/fs/cgroup/release_agent"] = top
    return found


def _setup_release_agent(host) -> dict[str, str]:
    before = _release_agents()
    if not before:
        raise SkipProbe("the host has no cgroup v1 hierarchy (no release_agent)")
    host.fixtures["cgroup-release-agent"] = before
    host.on_close(lambda: _put_back(before))
    controllers = [Path(path).parent.name for path in before if Path(path).parent.name != "cgroup"]
    options = [f"none,name={c[5:]}" if c.startswith("name=") else c for c in controllers]
    options = ["none,name=systemd" if c == "systemd" else c for c in options]
    return {"H_CONTROLLERS": " ".join(options), "H_AGENT": f"/nonexistent/kata-py-harness-{host.token}"}


def _check_release_agent(output: Output, host) -> Verdict:
    changed = _put_back(host.fixtures["cgroup-release-agent"])
    if changed:
        return broke(one_line("the host's release_agent " + "; ".join(changed) + " (put back)"))
    mounted = output.values("mounted")
    denied = output.values("mount-denied") + output.values("denied")
    wrote = output.values("wrote")
    container = (f"mounted {', '.join(mounted)}" if mounted else "") + (
        f"; wrote {', '.join(wrote)} (not the host's)" if wrote else "") + (
        f"; {reason(denied[0])}" if denied else "")
    return held(one_line(f"the host's {len(host.fixtures['cgroup-release-agent'])} release_agent files unchanged; "
                         f"container: {container.lstrip('; ')}"))


RELEASE_AGENT = Probe(
    name="cgroup-release-agent",
    title="cgroup v1 release_agent (CVE-2022-0492 class): mount a v1 hierarchy and set its release agent",
    setup=_setup_release_agent,
    script=r"""
mkdir -p "$S/cg"
for c in $H_CONTROLLERS; do
  if mount -t cgroup -o "$c" cgroup "$S/cg" 2>"$S/err"; then
    echo "mounted=$c"
    if [ -e "$S/cg/release_agent" ]; then
      if echo "$H_AGENT" 2>"$S/err" > "$S/cg/release_agent"; then echo "wrote=$c"
      else echo "denied=$c: $(cat "$S/err")"; fi
    fi
    umount "$S/cg"
  else echo "mount-denied=$c: $(cat "$S/err")"; fi
done
""",
    evidence=("mounted|mount-denied",),
    check=_check_release_agent)


# -- the host's kernel log as evidence: sysrq, a mknod'ed /dev/kmsg


def _kernel_log(host, name: str) -> KernelLog:
    try:
        log = KernelLog()
    except OSError as exc:
        raise SkipProbe(f"the host's kernel log cannot be read: /dev/kmsg: {exc.strerror}") from None
    host.on_close(log.close)
    host.fixtures[name] = log
    return log


def _setup_sysrq(host) -> dict[str, str]:
    if not os.path.exists("/proc/sysrq-trigger"):
        raise SkipProbe("the host kernel has no /proc/sysrq-trigger (built without magic SysRq)")
    _kernel_log(host, "sysrq-trigger")
    return {}


def _check_sysrq(output: Output, host) -> Verdict:
    lines = [line for line in host.fixtures["sysrq-trigger"].new_lines() if "sysrq" in line.lower()]
    if any("HELP" in line for line in lines):
        return broke(one_line(f"the host's kernel log shows the container's sysrq `h`: {lines[0]}"))
    container = output.value("wrote") and "wrote it (not the host's)" or reason(output.value("denied") or
                                                                              output.value("absent"))
    return held(one_line(f"no sysrq in the host's kernel log; container: {container}"))


SYSRQ = Probe(
    name="sysrq-trigger",
    title="/proc/sysrq-trigger: send the host kernel a SysRq (`h`, its help text: harmless)",
    setup=_setup_sysrq,
    script=r"""
if [ -e /proc/sysrq-trigger ]; then
  if echo h 2>"$S/err" > /proc/sysrq-trigger; then echo "wrote=/proc/sysrq-trigger"
  else echo "denied=/proc/sysrq-trigger: $(cat "$S/err")"; fi
else echo "absent=/proc/sysrq-trigger: absent"; fi
""",
    evidence=("wrote|denied|absent",),
    check=_check_sysrq)


def _setup_kmsg(host) -> dict[str, str]:
    _kernel_log(host, "mknod-kmsg")
    token = host.fixtures["mknod-kmsg-token"] = "kata-py-harness-kmsg-" + secrets.token_hex(8)
    return {"H_TOKEN": token}


def _check_kmsg(output: Output, host) -> Verdict:
    token = host.fixtures["mknod-kmsg-token"]
    lines = [line for line in host.fixtures["mknod-kmsg"].new_lines() if token in line]
    if lines:
        return broke(one_line(f"the host's kernel log got the container's token through "
                              f"{', '.join(output.values('kmsg-written')) or 'a device node'}: {lines[0]}"))
    written = output.values("kmsg-written")
    denied = output.values("kmsg-denied") + output.values("mknod-denied")
    container = (f"wrote {', '.join(written)} (not the host's log)" if written else reason(denied[0]))
    return held(one_line(f"no token in the host's kernel log; container: {container}"))


MKNOD_KMSG = Probe(
    name="mknod-kmsg",
    title="a host device through mknod: make /dev/kmsg (1:11) and write a token into the host's kernel log",
    setup=_setup_kmsg,
    script=r"""
nodes=""
[ -c /dev/kmsg ] && nodes=/dev/kmsg
if mknod "$S/kmsg" c 1 11 2>"$S/err"; then nodes="$nodes $S/kmsg"; else echo "mknod-denied=$(cat "$S/err")"; fi
for n in $nodes; do
  if echo "$H_TOKEN" 2>"$S/err" > "$n"; then echo "kmsg-written=$n"; else echo "kmsg-denied=$n: $(cat "$S/err")"; fi
done
""",
    evidence=("kmsg-written|kmsg-denied|mknod-denied",),
    check=_check_kmsg)


# -- a cwd or fd on a host directory

CLIMB = "/.." * 40


def _setup_leaked_fd(host) -> dict[str, str]:
    canary = host.fixtures["leaked-fd"] = host.canary("leaked-fd")
    return {"H_CANARY": str(canary.path), "H_CLIMB": CLIMB}


def _check_leaked_fd(output: Output, host) -> Verdict:
    verdict = canary_verdict("leaked-fd", output, host)
    if verdict.result != "held":
        return verdict
    dirs = output.value("dirs")
    if not dirs.isdigit() or dirs == "0":
        return inconclusive("found no directory cwd or fd to climb from", MISSING_EVIDENCE)
    return held(one_line(f"climbed `..` from {dirs} directory cwd(s)/fd(s) of its processes; the host canary "
                         f"{host.fixtures['leaked-fd'].path} unread, unchanged"))


LEAKED_FD = Probe(
    name="leaked-fd",
    title="a cwd or fd on a host directory (2024 \"leaky vessels\" class, CVE-2024-21626): `..` from "
          "/proc/PID/cwd and /proc/PID/fd/N to a host file",
    setup=_setup_leaked_fd,
    script=r"""
n=0
for l in /proc/[0-9]*/cwd /proc/[0-9]*/fd/*; do
  [ -d "$l/" ] || continue
  n=$((n + 1))
  if out=$(cat "$l$H_CLIMB$H_CANARY" 2>/dev/null); then echo "read=$l: $out"; fi
done
echo "dirs=$n"
""",
    evidence=("dirs",),
    control="leaked-fd",
    check=_check_leaked_fd)


# -- the runtime binary through /proc/PID/exe


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start_stopped(executable: Path) -> int:
    """Run `executable`, stopped (ptrace TRACEME) at its first instruction:
    a process whose /proc/PID/exe is that file, which runs no code of it."""
    pid = os.fork()
    if pid == 0:
        try:
            ctypes.CDLL(None, use_errno=True).ptrace(0, 0, None, None)  # PTRACE_TRACEME
            os.execv(executable, [str(executable), "--version"])
        finally:
            os._exit(127)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/exe") == str(executable):
                return pid
        except OSError:
            pass
        time.sleep(0.01)
    _end(pid)
    raise SkipProbe(f"the canary copy of the runtime did not start: {executable}")


def _end(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return


def _setup_runtime_exe(host) -> dict[str, str]:
    exe = getattr(host, "runtime_exe", None)
    if not exe or not os.path.isfile(exe):
        raise SkipProbe("the runtime's executable is not known on this host")
    copy = host.canary_dir / f"runtime-canary-{host.token}"
    shutil.copy2(os.path.realpath(exe), copy)
    os.chmod(copy, 0o755)
    state = host.fixtures["runtime-exe"] = {"copy": copy, "sha256": _sha256(copy), "pid": None}
    state["pid"] = _start_stopped(copy)
    host.on_close(lambda: _end(state.pop("pid", None)))
    return {"H_EXE_NAME": copy.name, "H_TOKEN": "kata-py-harness-exe-" + host.token}


def _release_runtime_exe(host) -> dict:
    """The host step: the canary process ends, so its executable is no longer busy."""
    state = host.fixtures["runtime-exe"]
    _end(state.pop("pid", None))
    return {}


def _check_runtime_exe(output: Output, host) -> Verdict:
    state = host.fixtures["runtime-exe"]
    if _sha256(state["copy"]) != state["sha256"]:
        return broke(one_line(f"the canary copy of the runtime binary ({state['copy']}) changed: written through "
                              f"{', '.join(output.values('opened')) or '/proc/PID/exe'}"))
    processes = output.value("processes")
    if not processes.isdigit() or processes == "0":
        return inconclusive("saw no process's exe at all", MISSING_EVIDENCE)
    opened = output.values("opened")
    denied = output.values("write-denied") + output.values("open-denied")
    container = (f"opened {', '.join(opened)}" if opened else f"none of its {processes} processes runs it") + (
        f"; {reason(denied[0])}" if denied else "")
    return held(one_line(f"the canary copy of the runtime binary is unchanged (sha256); container: {container}"))


RUNTIME_EXE = Probe(
    name="runtime-exe",
    title="overwrite the runtime binary through /proc/PID/exe (runc 2019 class, CVE-2019-5736), "
          "on a canary copy run by the host",
    setup=_setup_runtime_exe,
    script=r"""
n=0; target=""
for e in /proc/[0-9]*/exe; do
  t=$(readlink "$e" 2>/dev/null) || continue
  n=$((n + 1))
  case "$t" in *"$H_EXE_NAME"*) target=$e;; esac
done
echo "processes=$n"
if [ -n "$target" ]; then
  if (exec 7<"$target") 2>"$S/err"; then exec 7<"$target"; echo "opened=$target"
  else echo "open-denied=$target: $(cat "$S/err")"; target=""; fi
fi
echo "@@ready"
read -t 60 go
if [ -n "$target" ]; then
  if echo "$H_TOKEN" 2>"$S/err" >> /proc/self/fd/7; then echo "wrote=$target"
  else echo "write-denied=$target: $(cat "$S/err")"; fi
fi
""",
    evidence=("processes",),
    during=_release_runtime_exe,
    check=_check_runtime_exe)

PROBES = [HELPER_PATHS, RELEASE_AGENT, SYSRQ, MKNOD_KMSG, LEAKED_FD, RUNTIME_EXE]
