"""Runs on a node: removes everything one remote harness run made there, and
says what (if anything) is still left. Standard library only, no package
imports: its source is sent to the node's python3 on stdin, so it works
even when the run's bundle never finished uploading.

What a run makes lives under one private directory (WORK): the bundle,
the harness's work directories (TMPDIR), the runtime's state root and
with it every container. So cleanup is: stop the run's harness process if
it still runs (TERM: it deletes its container on the way out; KILL after
a grace period), `delete --force` every container left in a state root
under WORK, stop anything else whose command line names WORK, detach any
mount under it, remove it, and then look again.

Usage: python3 - '{"work": "/tmp/kata-py-harness-remote.X", "pid": 123, "runtime": "runc"}'
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

PREFIX = "/tmp/kata-py-harness-remote."
GRACE = 30  # seconds a TERMed harness gets to delete its container


def processes_naming(work):
    found = []
    needle = work.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def stop(pids, grace):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def runtime_argv(spec):
    if os.sep in spec:
        return [spec]
    path = shutil.which(spec)
    return [path] if path else None


def state_roots(work):
    """The runtime state roots the harness made: WORK/tmp/kata-py-harness-*/state."""
    tmp = os.path.join(work, "tmp")
    roots = []
    if os.path.isdir(tmp):
        for name in sorted(os.listdir(tmp)):
            state = os.path.join(tmp, name, "state")
            if name.startswith("kata-py-harness-") and os.path.isdir(state) and not os.path.islink(state):
                roots.append(state)
    return roots


def containers(root):
    return sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))


def mounts_under(work):
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == work or point.startswith(work + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def clean(work, pid, runtime):
    done = {"containers_deleted": [], "processes_stopped": [], "left": []}
    work = os.path.normpath(work)
    if not work.startswith(PREFIX) or "/" in work[len(PREFIX):]:
        done["left"].append(f"refused: {work} is not a remote harness directory")
        return done
    if pid and pid in processes_naming(work):
        stop([pid], GRACE)
        done["processes_stopped"].append(pid)
    argv = runtime_argv(runtime) if runtime else None
    for root in state_roots(work):
        for cid in containers(root):
            if argv is None:
                print(f"runtime {runtime} not found: container {cid} cannot be deleted", file=sys.stderr)
                continue
            result = subprocess.run(argv + ["--root", root, "delete", "--force", cid], capture_output=True,
                                    timeout=300)
            if result.returncode == 0:
                done["containers_deleted"].append(cid)
            else:
                print(f"delete {cid}: {result.stderr.decode(errors='replace').strip()[-300:]}", file=sys.stderr)
    undeleted = [f"{root}/{cid}" for root in state_roots(work) for cid in containers(root)]
    if undeleted:
        # Kept, state root and all, for the next cleanup to try again.
        done["left"] += [f"container state {path}" for path in undeleted]
        return done
    stragglers = processes_naming(work)
    if stragglers:
        stop(stragglers, 5)
        done["processes_stopped"] += stragglers
    for point in mounts_under(work):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
    if mounts_under(work):
        # rmtree would walk into a mounted host filesystem: never.
        done["left"] += [f"mount {point}" for point in mounts_under(work)]
    elif os.path.lexists(work):
        shutil.rmtree(work, ignore_errors=True)
    # Look again: what is left is reported, not assumed gone.
    if os.path.lexists(work):
        done["left"].append(f"directory {work}")
    done["left"] += [f"process {p}" for p in processes_naming(work)]
    return done


def main():
    request = json.loads(sys.argv[1])
    print(json.dumps(clean(request["work"], request.get("pid"), request.get("runtime"))), flush=True)


if __name__ == "__main__":
    main()
