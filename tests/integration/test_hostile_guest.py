"""The host against a hostile guest agent (agent/kata_agent/hostile.py, on only
with `kata_agent.hostile=<mode>` on the guest kernel's command line).

Each misbehaviour must end in a clear, typed error (ProtocolError,
AgentTimeout, VMLaunchError: KataErrors, never a traceback or a hang: every
call runs under an outer bound well above its own timeout), and the host must
stay bounded in memory (RSS of this process, which plays the monitor's part,
and of the vsock back end) and leave no busy loop behind. One guest in
`select` mode serves every per-request misbehaviour; the boot-time modes
(panic, mute) boot their own.

Malformed virtqueue descriptors cannot be written from guest user space (the
rings live in kernel memory, and the guest kernel's /dev/mem is restricted):
the host's virtqueue walker is covered by the property tests in
tests/unit/test_fuzz_virtqueue.py and test_vsock_virtqueue.py instead.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kata_py.errors import AgentError, AgentTimeout, ProtocolError, VMLaunchError
from kata_py.sandbox import agent_sync
from kata_py.sandbox import process as process_module
from kata_py.sandbox import sandbox as sandbox_module
from kata_py.sandbox.agent_client import AgentClient
from kata_py.sandbox.process import ProcessSession
from tests.conftest import KATA

pytestmark = pytest.mark.vm

TRIGGER = "kata-agent-hostile"      # agent/kata_agent/hostile.py
SELECT = ["kata_agent.hostile=select"]
RSS_BOUND_KIB = 48 * 1024           # growth allowed per misbehaviour: far below what an unbounded read would take
QUIET_WINDOW = 1.5                  # seconds in which a back end left idle must be (nearly) idle
QUIET_CPU = 0.5                     # CPU seconds allowed in that window
REQUEST_TIMEOUT = 4.0
FLOOD_MIB = 8                      # relayed by the container flood test (~1 MiB/s under TCG on a loaded host)
FIGURES: list[str] = []
ids = itertools.count()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """RSS and CPU of this process and of the sandbox's vsock back end around one misbehaviour."""

    def __init__(self, sandbox, what: str) -> None:
        self.backend = sandbox.transport.proc.pid
        self.what = what
        self.started = time.monotonic()
        self.rss = (rss_kib(os.getpid()), rss_kib(self.backend))
        self.cpu = cpu_seconds(self.backend)

    def check(self) -> None:
        host, backend = rss_kib(os.getpid()) - self.rss[0], rss_kib(self.backend) - self.rss[1]
        busy = cpu_seconds(self.backend) - self.cpu
        # Left alone, the back end must go quiet: no busy loop left behind.
        quiet_from = cpu_seconds(self.backend)
        time.sleep(QUIET_WINDOW)
        quiet = cpu_seconds(self.backend) - quiet_from
        FIGURES.append(f"{self.what:<28} host RSS {host:+7d} KiB, back end RSS {backend:+7d} KiB "
                       f"(now {rss_kib(self.backend)} KiB), back end CPU {busy:5.2f} s during, "
                       f"{quiet:4.2f} s in the {QUIET_WINDOW} s after, {time.monotonic() - self.started:5.1f} s")
        assert host < RSS_BOUND_KIB and backend < RSS_BOUND_KIB, FIGURES[-1]
        assert quiet < QUIET_CPU, FIGURES[-1]


@pytest.fixture(scope="module")
def hostile(module_vms):
    sandbox = module_vms.start(kernel_args=SELECT)
    yield sandbox
    print("\nhostile guest figures:\n  " + "\n  ".join(FIGURES))


def still_serves(loop_thread, sandbox) -> None:
    """A fresh control connection is answered: the misbehaviour cost the host nothing lasting."""
    async def ping():
        client = await AgentClient.connect(sandbox.transport, timeout=30)
        try:
            return await client.request("ping", timeout=30)
        finally:
            await client.close()
    assert loop_thread.run(ping(), timeout=90)["protocol"]


def trigger(how: str, *params, streams=()) -> dict:
    return {"process_id": f"hostile-{next(ids)}", "argv": [TRIGGER, how, *map(str, params)], "env": [],
            "cwd": "/", "streams": list(streams)}


async def misbehave(sandbox, how: str, *params, timeout: float = REQUEST_TIMEOUT):
    """One request that the agent answers with `how`, on a connection of its own."""
    client = await AgentClient.connect(sandbox.transport, timeout=30)
    try:
        return await client.request("create_process", trigger(how, *params), timeout=timeout)
    finally:
        await client.close()


@pytest.mark.parametrize("how,error,says", [
    ("oversize", ProtocolError, "limit"),
    ("invalid-json", ProtocolError, "not valid JSON"),
    ("bad-utf8", ProtocolError, "not UTF-8"),
    ("deep-json", ProtocolError, "nested too deeply"),
    ("huge-int", ProtocolError, "not valid JSON"),
    ("not-object", ProtocolError, "not an object"),
    ("bad-schema", ProtocolError, "invalid create_process reply"),
    ("wrong-id", ProtocolError, "never sent"),
    ("flood-replies", ProtocolError, "never sent"),
    ("never-reply", AgentTimeout, "did not answer create_process"),
    ("drip", AgentTimeout, "did not answer create_process"),
])
def test_bad_replies_end_in_a_clear_error(hostile, loop_thread, how, error, says):
    meter = Meter(hostile, how)
    with pytest.raises(error) as caught:
        # The outer bound is far above the request's own timeout: reaching it is a hang.
        loop_thread.run(misbehave(hostile, how), timeout=REQUEST_TIMEOUT + 30)
    assert says in str(caught.value), caught.value
    meter.check()
    still_serves(loop_thread, hostile)


@pytest.mark.parametrize("how,error,says", [
    ("oversize", ProtocolError, "limit"),
    ("bad-schema", ProtocolError, "invalid create_process reply"),
    ("drip", AgentTimeout, "did not answer create_process"),
])
def test_bad_replies_to_the_cli_client(hostile, how, error, says):
    """The blocking client of the short CLI commands (start, kill, ps, delete...)."""
    meter = Meter(hostile, f"{how} (sync client)")
    result: list = []

    def call() -> None:
        try:
            agent_sync.request(hostile.transport, "create_process", trigger(how), timeout=REQUEST_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - handed to the test below
            result.append(exc)
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(REQUEST_TIMEOUT + 30)
    assert not caller.is_alive(), "the request outlived its timeout by 30 s: a hang"
    assert len(result) == 1 and isinstance(result[0], error) and says in str(result[0]), result
    meter.check()


def test_garbage_stream_ack(hostile, loop_thread):
    meter = Meter(hostile, "stream-bad-ack")
    with open(os.devnull, "wb") as sink:
        session = ProcessSession(hostile, [TRIGGER, "stream-bad-ack"], stdin_fd=None, stdout_fd=sink.fileno(),
                                 stderr_fd=sink.fileno())
        with pytest.raises(ProtocolError, match="bad answer attaching"):
            loop_thread.run(session.create(), timeout=60)
    meter.check()
    still_serves(loop_thread, hostile)


class Sink:
    """The read end of a pipe, drained and counted by a thread: the host's stdout."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.count = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while data := os.read(self.read_fd, 1 << 16):
            self.count += len(data)

    def close(self) -> None:
        os.close(self.write_fd)
        self.thread.join(10)
        os.close(self.read_fd)


@pytest.mark.parametrize("flood_on", [0, 1], ids=["then-silent", "after-exit-too"])
def test_stdout_flood(hostile, loop_thread, monkeypatch, flood_on):
    """Zeros on stdout for 2 s, then an exit whose stream never closes (silent,
    or flooding on): the relay is cut DRAIN_IDLE after the last data or
    DRAIN_LIMIT after the exit (both shortened here), and the status comes back."""
    monkeypatch.setattr(process_module, "DRAIN_IDLE", 3.0)
    monkeypatch.setattr(process_module, "DRAIN_LIMIT", 6.0)
    meter = Meter(hostile, f"stream-flood {'on' if flood_on else 'silent'}")
    sink = Sink()
    try:
        session = ProcessSession(hostile, [TRIGGER, "stream-flood", "2", str(flood_on)], stdin_fd=None,
                                 stdout_fd=sink.write_fd, stderr_fd=None)

        async def run():
            await session.create()
            await session.start()
            return await session.relay_and_wait()
        status = loop_thread.run(run(), timeout=120)
    finally:
        sink.close()
    assert status == 0
    assert sink.count > 1 << 18, sink.count   # the flood did flow: the bound is not from reading nothing
    FIGURES.append(f"  (relayed {sink.count / (1 << 20):.1f} MiB)")
    meter.check()
    still_serves(loop_thread, hostile)


def test_thousands_of_guest_connections(hostile, loop_thread):
    """3000 guest->host connections to a port nobody serves, then 1100 held to
    one the test serves: the back end caps what it holds and stays bounded."""
    dead_port, live_port, held = 5000, 5001, 1100
    path = f"{hostile.transport.uds_path}_{live_port}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    meter = Meter(hostile, "connect-flood")
    try:
        loop_thread.run(misbehave(hostile, "connect-flood", dead_port, 3000, live_port, held, 5, timeout=240),
                        timeout=300)
        peak = len(accepted)
        FIGURES.append(f"  (connect-flood: the host accepted {peak} of {held} held connections)")
        assert 0 < peak <= 1024          # kata_py.vsock's max_connections
        time.sleep(6)                    # the guest lets go of them
    finally:
        stop.set()
        acceptor.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
        os.unlink(path)
    meter.check()
    still_serves(loop_thread, hostile)


def test_panic_on_request(hostile, loop_thread):
    """PID 1 dies mid-request (a kernel panic): the caller gets an AgentError at
    once, QEMU exits (panic=-1, -no-reboot), nothing hangs. Last: it ends the guest."""
    with pytest.raises(AgentError, match="connection closed"):
        loop_thread.run(misbehave(hostile, "panic", timeout=60), timeout=90)
    assert loop_thread.run(hostile.machine.wait(60), timeout=90) is not None


def test_panic_at_boot(vms):
    with pytest.raises(VMLaunchError) as caught:
        vms.start(kernel_args=["kata_agent.hostile=panic"])
    assert "exited before its agent was ready" in str(caught.value)
    assert "sysrq" in caught.value.console_tail.lower() or "panic" in caught.value.console_tail.lower()


def test_mute_agent_at_boot(vms, monkeypatch):
    """An agent that takes connections and never answers, not even ping: the
    boot gives up at its timeout (shortened here) with a clear error."""
    monkeypatch.setattr(sandbox_module, "BOOT_TIMEOUT", 20.0)
    with pytest.raises(VMLaunchError, match="did not answer within 20 s") as caught:
        vms.start(kernel_args=["kata_agent.hostile=mute"])
    # On a loaded host the guest may not even have got as far as listening;
    # when it did, it was the mute agent that kept quiet.
    if "listening on vsock" in caught.value.console_tail:
        assert "hostile mode 'mute'" in caught.value.console_tail


def test_container_stdout_flood_through_the_monitor(tmp_path):
    """A container whose process writes zeros to stdout as fast as it can: the
    monitor (which relays it) and the back end stay bounded in memory while
    FLOOD_MIB go through, and kill + delete still work."""
    from kata_py.oci.share import sandbox_dir_for
    from tests.bundles import make_bundle
    from tests.integration.test_faults import monitor_of, vm_process
    from tests.leaks import LeakChecker
    from tests.oci_helpers import cli

    root = tmp_path / "root"
    bundle = make_bundle(tmp_path / "bundle", ["cat", "/dev/zero"])
    checker = LeakChecker(roots=[root, bundle], tokens=["flood1", sandbox_dir_for(str(root), "flood1").name])
    before = checker.snapshot()
    running = subprocess.Popen(KATA + ["--root", str(root), "run", "--bundle", str(bundle), "flood1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relayed, samples = 0, []
    try:
        while relayed < FLOOD_MIB << 20:
            data = running.stdout.read1(1 << 20)
            assert data, running.stderr.read()
            relayed += len(data)
            if not samples or relayed >= (len(samples) * FLOOD_MIB // 4) << 20:
                monitor = monitor_of(root)
                samples.append((relayed >> 20, rss_kib(monitor), rss_kib(vm_process(monitor, "backend"))))
        assert cli(root, "kill", "flood1", "KILL").returncode == 0
        while running.stdout.read1(1 << 20):
            pass
        assert running.wait(timeout=60) == 137
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
        cli(root, "delete", "--force", "flood1")
    FIGURES.append("container stdout flood via the monitor (MiB relayed, monitor RSS KiB, back end RSS KiB): "
                   + ", ".join(map(str, samples)))
    print(FIGURES[-1])
    first, last = samples[1], samples[-1]   # from a quarter on: start-up allocations are done
    assert last[1] - first[1] < RSS_BOUND_KIB and last[2] - first[2] < RSS_BOUND_KIB, samples
    checker.assert_clean(before)
