"""RPC handlers: each validates what the schema cannot and delegates to a do_* call.

The schemas (kata_py.protocol.messages) have already checked types and bounds
by the time a handler runs.
"""

from __future__ import annotations

import binascii
import os
import socket
import time

from kata_py.protocol import PROTOCOL_VERSION

from . import AGENT_VERSION, credentials, files, seccomp
from .container import Containers
from .network import Network
from .processes import ProcessError, ProcessTable


def _seccomp_filter(profile: dict | None):
    """Compile a container's linux.seccomp before anything of it exists."""
    if profile is None:
        return None
    try:
        return seccomp.build(profile)
    except ValueError as exc:
        raise ProcessError("invalid", f"seccomp: {exc}") from None
    except OSError as exc:  # libseccomp itself could not be loaded
        raise ProcessError("failed", f"seccomp: {exc}") from None


class Handlers:
    def __init__(self, table: ProcessTable, power_off, containers: Containers | None = None,
                 network: Network | None = None, zygote=None) -> None:
        self.table = table
        self.power_off = power_off
        self.containers = containers
        self.zygote = zygote        # zygote.Zygote: a process forked ahead for a container's first one
        # The NIC drivers load with the container modules: the same event says when.
        self.network = network or Network(containers.modules_ready if containers is not None else None)

    def dispatch(self, request_type: str, args: dict) -> dict:
        handler = getattr(self, "rpc_" + request_type)
        return handler(args)

    def rpc_ping(self, args: dict) -> dict:
        return {"agent_version": AGENT_VERSION, "protocol": PROTOCOL_VERSION,
                "kernel": os.uname().release,
                # CLOCK_MONOTONIC: seconds since the guest kernel started, so the
                # host can split its boot time into guest and host parts.
                "uptime": round(time.monotonic(), 6)}

    def rpc_create_process(self, args: dict) -> dict:
        streams = args.get("streams", [])
        if len(set(streams)) != len(streams):
            raise ProcessError("invalid", "a stream is named twice")
        if args.get("tty") and "stderr" in streams:
            raise ProcessError("invalid", "a tty process has no separate stderr")
        cwd = args.get("cwd", "/")
        container_id = args.get("container_id")
        if container_id is None:
            if args.get("init"):
                raise ProcessError("invalid", "init is only meaningful in a container")
            # In a container, cwd is checked inside its root, at start.
            if not os.path.isdir(cwd):
                raise ProcessError("invalid", f"cwd {cwd!r} is not a directory")
        else:
            container = self._containers().get(container_id)
            if args.get("init") and container.init_pid is not None:
                raise ProcessError("state", f"container {container_id!r} already has an init process")
        security = {key: args[key] for key in credentials.KEYS if key in args}
        try:
            credentials.validate(security)
        except ValueError as exc:
            raise ProcessError("invalid", str(exc)) from None
        proc = self.table.create(args["process_id"], args["argv"], args.get("env", []), cwd,
                                 bool(args.get("tty", False)), streams, args.get("rows", 0), args.get("cols", 0))
        proc.container_id = container_id
        proc.init = bool(args.get("init"))
        proc.user = args.get("user")
        proc.security = security
        return {}

    def rpc_create_container(self, args: dict) -> dict:
        seccomp_filter = _seccomp_filter(args.get("seccomp"))
        containers = self._containers()
        if args.get("join"):
            containers.check_join(args, self.table.pidfd)
        container = containers.create(args["container_id"], args["mount_tag"], args, args.get("resources"))
        container.seccomp = seccomp_filter
        return {}

    def rpc_delete_container(self, args: dict) -> dict:
        self._containers().delete(args["container_id"])
        if self.zygote is not None:
            self.zygote.rearm_when_idle()
        return {}

    def rpc_configure_network(self, args: dict) -> dict:
        interfaces = args["interfaces"]
        for field in ("mac", "name"):
            values = [nic[field] for nic in interfaces]
            if len(set(values)) != len(values):
                raise ProcessError("invalid", f"two NICs have the same {field}")
        for nic in interfaces:
            for address in nic.get("addresses", []):
                _check_ip(address["address"], address["prefix_len"])
            for route in nic.get("routes", []):
                families = {_check_ip(route[key], route.get("dst_len", 0) if key == "dst" else None)
                            for key in ("dst", "gateway", "source") if key in route}
                if len(families) > 1:
                    raise ProcessError("invalid", f"route on {nic['name']} mixes IPv4 and IPv6")
                if not families:
                    raise ProcessError("invalid", f"a route on {nic['name']} has no dst, gateway or source")
        configured = self.network.configure(interfaces, args["hosts"], args["resolv_conf"], args.get("hostname", ""))
        return {"interfaces": configured}

    def rpc_update_container(self, args: dict) -> dict:
        containers = self._containers()
        containers.update(containers.get(args["container_id"]), args["resources"])
        return {}

    def rpc_container_stats(self, args: dict) -> dict:
        containers = self._containers()
        return containers.stats(containers.get(args["container_id"]))

    def rpc_list_processes(self, args: dict) -> dict:
        containers = self._containers()
        return {"processes": containers.processes(containers.get(args["container_id"]))}

    def rpc_signal_container(self, args: dict) -> dict:
        containers = self._containers()
        containers.signal_all(containers.get(args["container_id"]), args["signal"])
        return {}

    # -- a container's files and events -------------------------------------------
    def _container_root(self, container_id: str):
        """(container, an O_PATH fd of its init's root) while its init lives."""
        container = self._containers().get(container_id)
        pid = container.init_pid
        with self.table.lock:
            alive = pid is not None and pid in self.table.by_pid
        if not alive:
            raise ProcessError("state", f"container {container_id!r} has no running init process")
        return container, files.open_root(pid)

    def _owner(self, container) -> tuple[int, int] | None:
        """Files the agent makes for a container with a user namespace belong
        to the container's root, not the guest's."""
        if not container.user_namespace:
            return None
        return container.guest_id(0), container.guest_id(0, group=True)

    def rpc_read_file(self, args: dict) -> dict:
        _, root = self._container_root(args["container_id"])
        try:
            data, size, eof = files.read_chunk(self.containers.sys, root, args["path"], args.get("offset", 0),
                                               args["length"])
        finally:
            os.close(root)
        return {"data": binascii.b2a_base64(data, newline=False).decode("ascii"), "size": size, "eof": eof}

    def rpc_write_file(self, args: dict) -> dict:
        try:
            data = binascii.a2b_base64(args["data"])
        except (binascii.Error, ValueError) as exc:
            raise ProcessError("invalid", f"data is not base64: {exc}") from None
        container, root = self._container_root(args["container_id"])
        try:
            files.write_chunk(self.containers.sys, root, args["path"], data, offset=args.get("offset", 0),
                              truncate=bool(args.get("truncate")), mode=args.get("mode", 0o644),
                              parents=bool(args.get("parents")), owner=self._owner(container))
        finally:
            os.close(root)
        return {}

    def rpc_watch_oom(self, args: dict) -> dict:
        """Block until the container's cgroup counts more OOM kills than `seen`
        (its memory.events changes), or until the container is deleted (or
        its cgroup has no memory.events): then `ended`."""
        containers = self._containers()
        container = containers.get(args["container_id"])

        def alive() -> bool:
            with containers.lock:
                return containers.by_id.get(container.id) is container

        count = container.cgroup.wait_count("memory.events", "oom_kill", args.get("seen", 0), alive)
        if count is None:
            return {"oom_kill": args.get("seen", 0), "ended": True}
        return {"oom_kill": count, "ended": False}

    def rpc_prepare_process(self, args: dict) -> dict:
        return {"pid": self._launch(args["process_id"], self.table.prepare)}

    def rpc_start_process(self, args: dict) -> dict:
        proc = self.table.get(args["process_id"])
        if proc.child is not None:  # prepared: set up already, just release it
            return {"pid": self.table.start(proc.id)}
        return {"pid": self._launch(args["process_id"], self.table.start)}

    def _launch(self, process_id: str, launch) -> int:
        """Fork (prepare or start) a process, in its container if it has one."""
        proc = self.table.get(process_id)
        if proc.container_id is None:
            return launch(process_id)
        containers = self._containers()
        container = containers.get(proc.container_id)
        proc.seccomp = container.seccomp  # init and exec alike
        if proc.init:
            # The namespaces it joins are looked up now, when they are entered:
            # their init may have exited since create_container.
            joined = containers.open_joined(container.join, self.table.pidfd)
            setup, cleanup, around_fork = containers.init_setup(container, joined)
            zygote = self.zygote

            def handover():
                return zygote.take(container, proc) if zygote is not None else None
            try:
                pid = launch(process_id, setup=setup, cleanup=cleanup, around_fork=around_fork,
                             write_id_maps=containers.write_id_maps(container), handover=handover)
            finally:
                cleanup()  # the launch may fail before it closes them itself
            container.init_pid = pid
            container.init_process = proc
            return pid
        setup, cleanup, around_fork = containers.join_setup(container)
        return launch(process_id, setup=setup, cleanup=cleanup, around_fork=around_fork)

    def _containers(self) -> Containers:
        if self.containers is None:
            raise ProcessError("invalid", "this agent runs no containers")
        return self.containers

    def rpc_signal_process(self, args: dict) -> dict:
        self.table.signal(args["process_id"], args["signal"])
        return {}

    def rpc_wait_process(self, args: dict) -> dict:
        exit_code, signum = self.table.wait(args["process_id"])
        return {"exit_code": exit_code, "signal": signum}

    def rpc_resize_tty(self, args: dict) -> dict:
        self.table.resize(args["process_id"], args["rows"], args["cols"])
        return {}

    def rpc_shutdown(self, args: dict) -> dict:
        # Reply first; the server powers off once the reply is on the wire.
        return {"_after_reply": self.power_off}


def _check_ip(address: str, prefix_len: int | None) -> int:
    """The address family of a textual IP address, checking it and its prefix length."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        socket.inet_pton(family, address)
    except OSError:
        raise ProcessError("invalid", f"{address!r} is not an IP address") from None
    if prefix_len is not None and prefix_len > (128 if family == socket.AF_INET6 else 32):
        raise ProcessError("invalid", f"{address}/{prefix_len}: prefix too long")
    return family
