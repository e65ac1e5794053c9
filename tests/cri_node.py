"""A Kubernetes node in miniature for the CRI tests: containerd 1.6 with its CRI
plugin, running inside a network namespace of the test's own, with kata-py's
runtime handlers exactly as contrib/containerd/config.toml ships them (`kata-py`:
its shim v2; `kata-py-runc`: the runc shim driving its CLI), a bridge + host-local CNI network private to that namespace, and the
busybox and pause images built locally. It is driven only over the CRI's gRPC
API (`cri_api`), as kubelet drives it.

Nothing is made in the host's network namespace: the bridge, the pods' veths
and the gateway address live in the node namespace, and each pod's namespace
is one containerd makes under /run/netns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

from tests.engines import IMAGE, Podman, image_tar, kata_binary, leftover_processes

REPO = Path(__file__).resolve().parent.parent
CONTRIB_CONFIG = REPO / "contrib" / "containerd" / "config.toml"
HANDLER = "kata-py-runc"     # the runc shim driving kata-py's CLI
# kata-py's shim v2 (one VM per pod): the handler the shipped RuntimeClass names.
RUNTIME_CLASS = REPO / "contrib" / "kubernetes" / "runtimeclass.yaml"
SHIM_HANDLER = re.search(r"^handler: *(\S+)", RUNTIME_CLASS.read_text(), re.M).group(1)
PAUSE_IMAGE = "localhost/pause:kata-py"
NAMESPACE = "k8s.io"
# The runc shim's runtime root for the CRI's namespace (no `Root` option is set).
RUNC_ROOT = Path("/run/containerd/runc") / NAMESPACE
SUBNET = "10.88.77.0/24"
GATEWAY = "10.88.77.1"
BRIDGE = "kpcri0"
TAP_PREFIX = "kp-tap"
NETNS_DIR = Path("/run/netns")
# The pause container: sleeps until told to stop, and stops at once when told
# (a pid namespace's init has no default action for SIGTERM).
PAUSE_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]
RPC_TIMEOUT = 180


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(table: dict, prefix: tuple[str, ...] = ()) -> str:
    """A TOML document for nested tables of strings, numbers, booleans and lists."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = ""
    if lines or not prefix:
        header = f"[{'.'.join(_toml_key(p) for p in prefix)}]\n" if prefix else ""
        out = header + "".join(line + "\n" for line in lines) + "\n"
    for key, value in table.items():
        if isinstance(value, dict):
            out += to_toml(value, prefix + (key,))
    return out


def containerd_config(directory: Path, cni_dir: Path) -> dict:
    """The shipped CRI handler config with this node's private paths merged in.

    Composed here rather than with containerd's `imports`: containerd 1.6
    merges an imported file's plugin section over the importing one and drops
    the importer's sub-tables of that plugin (the private `cni` table would be
    lost to the defaults /opt/cni/bin and /etc/cni/net.d, the host's)."""
    shipped = tomllib.loads(CONTRIB_CONFIG.read_text())
    private = {
        "version": 2,
        "root": str(directory / "root"),
        "state": str(directory / "state"),
        "grpc": {"address": str(directory / "containerd.sock")},
        "ttrpc": {"address": str(directory / "containerd.sock.ttrpc")},
        "debug": {"level": "debug"},
        "plugins": {
            "io.containerd.grpc.v1.cri": {
                "disable_tcp_service": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "cni": {"bin_dir": "/usr/lib/cni", "conf_dir": str(cni_dir), "max_conf_num": 1},
            },
            # Its default would create /opt/containerd on the host.
            "io.containerd.internal.v1.opt": {"path": str(directory / "opt")},
        },
    }
    return _merge(shipped, private)


def cni_conflist(ipam_dir: Path) -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "kpt-cri",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(ipam_dir), "ranges": [[{"subnet": SUBNET}]],
                     "routes": [{"dst": "0.0.0.0/0"}]},
        }],
    }


def _ipr(netns: str | None):
    from pyroute2 import IPRoute

    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


def links_in(netns: str) -> list[str]:
    with _ipr(netns) as ipr:
        return sorted(m.get_attr("IFLA_IFNAME") for m in ipr.get_links())


def cni_namespaces() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir() if p.name.startswith("cni-")}
    except FileNotFoundError:
        return set()


def addresses_in_netns_path(path: str) -> list[str]:
    """IPv4 addresses in the namespace bound at `path` (empty when it is not one)."""
    from pyroute2 import IPRoute

    try:
        with IPRoute(netns=path, flags=0) as ipr:
            return [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(family=2)]
    except Exception:   # gone, or not a namespace: nothing of ours in it
        return []


def mounts_under(paths) -> list[str]:
    prefixes = [str(p).rstrip("/") + "/" for p in paths]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4].replace("\\040", " ")
        if any(mountpoint.startswith(p) or mountpoint + "/" == p for p in prefixes):
            found.append(mountpoint)
    return found


def unmount_under(directory: Path) -> None:
    """Every mount at or below `directory`, deepest first."""
    for _ in range(5):
        found = mounts_under([directory])
        if not found:
            return
        for mountpoint in sorted(set(found), key=lambda m: m.count("/"), reverse=True):
            if subprocess.run(["umount", mountpoint], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", mountpoint], capture_output=True)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """The first truthy value of predicate(), polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Node:
    """containerd + CRI in a private network namespace. `start()` brings it up,
    `stop()` takes down everything the node and its pods made."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="kpt-cri-"))
        self.netns = f"kpt-cri-{os.getpid()}"
        self.socket = self.directory / "containerd.sock"
        self.config_path = self.directory / "config.toml"
        self.log_path = self.directory / "containerd.log"
        self.pods_dir = self.directory / "pods"
        self.proc: subprocess.Popen | None = None
        self.channel = None
        self.runtime = None
        self.images = None
        # Everything a pod was seen to hold, for teardown when a test failed halfway.
        self.pod_ids: set[str] = set()
        self.container_ids: set[str] = set()
        self.pod_netns: set[str] = set()
        self.abandoned: set[str] = set()
        # The runc shim's root directories this node made (deepest first), removed when left empty.
        self.made_dirs = [d for d in (RUNC_ROOT, RUNC_ROOT.parent) if not d.exists()]

    # -- bringing it up --------------------------------------------------

    def start(self) -> None:
        from pyroute2 import netns

        netns.create(self.netns)
        with _ipr(self.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        cni_dir = self.directory / "cni"
        cni_dir.mkdir()
        (cni_dir / "10-kpt-cri.conflist").write_text(json.dumps(cni_conflist(self.directory / "ipam"), indent=1))
        self.pods_dir.mkdir()
        self.config_path.write_text(to_toml(containerd_config(self.directory, cni_dir)))
        self._launch()

    def _launch(self) -> None:
        log = open(self.log_path, "ab")
        # nsenter --net only: `ip netns exec` would remount /sys, hiding the
        # host's cgroup mounts from containerd and its shims.
        self.proc = subprocess.Popen(["nsenter", f"--net={NETNS_DIR / self.netns}", "containerd", "--config",
                                      str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 60, 0.1, "containerd's socket")
        assert self.proc.poll() is None, "containerd exited:\n" + self.log_tail()
        self._connect()
        wait_for(self._ready, 60, 0.2, "the CRI's RuntimeReady and NetworkReady")

    def restart_containerd(self) -> None:
        """containerd SIGKILLed and started again on the same state, as a
        node's supervisor would: its shims live on, and it reconnects to them."""
        self.proc.kill()
        self.proc.wait()
        if self.channel is not None:
            self.channel.close()
        self.socket.unlink(missing_ok=True)
        self._launch()

    def _connect(self) -> None:
        import grpc
        from cri_api.v1 import api_pb2_grpc

        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def _ready(self) -> bool:
        from cri_api.v1 import api_pb2

        status = self.runtime.Status(api_pb2.StatusRequest(), timeout=10).status
        return all(c.status for c in status.conditions) and len(status.conditions) >= 2

    def config_dump(self) -> str:
        dump = subprocess.run(["containerd", "--config", str(self.config_path), "config", "dump"],
                              capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        return dump.stdout

    def ctr(self, *args, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "-a", str(self.socket), "-n", NAMESPACE, *map(str, args)],
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def import_images(self) -> None:
        """busybox (the workloads) and the pause image (the sandboxes), built
        from Debian's busybox-static: podman import -> OCI archive -> ctr import."""
        work = self.directory / "images"
        work.mkdir()
        tar = image_tar(work)
        podman = Podman(work / "podman")
        try:
            for name, changes in ((IMAGE, []), (PAUSE_IMAGE, ["--change", "CMD " + json.dumps(PAUSE_CMD)])):
                made = podman("import", *changes, tar, name)
                assert made.returncode == 0, made.stderr
                archive = work / (name.rsplit(":", 1)[0].rsplit("/", 1)[1] + ".tar")
                saved = podman("save", "--format", "oci-archive", "-o", archive, name)
                assert saved.returncode == 0, saved.stderr
                imported = self.ctr("images", "import", "--base-name", name.rsplit(":", 1)[0], archive)
                assert imported.returncode == 0, imported.stderr
        finally:
            podman.cleanup()
            shutil.rmtree(work, ignore_errors=True)

    def image_present(self, name: str) -> bool:
        from cri_api.v1 import api_pb2

        reply = self.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=name)),
                                        timeout=30)
        return bool(reply.image.id)

    # -- pods and containers, through the CRI only -----------------------

    def pod_config(self, name: str, cgroup_parent: str = ""):
        from cri_api.v1 import api_pb2

        log_dir = self.pods_dir / name
        log_dir.mkdir(exist_ok=True)
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}-{os.getpid()}", namespace="kpt",
                                                attempt=0),
            hostname=name,
            log_directory=str(log_dir),
            labels={"kpt": "cri"},
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER,
                                                              ipc=api_pb2.POD))),
        )

    def run_pod(self, name: str, handler: str = HANDLER, cgroup_parent: str = ""):
        """RunPodSandbox with a kata-py handler; returns (pod id, config)."""
        from cri_api.v1 import api_pb2

        config = self.pod_config(name, cgroup_parent)
        reply = self.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                           timeout=RPC_TIMEOUT)
        self.pod_ids.add(reply.pod_sandbox_id)
        path = self.pod_netns_path(reply.pod_sandbox_id)
        if path:
            self.pod_netns.add(path)
        return reply.pod_sandbox_id, config

    def pod_status(self, pod_id: str, verbose: bool = False):
        from cri_api.v1 import api_pb2

        return self.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                                             verbose=verbose), timeout=30)

    def pod_info(self, pod_id: str) -> dict:
        """containerd's verbose sandbox info: its pid, runtime spec, netns path..."""
        return json.loads(self.pod_status(pod_id, verbose=True).info.get("info", "{}"))

    def pod_netns_path(self, pod_id: str) -> str | None:
        """The pod's network namespace, from the runtime spec containerd gave its sandbox."""
        for ns in self.pod_info(pod_id).get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network":
                return ns.get("path")
        return None

    def create_container(self, pod_id: str, pod_config, name: str, command: list[str]) -> str:
        from cri_api.v1 import api_pb2

        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name, attempt=0),
            image=api_pb2.ImageSpec(image=IMAGE),
            command=command,
            log_path=f"{name}.log",
            linux=api_pb2.LinuxContainerConfig(
                security_context=api_pb2.LinuxContainerSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER,
                                                              ipc=api_pb2.POD))),
        )
        reply = self.runtime.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=RPC_TIMEOUT)
        self.container_ids.add(reply.container_id)
        return reply.container_id

    def start_container(self, container_id: str) -> None:
        from cri_api.v1 import api_pb2

        self.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=RPC_TIMEOUT)

    def container_status(self, container_id: str):
        from cri_api.v1 import api_pb2

        return self.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id),
                                            timeout=30).status

    def stop_container(self, container_id: str, timeout: int = 10, rpc_timeout: float | None = None) -> None:
        from cri_api.v1 import api_pb2

        self.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=timeout),
                                   timeout=rpc_timeout or timeout + 50)

    def remove_container(self, container_id: str, rpc_timeout: float = 60) -> None:
        from cri_api.v1 import api_pb2

        self.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id), timeout=rpc_timeout)

    def stop_pod(self, pod_id: str, rpc_timeout: float = 60) -> None:
        from cri_api.v1 import api_pb2

        self.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=rpc_timeout)

    def remove_pod(self, pod_id: str, rpc_timeout: float = 60) -> None:
        from cri_api.v1 import api_pb2

        self.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=rpc_timeout)

    # -- what is left ------------------------------------------------------

    def log_tail(self, lines: int = 40, only_errors: bool = False) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no containerd log)"
        if only_errors:
            text = [line for line in text if "level=error" in line or "level=warn" in line]
        return "\n".join(text[-lines:])

    def taps(self) -> list[str]:
        return [name for name in links_in(self.netns) if name.startswith(TAP_PREFIX)]

    def bridge_ports(self) -> list[str]:
        """Links enslaved to the node's bridge: one host-side veth per pod."""
        with _ipr(self.netns) as ipr:
            bridge = ipr.link_lookup(ifname=BRIDGE)
            if not bridge:
                return []
            return sorted(m.get_attr("IFLA_IFNAME") for m in ipr.get_links() if m.get_attr("IFLA_MASTER") == bridge[0])

    def runc_root_entries(self, ids) -> list[str]:
        return [str(RUNC_ROOT / i) for i in ids if (RUNC_ROOT / i).exists()]

    def our_cni_namespaces(self, before: set[str]) -> list[str]:
        """cni-* namespaces made since `before` that hold an address of this
        node's subnet (other engines on this machine make cni-* namespaces too)."""
        prefix = SUBNET.rsplit(".", 1)[0] + "."
        return sorted(name for name in cni_namespaces() - before
                      if any(a.startswith(prefix) for a in addresses_in_netns_path(str(NETNS_DIR / name))))

    # -- taking it down ------------------------------------------------------

    def remove_everything(self, retry: bool = False) -> list[str]:
        """Every container and pod through the CRI; returns what failed. What
        failed once is left alone afterwards (each test reports its own)
        unless `retry`."""
        import grpc
        from cri_api.v1 import api_pb2

        if self.runtime is None:
            return []
        try:
            containers = self.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
            pods = self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
        except grpc.RpcError as exc:
            return [f"listing: {exc.code().name}: {exc.details()}"]
        problems = []
        # Short deadlines: a runtime that never reports an exit would hold
        # each call for as long as it is given.
        for kind, items, steps in (("container", containers, (lambda i: self.stop_container(i, 0, 20),
                                                              lambda i: self.remove_container(i, 20))),
                                   ("pod", pods, (lambda i: self.stop_pod(i, 20), lambda i: self.remove_pod(i, 20)))):
            for item in items:
                if item.id in self.abandoned and not retry:
                    continue
                for step in steps:
                    try:
                        step(item.id)
                    except grpc.RpcError as exc:
                        problems.append(f"{kind} {item.id[:12]}: {exc.code().name}: {exc.details()}")
                        self.abandoned.add(item.id)
        return problems

    def force_remove(self) -> None:
        """What the CRI could not remove: tasks and containers through ctr,
        then the runtime's own `delete --force` for anything with state left."""
        if self.proc is not None and self.proc.poll() is None:
            for task in self.ctr("tasks", "ls", "-q", timeout=60).stdout.decode().split():
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, timeout=60)
                self.ctr("tasks", "delete", "--force", task, timeout=60)
            for container in self.ctr("containers", "ls", "-q", timeout=60).stdout.decode().split():
                self.ctr("containers", "rm", container, timeout=60)
        for container_id in self.container_ids | self.pod_ids:
            if (RUNC_ROOT / container_id).exists():
                subprocess.run([kata_binary(), "--root", str(RUNC_ROOT), "delete", "--force", container_id],
                               capture_output=True, timeout=120)

    def stop(self) -> None:
        """Take down everything, whatever state a failed test left it in."""
        from pyroute2 import netns

        if self.proc is not None and self.proc.poll() is None:
            self.remove_everything(retry=True)
        self.force_remove()
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_our_shims()
        for path in self.pod_netns:
            if os.path.exists(path):
                subprocess.run(["umount", path], capture_output=True)
                try:
                    os.unlink(path)
                except OSError:
                    pass
        unmount_under(self.directory)
        if (NETNS_DIR / self.netns).exists():
            netns.remove(self.netns)
        # Never recurse through a mount that would not go.
        if not mounts_under([self.directory]):
            shutil.rmtree(self.directory, ignore_errors=True)
        for made in self.made_dirs:
            try:
                made.rmdir()        # only when empty: others may use it by now
            except OSError:
                pass

    def _kill_our_shims(self) -> None:
        """Shims that outlived their tasks (they carry this node's socket)."""
        needle = str(self.socket).encode()
        for pid in processes_where(lambda _, argv: needle in argv and (
                argv[0].endswith(b"containerd-shim-runc-v2") or b"kata_py.shim.main" in argv)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def processes_where(matches) -> dict[int, list[bytes]]:
    """{pid: argv} of each process whose argv (a list of bytes) `matches`."""
    found = {}
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            argv = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and matches(proc, argv):
            found[int(proc)] = argv
    return found


def described(processes: dict[int, list[bytes]]) -> list[str]:
    """'PID: command line' of each, for an assertion's message."""
    return [f"{pid}: {b' '.join(argv).decode(errors='replace')[:160]}" for pid, argv in processes.items()]


@contextlib.contextmanager
def running_node():
    """A started node with the images imported, for a test module; once it is
    stopped, nothing of it may be left: no kata-py process, no network
    namespace, no mount under its directory."""
    made = Node()
    try:
        made.start()
        made.import_images()
        yield made
    finally:
        made.stop()
    assert leftover_processes() == []
    assert not (NETNS_DIR / made.netns).exists()
    assert mounts_under([made.directory]) == []
