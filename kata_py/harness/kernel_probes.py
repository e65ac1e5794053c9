"""The host kernel and its state: whose kernel the container runs on, what
/proc tells it about the host, host processes (seen, read, signalled),
modules, sysctls, the clock.

Probes that would change the host if they broke take a snapshot at setup
and compare in their check; a change is reported as broken and put back at
once (the changes are small on purpose: a nonexistent modprobe helper, a
sysctl one higher, the clock 30 s ahead)."""

from __future__ import annotations

from pathlib import Path

from . import host_state
from .fs_probes import reason
from .probe import BOOT_ID, Output, Probe, Verdict, broke, held, one_line, same_kernel

# -- whose kernel


def _check_identity(output: Output, host) -> Verdict:
    facts = host.facts
    release = output.value("release") or "?"
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
    return held(f"sees {output.value('processes') or '?'} process(es), none of them the host's marker "
                f"(host pid {marker.pid})")


HOST_PIDS = Probe(
    name="host-pids",
    title="see a host process (a marker with a unique argv word) in the container's /proc",
    setup=_setup_marker,
    script=FIND_MARKER,
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
    check=_check_ptrace)


# -- kernel modules


def _setup_modules(host) -> dict[str, str]:
    before = host.fixtures["kernel-module"] = (host_state.loaded_modules(), host_state.read_sysctl("kernel.modprobe"))
    host.on_close(lambda: _put_back_modules(*before))  # also when the run is cut short
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


def _put_back_modules(modules_before: set[str] | None, helper_before: str | None) -> list[str]:
    """What changed on the host since the snapshot, each put back."""
    modules_after = host_state.loaded_modules()
    breaches = []
    if modules_before is not None and modules_after is not None and modules_after - modules_before:
        new = sorted(modules_after - modules_before)
        breaches.append(f"the host loaded {', '.join(new)}")
        for name in new:
            host_state.unload_module(name)
    helper_after = host_state.read_sysctl("kernel.modprobe")
    if helper_after != helper_before:
        breaches.append(f"the host's kernel.modprobe became {helper_after!r}")
        if helper_before is not None:
            host_state.write_sysctl("kernel.modprobe", helper_before)
    return breaches


def _check_modules(output: Output, host) -> Verdict:
    modules_before, helper_before = host.fixtures["kernel-module"]
    breaches = _put_back_modules(modules_before, helper_before)
    if breaches:
        return broke("; ".join(breaches) + " (put back)")
    host_side = ("the host kernel has no loadable modules (no /proc/modules)" if modules_before is None
                 else f"the host's {len(modules_before)} modules are unchanged")
    if helper_before is not None:
        host_side += ", kernel.modprobe unchanged"
    tried = [f"{key}: {reason(output.value(key))}" for key in ("insmod", "modprobe", "modprobe-sysctl")
             if output.values(key)]
    return held(one_line(f"{host_side}; container: {'; '.join(tried) or 'no report'}"))


KERNEL_MODULE = Probe(
    name="kernel-module",
    title="load a kernel module (insmod, modprobe) or redirect the module helper (/proc/sys/kernel/modprobe)",
    setup=_setup_modules,
    script=r"""
if [ -n "$H_MODULE" ]; then
  if out=$(insmod "$H_MODULE" 2>&1); then echo "insmod=loaded"; else echo "insmod=failed: $out"; fi
fi
if out=$(modprobe dummy 2>&1); then echo "modprobe=loaded"; else echo "modprobe=failed: $out"; fi
if [ -e /proc/sys/kernel/modprobe ]; then
  if echo "$H_PLANT/no-such-helper" 2>"$S/err" > /proc/sys/kernel/modprobe; then echo "modprobe-sysctl=written"
  else echo "modprobe-sysctl=denied: $(cat "$S/err")"; fi
else echo "modprobe-sysctl=absent"; fi
""",
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
    check=_check_sysctl)


# -- the clock

CLOCK_TOLERANCE_S = 5.0  # the probe moves the clock 30 s; NTP slews far less than this meanwhile


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
    title="set the clock (date -s +30 s) and its tick (adjtimex -t)",
    setup=_setup_clock,
    script=r"""
now=$(date +%s)
# busybox date reports a refused settimeofday on stderr but exits 0
date -s "@$((now + 30))" >/dev/null 2>"$S/err"
if [ -s "$S/err" ]; then echo "date=denied: $(cat "$S/err")"; else echo "date=set"; fi
if adjtimex -t 10001 >/dev/null 2>"$S/err"; then echo "adjtimex=set"; else echo "adjtimex=denied: $(cat "$S/err")"; fi
""",
    check=_check_clock)

PROBES = [KERNEL_IDENTITY, PROC_LEAKS, HOST_PIDS, PTRACE, KERNEL_MODULE, SYSCTL_WRITE, CLOCK]
