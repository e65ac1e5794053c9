"""The host kernel and its state: whose kernel the container runs on, what
/proc tells it about the host, host processes (seen, read, signalled),
modules, sysctls, the clock.

Probes that would change the host if they broke take a snapshot at setup
and compare in their check; a change is reported as broken and put back at
once (the changes are small on purpose: a sysctl one higher, the clock
3 s ahead).""" 

from __future__ import annotations

from pathlib import Path

from . import host_state
from .fs_probes import reason
from .probe import (BOOT_ID, MISSING_EVIDENCE, Output, Probe, SkipProbe, Verdict, broke, held, inconclusive,
                    one_line, same_kernel)

# -- whose kernel


def _check_identity(output: Output, host) -> Verdict:
    facts = host.facts
    release = output.value("release")
    if not release:
        return inconclusive("uname -r printed nothing", MISSING_EVIDENCE)
    kernel = same_kernel(output, facts)
    if kernel is None:
        same = release == facts.kernel_release and output.value("version") == facts.kernel_version
        if same:
            return broke(f"same kernel build as the host ({release}); its boot_id could not be read")
        return held(f"uname -r {release}, the host's is {facts.kernel_release}; boot_id unreadable")
    if kernel:
        return broke(f"runs on the host's kernel: uname -r {release}, same boot_id as the host")
    return held(f"a kernel of its own: uname -r {release} (host: {facts.kernel_release}), boot_id differs")


KERNEL_IDENTITY = Probe(
    name="kernel-identity",
    title="run on the host's kernel? (uname -r, and the kernel's boot_id against the host's)",
    script='echo "release=$(uname -r)"\necho "version=$(uname -v)"\n' + BOOT_ID,
    evidence=("release", "version", "boot_id"),
    control="shared-kernel",
    check=_check_identity)


# -- what /proc says about the host


def _check_proc(output: Output, host) -> Verdict:
    facts = host.facts
    leaks = []
    if output.value("cmdline_sha256") == facts.cmdline_sha256:
        leaks.append("its /proc/cmdline is the host kernel's command line")
    for key in ("hostname", "uts"):
        if output.value(key) == facts.hostname:
            leaks.append(f"its hostname is the host's ({facts.hostname})")
            break
    if leaks:
        return broke("; ".join(leaks))
    if len(output.value("cmdline_sha256")) != 64 or not output.value("hostname"):
        return inconclusive("could not read its /proc/cmdline or hostname to compare", MISSING_EVIDENCE)
    return held(one_line(f"/proc/cmdline differs from the host's; hostname {output.value('hostname') or '?'} "
                         f"(host: {facts.hostname})"))


PROC_LEAKS = Probe(
    name="proc-leaks",
    title="the host's kernel command line and hostname through /proc and uname",
    script=r"""
echo "cmdline_sha256=$(sha256sum 2>/dev/null < /proc/cmdline | cut -d' ' -f1)"
echo "hostname=$(hostname)"
echo "uts=$(cat /proc/sys/kernel/hostname 2>/dev/null)"
""",
    evidence=("cmdline_sha256", "hostname"),
    control="shared-kernel",
    check=_check_proc)


# -- host processes

# The marker word is passed in two halves and joined only in the shell's
# memory: no process in the container carries the whole word in its argv.
FIND_MARKER = r"""
n=0; targets=""
for f in /proc/[0-9]*/cmdline; do
  c=$(tr '\0' ' ' 2>/dev/null < "$f") || continue
  n=$((n + 1))
  case "$c" in *"$H_MA$H_MB"*) p=${f#/proc/}; targets="$targets ${p%/cmdline}";; esac
done
echo "processes=$n"
for p in $targets; do echo "found=$p"; done
"""


def _setup_marker(host) -> dict[str, str]:
    word = host.marker().word
    half = len(word) // 2
    return {"H_MA": word[:half], "H_MB": word[half:]}


def _check_pids(output: Output, host) -> Verdict:
    marker = host.marker()
    found = output.values("found")
    if found:
        return broke(f"sees the host's marker process (host pid {marker.pid}) as pid {', '.join(found)}")
    if not output.value("processes").isdigit() or output.value("processes") == "0":
        return inconclusive("saw no process at all, not even its own", MISSING_EVIDENCE)
    return held(f"sees {output.value('processes') or '?'} process(es), none of them the host's marker "
                f"(host pid {marker.pid})")


HOST_PIDS = Probe(
    name="host-pids",
    title="see a host process (a marker with a unique argv word) in the container's /proc",
    setup=_setup_marker,
    script=FIND_MARKER,
    evidence=("processes",),
    check=_check_pids)


def _check_ptrace(output: Output, host) -> Verdict:
    marker = host.marker()
    breaches = []
    if marker.secret in output.text:
        breaches.append("read the host marker's environment (a ptrace read-access check)")
    state = marker.state()
    if state in ("T", "t"):
        breaches.append("stopped the host marker with SIGSTOP")
        marker.resume()
    if breaches:
        return broke(f"{'; '.join(breaches)} (host pid {marker.pid})")
    found = output.values("found")
    if not found:
        return held(f"the host marker (host pid {marker.pid}) is not visible: nothing to attach to or signal; "
                    f"it runs on (state {state})")
    denied = output.values("environ-denied") + output.values("signal-denied")
    if not denied:
        return inconclusive(f"found pid(s) {', '.join(found)} but reported no attempt on them", MISSING_EVIDENCE)
    return held(one_line(f"found pid(s) {', '.join(found)} but " + (reason(denied[0]) if denied else "got nothing")))


PTRACE = Probe(
    name="ptrace-host",
    title="read a host process's environment (ptrace access) and signal it (SIGSTOP)",
    setup=_setup_marker,
    script=FIND_MARKER + r"""
for p in $targets; do
  if out=$(tr '\0' '\n' 2>&1 < "/proc/$p/environ"); then
    echo "environ=$p: $(echo "$out" | grep KATA_PY_HARNESS_SECRET)"
  else echo "environ-denied=$p: $out"; fi
  if kill -STOP "$p" 2>"$S/err"; then echo "signalled=$p"; else echo "signal-denied=$p: $(cat "$S/err")"; fi
done
""",
    evidence=("processes",),
    check=_check_ptrace)


# -- kernel modules


def _setup_modules(host) -> dict[str, str]:
    modules = host_state.loaded_modules()
    if modules is None:
        raise SkipProbe("the host kernel has no loadable modules (no /proc/modules): nothing to load into it, "
                        "no list to compare")
    host.fixtures["kernel-module"] = modules
    host.on_close(lambda: _put_back_modules(modules))  # also when the run is cut short
    module = _spare_module(host.facts.kernel_release)
    if module is None:
        return {"H_MODULE": ""}
    target = host.plant_dir / module.name
    target.write_bytes(module.read_bytes())
    return {"H_MODULE": f"{host.plant}/{module.name}"}


def _spare_module(release: str) -> Path | None:
    """A small host module that is not loaded (dummy.ko), for insmod to try."""
    base = Path("/lib/modules") / release
    loaded = host_state.loaded_modules() or set()
    for pattern in ("dummy.ko*", "tun.ko*"):
        for path in sorted(base.rglob(pattern)) if base.is_dir() else []:
            if path.name.split(".")[0] not in loaded:
                return path
    return None


def _put_back_modules(modules_before: set[str]) -> list[str]:
    """Modules the host loaded since the snapshot, each unloaded again."""
    modules_after = host_state.loaded_modules()
    breaches = []
    if modules_after is not None and modules_after - modules_before:
        new = sorted(modules_after - modules_before)
        breaches.append(f"the host loaded {', '.join(new)}")
        for name in new:
            host_state.unload_module(name)
    return breaches


def _check_modules(output: Output, host) -> Verdict:
    modules_before = host.fixtures["kernel-module"]
    breaches = _put_back_modules(modules_before)
    if breaches:
        return broke("; ".join(breaches) + " (put back)")
    tried = [f"{key}: {reason(output.value(key))}" for key in ("insmod", "modprobe") if output.values(key)]
    return held(one_line(f"the host's {len(modules_before)} modules are unchanged; container: {'; '.join(tried)}"))


KERNEL_MODULE = Probe(
    name="kernel-module",
    title="load a kernel module into the host (insmod of a spare host module, modprobe)",
    setup=_setup_modules,
    script=r"""
if [ -n "$H_MODULE" ]; then
  if out=$(insmod "$H_MODULE" 2>&1); then echo "insmod=loaded"; else echo "insmod=failed: $out"; fi
fi
if out=$(modprobe dummy 2>&1); then echo "modprobe=loaded"; else echo "modprobe=failed: $out"; fi
""",
    evidence=("modprobe",),
    check=_check_modules)


# -- sysctls

SYSCTLS = ("kernel.hostname", "kernel.domainname", "kernel.printk_ratelimit_burst")


def _setup_sysctl(host) -> dict[str, str]:
    before = host.fixtures["sysctl-write"] = {name: host_state.read_sysctl(name) for name in SYSCTLS}
    host.on_close(lambda: _put_back_sysctls(before))
    return {"H_WORD": f"harness-{host.token}"}


def _put_back_sysctls(before: dict[str, str | None]) -> list[str]:
    changed = []
    for name, value in before.items():
        now = host_state.read_sysctl(name)
        if value is not None and now != value:
            changed.append(f"{name} {value!r} -> {now!r}")
            host_state.write_sysctl(name, value)
    return changed


def _check_sysctl(output: Output, host) -> Verdict:
    before = host.fixtures["sysctl-write"]
    changed = _put_back_sysctls(before)
    if changed:
        return broke("the host's " + "; ".join(changed) + " (put back)")
    wrote = output.values("wrote") + (["sethostname"] if output.value("sethostname") == "done" else [])
    denied = output.values("denied") + output.values("sethostname")
    container = (f"wrote {', '.join(wrote)}" if wrote else reason(denied[0]) if denied else "no report")
    shown = ", ".join(f"{name}={value}" for name, value in before.items() if value is not None)
    return held(one_line(f"the host's {shown} unchanged; container: {container}"))


SYSCTL_WRITE = Probe(
    name="sysctl-write",
    title="write /proc/sys (kernel.hostname, kernel.domainname, kernel.printk_ratelimit_burst) and sethostname",
    setup=_setup_sysctl,
    script=r"""
put() { if echo "$2" 2>"$S/err" > "/proc/sys/$1"; then echo "wrote=$1"; else echo "denied=$1: $(cat "$S/err")"; fi; }
put kernel/hostname "$H_WORD"
put kernel/domainname "$H_WORD"
if b=$(cat /proc/sys/kernel/printk_ratelimit_burst 2>/dev/null); then put kernel/printk_ratelimit_burst $((b + 1)); fi
if hostname "$H_WORD" 2>"$S/err"; then echo "sethostname=done"; else echo "sethostname=denied: $(cat "$S/err")"; fi
""",
    evidence=("wrote|denied", "sethostname"),
    check=_check_sysctl)


# -- the clock

CLOCK_STEP_S = 3  # how far the probe sets the clock ahead: small, since under a broken runtime it is the host's
CLOCK_TOLERANCE_S = 1.0  # the step is over 2 s; NTP slews far less than this meanwhile


def _setup_clock(host) -> dict[str, str]:
    before = host.fixtures["clock"] = (host_state.clock_offset(), host_state.clock_tuning())
    host.on_close(lambda: _put_back_clock(*before))
    return {}


def _put_back_clock(offset: float, tuning: tuple[int, int]) -> list[str]:
    breaches = []
    moved = host_state.clock_offset() - offset
    if abs(moved) > CLOCK_TOLERANCE_S:
        breaches.append(f"the host clock moved by {moved:+.1f} s")
        host_state.restore_clock_offset(offset)
    now_tuning = host_state.clock_tuning()
    if now_tuning != tuning:
        breaches.append(f"the host's tick/frequency became {now_tuning} (was {tuning})")
        host_state.set_clock_tuning(*tuning)
    return breaches


def _check_clock(output: Output, host) -> Verdict:
    offset, tuning = host.fixtures["clock"]
    moved = host_state.clock_offset() - offset
    breaches = _put_back_clock(offset, tuning)
    if breaches:
        return broke("; ".join(breaches) + " (put back)")
    tried = [f"{key}: {reason(output.value(key))}" for key in ("date", "adjtimex") if output.values(key)]
    return held(one_line(f"the host clock moved {moved * 1000:+.0f} ms (within {CLOCK_TOLERANCE_S:.0f} s), "
                         f"tick/frequency {tuning} unchanged; container: {'; '.join(tried) or 'no report'}"))


CLOCK = Probe(
    name="clock",
    title=f"set the clock (date -s +{CLOCK_STEP_S} s) and its tick (adjtimex -t)",
    setup=lambda host: {**_setup_clock(host), "H_STEP": str(CLOCK_STEP_S)},
    script=r"""
now=$(date +%s)
# busybox date reports a refused settimeofday on stderr but exits 0
date -s "@$((now + H_STEP))" >/dev/null 2>"$S/err"
if [ -s "$S/err" ]; then echo "date=denied: $(cat "$S/err")"; else echo "date=set"; fi
if adjtimex -t 10001 >/dev/null 2>"$S/err"; then echo "adjtimex=set"; else echo "adjtimex=denied: $(cat "$S/err")"; fi
""",
    evidence=("date", "adjtimex"),
    check=_check_clock)

PROBES = [KERNEL_IDENTITY, PROC_LEAKS, HOST_PIDS, PTRACE, KERNEL_MODULE, SYSCTL_WRITE, CLOCK]
