"""Fork and memory bombs. Each runs in an exec of its own: once the bomb is
at full size the script prints `@@ready` and waits; the harness checks,
meanwhile, that the host can still fork and allocate, then lets the script
kill the bomb. Both bombs are bounded by construction (2047 processes, 512
MiB), so a runtime that enforces no limit shows "broke" rather than taking
the host down."""

from __future__ import annotations

from .host_state import describe_responsiveness, host_responsiveness
from .probe import MISSING_EVIDENCE, Output, Probe, Verdict, broke, held, inconclusive, one_line

FORK_BOMB_SIZE = 2047  # processes when nothing stops it: a binary tree 11 levels deep

# Processes are counted by their process group, read from /proc/N/stat with
# shell builtins only: once the bomb is at its limit, the script cannot fork.
# `read -t 1` on stdin (which the harness keeps open and quiet) is its sleep.
# `cg_file CONTROLLER FILE` sets f to the container's own cgroup file, cgroup
# v1 or v2, with or without a cgroup namespace (then /proc/self/cgroup gives
# the path below the mount).
CGROUP_FILE = r"""
cg_file() {
  f=""
  while IFS=: read -r id controllers path; do
    case "$controllers" in
      "") candidates="/sys/fs/cgroup$path/$2 /sys/fs/cgroup/$2";;
      *"$1"*) candidates="/sys/fs/cgroup/$1$path/$2 /sys/fs/cgroup/$1/$2";;
      *) continue;;
    esac
    for candidate in $candidates; do [ -r "$candidate" ] && { f=$candidate; return; }; done
  done < /proc/self/cgroup
}
"""

FORK_BOMB = CGROUP_FILE + r"""
limit=none
cg_file pids pids.max && [ -n "$f" ] && read limit < "$f"
echo "pids_max=$limit"
count_bomb() {
  c=0
  for d in /proc/[0-9]*; do
    read -r l 2>/dev/null < "$d/stat" || continue
    set -- ${l##*) }
    [ "$3" = "$pg" ] && [ "$1" != Z ] && c=$((c + 1))
  done
}
# A node whose fork is refused dies ("can't fork" is fatal to ash) and says so on stderr.
setsid sh -c 'b() { if [ "$1" -gt 0 ]; then b $(($1 - 1)) & b $(($1 - 1)) & fi; exec sleep 300; }; b 10' \
  >/dev/null 2>"$S/bomb.err" &
pg=$!
prev=-1; same=0; i=0
while [ $i -lt 60 ] && [ $same -lt 3 ]; do
  read -t 1 x
  count_bomb
  if [ $c -eq $prev ]; then same=$((same + 1)); else same=0; fi
  prev=$c; i=$((i + 1))
done
echo "bomb_peak=$c"
echo "@@ready"
read -t 120 go
i=0
while [ $i -lt 60 ]; do
  kill -9 -$pg 2>/dev/null
  count_bomb
  [ $c -eq 0 ] && break
  read -t 1 x
  i=$((i + 1))
done
echo "bomb_left=$c"
echo "forks_refused=$(grep -c "can't fork" "$S/bomb.err")"
"""


def _check_fork_bomb(output: Output, host) -> Verdict:
    measured = host.during.get("fork-bomb")
    peak = output.value("bomb_peak")
    if measured is None or not peak.isdigit() or int(peak) == 0:
        return inconclusive(one_line(f"the bomb did not report a size above 0: {output.text[-200:]}"),
                            MISSING_EVIDENCE)
    limit = output.value("pids_max") or "none"
    if not measured["ok"]:
        return broke(f"{describe_responsiveness(measured)} while {peak} bomb processes ran")
    if int(peak) >= FORK_BOMB_SIZE:
        return broke(f"the bomb grew to its full {peak} processes: no limit stopped it (pids.max {limit})")
    left = output.value("bomb_left") or "?"
    refused = output.value("forks_refused") or "?"
    if not refused.isdigit() or int(refused) == 0:
        return inconclusive(one_line(f"the bomb peaked at {peak} of {FORK_BOMB_SIZE} processes, but no fork was "
                                     f"refused: nothing shows a limit stopped it (pids.max {limit})"),
                            MISSING_EVIDENCE)
    return held(one_line(f"pids.max {limit} refused {refused} forks, the bomb peaked at {peak} of its "
                         f"{FORK_BOMB_SIZE} processes; {describe_responsiveness(measured)}; {left} left after kill"))


FORK_BOMB_PROBE = Probe(
    name="fork-bomb",
    title=f"a fork bomb (bounded at {FORK_BOMB_SIZE} processes) is stopped by the container's pids limit",
    script=FORK_BOMB,
    during=lambda host: host_responsiveness(),
    check=_check_fork_bomb,
    evidence=("pids_max", "bomb_peak", "bomb_left", "forks_refused"),
    control="unlimited",
    timeout=240)

MEMORY_BOMB_BYTES = 512 << 20

MEMORY_BOMB = CGROUP_FILE + r"""
limit=none
cg_file memory memory.max
[ -z "$f" ] && cg_file memory memory.limit_in_bytes
[ -n "$f" ] && read limit < "$f"
echo "memory_max=$limit"
awk -v cap=$H_CAP 'BEGIN { s = "x"; while (length(s) < cap) s = s s; print "bomb_completed=" length(s) }' &
bomb=$!
echo "@@ready"
read -t 120 go
wait $bomb
echo "bomb_status=$?"
cg_file memory memory.events
[ -z "$f" ] && cg_file memory memory.oom_control
[ -n "$f" ] && grep -E '^oom_kill ' "$f" | sed 's/ /=/'
"""


def _check_memory_bomb(output: Output, host) -> Verdict:
    measured = host.during.get("memory-bomb")
    status = output.value("bomb_status")
    if measured is None or not status.isdigit():
        return inconclusive(one_line(f"the bomb did not report how it ended: {output.text[-200:]}"),
                            MISSING_EVIDENCE)
    limit = output.value("memory_max") or "none"
    if output.values("bomb_completed"):
        return broke(f"the bomb allocated its full {MEMORY_BOMB_BYTES >> 20} MiB: no limit stopped it "
                     f"(memory limit {limit})")
    if not measured["ok"]:
        return broke(f"{describe_responsiveness(measured)} while the bomb ran")
    ooms = output.value("oom_kill")
    if status != "137" and not (ooms.isdigit() and int(ooms) > 0):
        # awk failing for a reason of its own is no proof of a limit
        return inconclusive(one_line(f"the bomb ended with status {status} and no OOM kill was counted: nothing "
                                     f"shows the memory limit stopped it: {output.text[-160:]}"), MISSING_EVIDENCE)
    how = "killed (SIGKILL)" if status == "137" else f"ended with status {status}"
    if limit.isdigit():
        limit = f"{int(limit) / (1 << 20):.0f} MiB"
    return held(one_line(f"the bomb was {how} under the memory limit {limit}"
                         + (f" (oom_kill {ooms})" if ooms else "") + f"; {describe_responsiveness(measured)}"))


MEMORY_BOMB_PROBE = Probe(
    name="memory-bomb",
    title=f"a memory bomb (bounded at {MEMORY_BOMB_BYTES >> 20} MiB) is stopped by the container's memory limit",
    setup=lambda host: {"H_CAP": str(MEMORY_BOMB_BYTES)},
    script=MEMORY_BOMB,
    during=lambda host: host_responsiveness(),
    check=_check_memory_bomb,
    evidence=("memory_max", "bomb_status"),
    control="unlimited",
    timeout=180)

PROBES = [FORK_BOMB_PROBE, MEMORY_BOMB_PROBE]
