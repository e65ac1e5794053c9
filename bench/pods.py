"""Pods through the CRI: start, second container and per-pod memory, kata-py's
shim v2 (handler `kata-py`, one VM per pod) next to runc's (handler `runc`) and
the runc shim driving kata-py's CLI (handler `kata-py-runc`, one VM per
container), interleaved round by round (the order rotated each round).

The node is the one the CRI and shim tests use, imported from the tests
package (tests/cri_node.py, unchanged): containerd 1.6 with its CRI plugin in
a private network namespace, contrib/containerd/config.toml as shipped with a
private CNI bridge merged in, busybox and pause images built locally and
imported, driven only over the CRI's gRPC API (`cri_api`), as kubelet drives
it. The bench gives it a private KATA_PY_RUN_DIR, and puts this checkout's
.venv/bin first on the PATH containerd inherits, so that containerd runs this
checkout's `containerd-shim-kata-py-v2` whatever /usr/local/bin links to (the
`kata-py-runc` handler's BinaryName is an absolute path, /usr/local/bin/
kata-py: the kata-py it resolves to is reported).

Per round and handler, one pod:
  pod start         RunPodSandbox + CreateContainer + StartContainer of one
                    busybox container (`sleep 1000`), each call timed
  memory            after SETTLE seconds idle, PSS (/proc/PID/smaps_rollup) of
                    every host process of the pod, SAMPLES samples a second
                    apart (the run's figure: their median). kata-py: its shim
                    daemon (argv holds kata_py.shim.main and the node's
                    socket), its QEMU (kata-py-pod-<id>) and the vsock back
                    end, with their children. runc and kata-py-runc: the runc
                    shim of the pod and everything under it (pause and the
                    container; kata-py-runc: each container's monitor, QEMU and
                    back end, reparented to the shim, a subreaper).
  second container  CreateContainer + StartContainer of a second `sleep 1000`
                    in the running pod (kata-py-runc refuses it: the pod's
                    network is carried by the first container's VM; that is
                    reported, not failed)
  teardown          StopContainer (timeout 0) of both, StopPodSandbox,
                    RemovePodSandbox; then nothing of the pod may be left (its
                    processes, a shim of the node, a QEMU named after it, a tap
                    in the node's namespace, its network namespace, the shim's
                    run directory, a runc state directory): what is found is
                    reported as a leftover, and fails the section.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path

from .common import KATA, REPO, summary
from .memory import SAMPLE_INTERVAL, SAMPLES, SETTLE, _tree, pss_by_kind

HANDLERS = ("kata-py", "runc", "kata-py-runc")
SHIM_BINARY = "containerd-shim-kata-py-v2"
LEFTOVER_WAIT = 30.0
# kata-py-runc's answer to a pod's second workload container (kata_py's CLI, through the runc shim).
REFUSED = "is carried by another kata-py VM already"
PSS_KINDS = ("shim", "qemu", "vsock_backend", "monitor", "containers")
QEMU_PARTS = ("qemu_anon", "qemu_shmem", "qemu_file")
GUARDIAN_TITLE = b"kata-py shim guardian"


# ---------------------------------------------------------------- processes

def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_shim(argv: list[bytes], socket: bytes) -> bool:
    return bool(argv) and socket in argv and (b"kata_py.shim.main" in argv
                                              or argv[0].endswith(b"containerd-shim-runc-v2"))


def _kind(argv: list[bytes]) -> str:
    line = b" ".join(argv)
    if (b"kata_py.shim.main" in argv or b"containerd-shim" in (argv[0] if argv else b"")
            or line.startswith(GUARDIAN_TITLE)):
        return "shim"       # the shim daemon, and its guardian (kata_py/shim/leftovers.py)
    if b"qemu-system" in line:
        return "qemu"
    if b"kata_py.vsock" in line:
        return "vsock_backend"
    if b"kata_py.sandbox.owner" in line or b"kata_py.sandbox.relay" in line:
        return "monitor"
    return "containers"         # pause, the containers' processes (runc); anything else under the shim


def pod_processes(node, pod_id: str) -> dict[int, list[bytes]]:
    """Every host process of the pod (one pod at a time on the node): the
    node's shims, a QEMU named after the pod, and their children."""
    socket = str(node.socket).encode()
    qemu_name = f"kata-py-pod-{pod_id[:32]}".encode()
    roots = []
    for pid in _pids():
        argv = _argv(pid)
        line = b" ".join(argv)
        if _is_shim(argv, socket) or (b"qemu-system" in line and qemu_name in line):
            roots.append(pid)
    return {p: _argv(p) for p in {p for root in roots for p in _tree(root)}}


def pod_pss(processes: dict[int, list[bytes]]) -> dict:
    """PSS in MiB of the pod's processes, by kind, with the total."""
    return pss_by_kind(((pid, _kind(argv)) for pid, argv in processes.items()),
                       {kind: 0.0 for kind in PSS_KINDS})


# ---------------------------------------------------------------- one pod

def _timed(call) -> tuple[object, float]:
    began = time.monotonic()
    value = call()
    return value, time.monotonic() - began


def _leftovers(node, handler: str, pod_id: str, containers: list[str], seen: dict[int, list[bytes]],
               netns_path: str | None) -> list[str]:
    """What of the pod is still there once it is removed (waited for up to LEFTOVER_WAIT s)."""
    from kata_py.shim.main import shim_dir

    def remaining() -> list[str]:
        found = [f"process {pid}: {b' '.join(argv).decode(errors='replace')[:120]}"
                 for pid, argv in seen.items() if argv and _argv(pid) == argv]
        found += [f"process {pid} (new): {b' '.join(argv).decode(errors='replace')[:120]}"
                  for pid, argv in pod_processes(node, pod_id).items() if pid not in seen]
        found += [f"tap {tap}" for tap in node.taps()]
        if netns_path and os.path.exists(netns_path):
            found.append(f"network namespace {netns_path}")
        found += [f"runc state {entry}" for entry in node.runc_root_entries([pod_id, *containers])]
        if handler == "kata-py" and shim_dir().exists():
            found += [f"shim run directory entry {p}" for p in shim_dir().iterdir()]
        return found

    deadline = time.monotonic() + LEFTOVER_WAIT
    while True:
        found = remaining()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def one_pod(node, handler: str, name: str, settle: float, out: dict) -> None:
    """Start, sample, grow and remove one pod; its figures and leftovers go
    into `out` as they come (what was measured stays there if a step fails)."""
    import grpc
    from cri_api.v1 import api_pb2

    from tests.cri_node import RPC_TIMEOUT

    config = node.pod_config(name)
    pod_id = None
    containers: list[str] = []
    seen: dict[int, list[bytes]] = {}
    netns_path = None
    try:
        reply, out["run_pod_sandbox_s"] = _timed(lambda: node.runtime.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=RPC_TIMEOUT))
        pod_id = reply.pod_sandbox_id
        node.pod_ids.add(pod_id)
        first, out["create_s"] = _timed(lambda: node.create_container(pod_id, config, "first", ["sleep", "1000"]))
        containers.append(first)
        _, out["start_s"] = _timed(lambda: node.start_container(first))
        out["pod_start_s"] = out["run_pod_sandbox_s"] + out["create_s"] + out["start_s"]
        netns_path = node.pod_netns_path(pod_id)        # untimed: for teardown and the leftover check
        if netns_path:
            node.pod_netns.add(netns_path)

        time.sleep(settle)
        samples = []
        for i in range(SAMPLES):
            if i:
                time.sleep(SAMPLE_INTERVAL)
            processes = pod_processes(node, pod_id)
            seen.update(processes)
            samples.append(pod_pss(processes))
        keys = sorted({k for s in samples for k in s})
        out["pss_mib"] = {k: statistics.median([s.get(k, 0.0) for s in samples]) for k in keys}
        out["processes"] = len(processes)
        out["qemus"] = sum(1 for argv in processes.values() if _kind(argv) == "qemu")
        shim_python = [argv[0].decode(errors="replace") for argv in processes.values()
                       if b"kata_py.shim.main" in argv]
        if shim_python:
            out["shim_interpreter"] = shim_python[0]

        second, out["second_create_s"] = _timed(lambda: node.create_container(pod_id, config, "second",
                                                                              ["sleep", "1000"]))
        containers.append(second)
        try:
            _, out["second_start_s"] = _timed(lambda: node.start_container(second))
        except grpc.RpcError as exc:
            if handler != "kata-py-runc" or REFUSED not in (exc.details() or ""):
                raise
            # Documented on this path (README): the pod's network namespace is
            # carried by its first workload container's VM; a second is refused
            # when its task is created (StartContainer).
            del out["second_create_s"]
            out["second_refused"] = re.sub(r"/proc/\d+/", "/proc/PID/", exc.details())[:300]
            return
        out["second_container_s"] = out["second_create_s"] + out["second_start_s"]
        seen.update(pod_processes(node, pod_id))
    finally:
        if pod_id is not None:
            began = time.monotonic()
            problems = []
            try:
                for container in containers:
                    node.stop_container(container, timeout=0, rpc_timeout=60)
                node.stop_pod(pod_id, rpc_timeout=120)
                node.remove_pod(pod_id, rpc_timeout=120)
            except grpc.RpcError as exc:
                problems.append(f"teardown: {exc.code().name}: {exc.details()}")
                problems += node.remove_everything(retry=True)
            out["teardown_s"] = time.monotonic() - began
            out["leftovers"] = problems + _leftovers(node, handler, pod_id, containers, seen, netns_path)


# ---------------------------------------------------------------- the section

def _runc_binary_name() -> str | None:
    from tests.cri_node import CONTRIB_CONFIG

    runtimes = tomllib.loads(CONTRIB_CONFIG.read_text())["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
        "runtimes"]
    return ((runtimes.get("kata-py-runc") or {}).get("options") or {}).get("BinaryName")


def _usable(handlers: list[str]) -> tuple[list[str], dict]:
    """The handlers that can run here, and what each drives."""
    notes: dict = {}
    usable = []
    for handler in handlers:
        if handler == "kata-py":
            found = shutil.which(SHIM_BINARY)
            if found is None:
                notes[handler] = f"unavailable: {SHIM_BINARY} is not on PATH (make setup)"
                continue
            notes[handler] = f"{found} -> {os.path.realpath(found)}"
        elif handler == "runc":
            found = shutil.which("runc")
            if found is None:
                notes[handler] = "unavailable: runc is not installed"
                continue
            notes[handler] = f"containerd-shim-runc-v2 + {found}"
        elif handler == "kata-py-runc":
            binary = _runc_binary_name()
            if not binary or not os.access(binary, os.X_OK):
                notes[handler] = f"unavailable: its BinaryName {binary} is missing (ci/setup.sh links it)"
                continue
            real = os.path.realpath(binary)
            notes[handler] = f"containerd-shim-runc-v2 + {binary} -> {real}"
            if not real.startswith(str(REPO) + "/"):
                notes[handler] += " (not this checkout)"
        usable.append(handler)
    return usable, notes


def _ratio(a: dict, b: dict) -> float | None:
    if a.get("runs") and b.get("runs") and b["median"]:
        return round(a["median"] / b["median"], 2)
    return None


def measure(runs: int, handlers: list[str] | tuple[str, ...] = HANDLERS, settle: float = SETTLE) -> dict:
    began = time.monotonic()
    saved = {key: os.environ.get(key) for key in ("KATA_PY_RUN_DIR", "PATH")}
    run_dir = Path(f"/run/kata-py-bench-pods-{os.getpid()}")
    os.environ["KATA_PY_RUN_DIR"] = str(run_dir)
    os.environ["PATH"] = f"{KATA.parent}:{saved['PATH'] or '/usr/sbin:/usr/bin:/sbin:/bin'}"
    result: dict = {"runs": runs, "settle_s": settle, "pss_samples": SAMPLES}
    leftovers: list[str] = []
    failures: list[str] = []
    try:
        from kata_py.shim import protos
        from tests.cri_node import NETNS_DIR, Node, mounts_under
        from tests.engines import leftover_processes

        protos.build()          # as ci/setup.sh does: compiled once, never inside a timed start
        usable, notes = _usable(list(handlers))
        result["handlers"] = notes
        records: dict[str, list[dict]] = {h: [] for h in usable}
        node = Node()
        try:
            setup = time.monotonic()
            node.start()
            node.import_images()
            result["node_setup_s"] = round(time.monotonic() - setup, 1)
            for round_no in range(runs):
                order = usable[round_no % len(usable):] + usable[:round_no % len(usable)]
                for handler in order:
                    name = f"bench-{handler}-{round_no}"
                    print(f"bench: pods: {name}", flush=True, file=sys.stderr)
                    record: dict = {"handler": handler}
                    records[handler].append(record)
                    try:
                        one_pod(node, handler, name, settle, record)
                    except Exception as exc:    # keep what was measured; the section reports it
                        details = exc.details() if hasattr(exc, "details") else str(exc)
                        failures.append(f"{name}: {type(exc).__name__}: {details}"[:600])
                    leftovers += [f"{name}: {item}" for item in record.get("leftovers", [])]
        finally:
            node.stop()
            leftovers += [f"after the node: {item}" for item in leftover_processes()]
            if (NETNS_DIR / node.netns).exists():
                leftovers.append(f"after the node: network namespace {node.netns}")
            leftovers += [f"after the node: mount {m}" for m in mounts_under([node.directory])]
        result.update(summarise(records))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for directory in (run_dir / "shim", run_dir):
            try:
                directory.rmdir()
            except OSError:
                pass
    result["leftovers"] = leftovers
    result["failures"] = failures
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


FIGURES = ("pod_start_s", "run_pod_sandbox_s", "create_s", "start_s", "second_container_s", "second_create_s",
           "second_start_s", "teardown_s")


def summarise(records: dict[str, list[dict]]) -> dict:
    out: dict = {name: {} for name in FIGURES}
    out["pss_mib"] = {}
    out["qemus_per_pod"] = {}
    for handler, rows in records.items():
        for name in FIGURES:
            out[name][handler] = summary([r[name] for r in rows if name in r], 3)
        kinds = [k for k in (*PSS_KINDS, *QEMU_PARTS, "total") if any(r.get("pss_mib", {}).get(k) for r in rows)]
        out["pss_mib"][handler] = {k: summary([r["pss_mib"][k] for r in rows if "pss_mib" in r], 1) for k in kinds}
        out["qemus_per_pod"][handler] = sorted({r["qemus"] for r in rows if "qemus" in r})
        refused = sorted({r["second_refused"] for r in rows if "second_refused" in r})
        if refused:
            out.setdefault("second_container_refused", {})[handler] = refused
        interpreters = sorted({r["shim_interpreter"] for r in rows if "shim_interpreter" in r})
        if interpreters:
            out.setdefault("shim_interpreter", interpreters)
    ratios = {}
    for handler in records:
        if handler == "runc" or "runc" not in records:
            continue
        ratios[handler] = {
            "pod_start": _ratio(out["pod_start_s"][handler], out["pod_start_s"]["runc"]),
            "second_container": _ratio(out["second_container_s"][handler], out["second_container_s"]["runc"]),
            "pss": _ratio(out["pss_mib"][handler].get("total", {}), out["pss_mib"]["runc"].get("total", {})),
        }
    out["over_runc"] = ratios
    out["per_pod"] = [{k: (round(v, 3) if isinstance(v, float) else
                           {kk: round(vv, 1) for kk, vv in v.items()} if k == "pss_mib" else v)
                       for k, v in r.items()} for rows in records.values() for r in rows]
    return out
