"""Fault injection through the OCI CLI: at each stage of a container's life,
kill -9 QEMU, the monitor or the vsock back end, panic the guest (its agent,
PID 1, goes with it), freeze the guest (SIGSTOP QEMU: the agent stops
answering), or fill the disk under --root. Each time:

- `kata-py state` tells the truth: stopped once the VM is gone;
- every CLI call ends, with status 0 or one clear error line (never a
  traceback, never a hang: each is run with a timeout);
- `delete --force` removes everything, which the leak checker verifies
  (processes, mounts, sockets, files, state dirs, temp dirs, taps and tc
  filters in the container's network namespace, cgroups).

A randomized run picks stage x fault with a seed it prints: a few fixed trials
in CI, KATA_PY_FAULT_TRIALS=N (N >= 100 for the long run) for more, and
KATA_PY_FAULT_SEED to replay a run, KATA_PY_FAULT_PLAN=stage:fault,... to
run chosen trials.

How the guest is panicked: the container's createContainer hook (run in the
guest) leaves a watcher that writes `c` to /proc/sysrq-trigger once the test
creates /panic in the rootfs (a 9p share: the guest sees the host's file).
A sysrq crash is a real kernel panic: with panic=-1 and -no-reboot QEMU exits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kata_py.oci.share import sandbox_dir_for
from tests.bundles import make_bundle
from tests.conftest import KATA
from tests.leaks import LeakChecker
from tests.oci_helpers import cli, owned_container

pytestmark = pytest.mark.vm

STAGES = ("booting", "created", "running", "exec", "deleting")
FAULTS = ("kill-qemu", "kill-monitor", "kill-backend", "panic", "hang", "disk-full")
# CI: every fault and every stage at least once, in a few boots. (Not a frozen
# guest during boot: create gives up only at the boot timeout, 60 s.)
CI_TRIALS = [("booting", "kill-qemu"), ("booting", "kill-backend"), ("created", "hang"), ("running", "panic"),
             ("exec", "kill-backend"), ("deleting", "kill-monitor"), ("running", "disk-full")]
CLI_TIMEOUT = 120           # no CLI call may take longer: a hang fails the test
STOPPED_WITHIN = 60.0       # a dead VM reads as stopped once its monitor has noticed
BOOT_WINDOW = 6.0           # booting: the fault lands 0..this many seconds after QEMU starts
ROOT_SIZE = "8m"            # the tmpfs mounted as --root; filled for disk-full

WATCHER = ("(while [ ! -e /panic ]; do sleep 0.2; done; echo c > /proc/sysrq-trigger) "
           "</dev/null >/dev/null 2>&1 &")
INIT = "touch /started; exec sleep 100000"


def assert_clear(result, what: str, allow_ok: bool = True) -> str:
    """Status 0 (if allowed), or status 1 with one error line: never a traceback."""
    err = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    assert "Traceback" not in err, f"{what}: traceback:\n{err}"
    if result.returncode == 0 and allow_ok:
        return ""
    lines = err.strip().splitlines()
    # 255: an exec that failed before its process ran, as runc says it.
    assert result.returncode in (1, 255) and len(lines) == 1 and lines[0].startswith("kata-py: "), \
        f"{what}: status {result.returncode}, stderr {err!r}"
    return lines[0]


def children(pid: int) -> list[tuple[int, bytes]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                found.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes()))
        except (OSError, ValueError, IndexError):
            continue
    return found


def monitor_of(root: Path) -> int | None:
    """The container monitor whose --root is `root` (not an exec monitor)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        owned = owned_container(argv)
        if owned is not None and owned[0] == str(root):
            return int(entry)
    return None


def vm_process(monitor: int, which: str) -> int | None:
    """The monitor's QEMU (not the accelerator probe's: that one has no vsock) or vsock back end."""
    for pid, cmdline in children(monitor):
        argv = cmdline.split(b"\0")
        if which == "qemu" and b"qemu-system" in argv[0] and b"vhost-user-vsock" in cmdline:
            return pid
        if which == "backend" and b"kata_py.vsock" in cmdline:
            return pid
    return None


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def signal_pid(pid: int | None, signum: int) -> None:
    if pid:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class Trial:
    """One container, one fault at one stage, and every check after it."""

    def __init__(self, base: Path, stage: str, fault: str, netns: str | None, container_id: str,
                 delay: float = 0.0) -> None:
        self.base, self.stage, self.fault, self.netns = base, stage, fault, netns
        self.delay = delay          # booting: seconds from QEMU's start to the fault
        self.root = base / "root"
        self.id = container_id
        self.logs = base / "io"
        self.logs.mkdir(parents=True)
        self.root.mkdir()
        # kata-py's temp directory is the trial's own, so the leak checker sees all of it.
        self.tmp = base / "tmp"
        self.tmp.mkdir()
        self.env = dict(os.environ, TMPDIR=str(self.tmp))
        # The --root is a small tmpfs of its own, so that disk-full fills it and only it.
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ROOT_SIZE},mode=0700", "tmpfs", str(self.root)],
                       check=True)
        hook = WATCHER if (stage, fault) != ("booting", "panic") else "echo c > /proc/sysrq-trigger"
        extra = {"hooks": {"createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", hook], "timeout": 60}]}}
        kinds = [{"type": t} for t in ("pid", "mount", "ipc", "uts")]
        if netns:
            kinds.append({"type": "network", "path": f"/run/netns/{netns}"})
        extra["linux"] = {"namespaces": kinds}
        self.bundle = make_bundle(base / "bundle", ["sh", "-c", INIT], **extra)
        self.rootfs = self.bundle / "rootfs"
        self.hung: int | None = None
        self.filler = self.root / "filler"

    def cli(self, *args) -> subprocess.CompletedProcess:
        return cli(self.root, *args, env=self.env, timeout=CLI_TIMEOUT)

    def popen(self, name: str, *args) -> subprocess.Popen:
        """A CLI call left running, its output in files (a create's monitor inherits them)."""
        with open(self.logs / f"{name}.out", "wb") as out, open(self.logs / f"{name}.err", "wb") as err:
            return subprocess.Popen(KATA + ["--root", str(self.root), *map(str, args)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env=self.env)

    def stderr_of(self, name: str) -> bytes:
        return (self.logs / f"{name}.err").read_bytes()

    # -- the faults ------------------------------------------------------------

    def inject(self, monitor: int) -> None:
        if self.fault == "kill-monitor":
            signal_pid(monitor, signal.SIGKILL)
        elif self.fault in ("kill-qemu", "hang"):
            qemu = wait_for(lambda: vm_process(monitor, "qemu"), 60, "QEMU")
            if self.fault == "hang":
                self.hung = qemu
            signal_pid(qemu, signal.SIGKILL if self.fault == "kill-qemu" else signal.SIGSTOP)
        elif self.fault == "kill-backend":
            signal_pid(wait_for(lambda: vm_process(monitor, "backend"), 60, "vsock back end"), signal.SIGKILL)
        elif self.fault == "panic":
            (self.rootfs / "panic").touch()
        elif self.fault == "disk-full":
            self.fill_disk()

    def fill_disk(self) -> None:
        """Write until the tmpfs refuses a single block more."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (1 << 20, 4096, 1):
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)

    def vm_gone(self) -> bool:
        return self.fault in ("kill-qemu", "kill-monitor", "kill-backend", "panic")

    # -- the stages ------------------------------------------------------------

    def create_in_background(self) -> subprocess.Popen:
        return self.popen("create", "create", "--bundle", self.bundle, self.id)

    def create(self) -> int:
        proc = self.create_in_background()
        assert proc.wait(timeout=CLI_TIMEOUT) == 0, self.stderr_of("create")
        return json.loads((self.root / self.id / "state.json").read_text())["pid"]

    def state(self) -> dict | None:
        result = self.cli("state", self.id)
        assert_clear(result, "state")
        return json.loads(result.stdout) if result.returncode == 0 else None

    def wait_stopped(self) -> None:
        deadline = time.monotonic() + STOPPED_WITHIN
        while True:
            state = self.state()
            if state is None or state["status"] == "stopped":
                assert state is None or state["pid"] == 0, state
                return
            assert time.monotonic() < deadline, f"the VM is gone but the container reads {state}"
            time.sleep(0.2)

    def run(self) -> None:
        getattr(self, "stage_" + self.stage)()

    def stage_booting(self) -> None:
        creating = self.create_in_background()
        try:
            monitor = wait_for(lambda: monitor_of(self.root) or creating.poll() is not None, 60, "the monitor")
            assert creating.poll() is None, "create ended before the fault: " + self.stderr_of("create").decode()
            if self.fault != "panic":  # the createContainer hook panics this one
                if self.fault != "kill-monitor":
                    wait_for(lambda: vm_process(monitor, "qemu"), 60, "QEMU")
                # Somewhere in the boot: from QEMU's first instant to about when
                # the agent answers (seconds under TCG).
                time.sleep(self.delay)
                self.inject(monitor)
            status = creating.wait(timeout=CLI_TIMEOUT)
        finally:
            if creating.poll() is None:
                creating.kill()
                creating.wait()
        creating.stderr = self.stderr_of("create")
        line = assert_clear(creating, "create")
        if status != 0:
            assert line and not (self.root / self.id).exists(), "a failed create left its state directory"
            return
        # The fault came after create had finished (or, on a filling disk, it
        # still had room): the container must then show it like any other.
        assert self.fault != "panic", "create succeeded although its guest panicked during it"
        self.after_fault(can_start=True)

    def stage_created(self) -> None:
        self.inject(self.create())
        self.after_fault(can_start=True)

    def start(self) -> None:
        result = self.cli("start", self.id)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: (self.rootfs / "started").exists(), 60, "the container's process")

    def stage_running(self) -> None:
        monitor = self.create()
        self.start()
        self.inject(monitor)
        self.after_fault()

    def stage_exec(self) -> None:
        monitor = self.create()
        self.start()
        execing = self.popen("exec", "exec", self.id, "sh", "-c", "touch /exec-started; exec sleep 100000")
        try:
            wait_for(lambda: (self.rootfs / "exec-started").exists() or execing.poll() is not None, 60, "the exec")
            assert execing.poll() is None, self.stderr_of("exec")
            self.inject(monitor)
            if self.fault in ("hang", "disk-full"):
                # The process still runs (or the guest is frozen): the exec waits
                # for it, as runc's does; delete --force ends it.
                self.after_fault()
                self.delete()
            status = execing.wait(timeout=CLI_TIMEOUT)
        finally:
            if execing.poll() is None:
                execing.kill()
                execing.wait()
        execing.stderr = self.stderr_of("exec")
        assert status != 0, "the exec'd process cannot have exited by itself"
        if status == 128 + signal.SIGKILL and self.fault == "disk-full":
            # delete --force reached the agent: the container's SIGKILL took the
            # exec'd process with it, and exec says so, as runc's would.
            assert execing.stderr == b"", execing.stderr
        else:
            assert_clear(execing, "exec", allow_ok=False)
        if self.fault not in ("hang", "disk-full"):
            self.after_fault()

    def stage_deleting(self) -> None:
        monitor = self.create()
        self.start()
        qemu, backend = vm_process(monitor, "qemu"), vm_process(monitor, "backend")
        deleting = self.popen("delete", "delete", "--force", self.id)
        try:
            if self.fault == "kill-monitor":
                signal_pid(monitor, signal.SIGKILL)
            elif self.fault == "kill-qemu":
                signal_pid(qemu, signal.SIGKILL)
            elif self.fault == "hang":
                signal_pid(qemu, signal.SIGSTOP)
            elif self.fault == "kill-backend":
                signal_pid(backend, signal.SIGKILL)
            else:
                self.inject(monitor)
            deleting.wait(timeout=CLI_TIMEOUT)
        finally:
            if deleting.poll() is None:
                deleting.kill()
                deleting.wait()
        deleting.stderr = self.stderr_of("delete")
        assert_clear(deleting, "delete --force during a fault")
        self.delete()

    # -- after the fault -------------------------------------------------------

    def after_fault(self, can_start: bool = False) -> None:
        """State tells the truth; the caller's next call ends with a clear answer."""
        if self.vm_gone():
            self.wait_stopped()
            line = assert_clear(self.cli("start" if can_start else "exec", self.id, *(
                [] if can_start else ["true"])), "a call on a dead container", allow_ok=False)
            assert "stopped" in line, line
        elif self.fault == "hang":
            # The guest is frozen, its monitor alive: the agent does not answer,
            # and calls give up after their timeouts.
            assert self.state()["status"] in ("created", "running")
            line = assert_clear(self.cli("start" if can_start else "kill", self.id,
                                        *([] if can_start else ["TERM"])),
                                "a call to a frozen guest", allow_ok=False)
            assert "agent" in line or "answer" in line, line
        elif self.fault == "disk-full":
            status = self.state()["status"]
            calls = [["start"]] if can_start else [["pause"], ["resume"], ["exec", "true"]]
            for call in calls:
                result = self.cli(*call, self.id)
                assert_clear(result, " ".join(call) + " on a full disk")
                # What state says is what happened: a call that failed changed nothing.
                new = self.state()["status"]
                if result.returncode != 0:
                    assert new == status, (call, status, new)
                status = new

    def delete(self) -> None:
        result = self.cli("delete", "--force", self.id)
        assert_clear(result, "delete --force", allow_ok=True)
        assert result.returncode == 0, result.stderr
        assert not (self.root / self.id).exists()
        result = self.cli("state", self.id)
        assert result.returncode == 1 and b"does not exist" in result.stderr

    def finish(self) -> None:
        """delete --force (it kills a frozen QEMU with its monitor); the fillers go."""
        try:
            if (self.root / self.id).exists():
                self.delete()
        finally:
            for filler in self.root.glob("filler*"):
                filler.unlink()

    def unmount(self) -> None:
        signal_pid(self.hung, signal.SIGCONT)   # were it still there: no stopped process left
        subprocess.run(["umount", str(self.root)], check=False)


def run_trials(base: Path, plan: list[tuple[str, str]], made_namespaces, use_netns: list[bool],
               delays: list[float], keep_going: bool = False) -> list[str]:
    """Each trial in turn; the failures, as lines (with keep_going, the run goes
    on past them: a long run reports every one at the end)."""
    failures = []
    for number, ((stage, fault), with_netns, delay) in enumerate(zip(plan, use_netns, delays)):
        netns = None
        if with_netns:
            netns = made_namespaces.create()
            made_namespaces.veth(None, f"kpf{os.getpid() % 100000}-{number}"[:15], "10.77.0.1/24", netns, "eth0",
                            "10.77.0.2/24")
        trial = Trial(base / f"t{number}", stage, fault, netns, f"kpf{os.getpid()}-{number}", delay)
        checker = LeakChecker(roots=[trial.root, trial.bundle], netns=[netns] if netns else [], temp_dir=trial.tmp,
                              tokens=[trial.id, sandbox_dir_for(str(trial.root), trial.id).name])
        before = checker.snapshot()
        what = (f"trial {number}: {stage} x {fault}{' (netns)' if netns else ''}"
                f"{f' after {delay:.1f} s' if stage == 'booting' else ''}")
        print(what, end=" ", flush=True)
        started = time.monotonic()
        try:
            try:
                trial.run()
            finally:
                trial.finish()
            checker.assert_clean(before)
            print(f"clean, {time.monotonic() - started:.0f} s", flush=True)
        except Exception as exc:
            print(f"FAILED after {time.monotonic() - started:.0f} s: {exc}", flush=True)
            failures.append(f"{what}: {str(exc)[:2000]}")
            if not keep_going:
                raise
        finally:
            trial.unmount()
            if netns:
                made_namespaces.cleanup()
    return failures


def plan_trials() -> tuple[int, list[tuple[str, str]], list[bool], list[float]]:
    count = int(os.environ.get("KATA_PY_FAULT_TRIALS", "0"))
    seed = int(os.environ.get("KATA_PY_FAULT_SEED", str(random.randrange(1 << 32))))
    rng = random.Random(seed)
    if os.environ.get("KATA_PY_FAULT_PLAN"):  # "stage:fault,stage:fault": these, in order
        plan = [tuple(item.split(":", 1)) for item in os.environ["KATA_PY_FAULT_PLAN"].split(",")]
    elif count:
        pairs = [(s, f) for s in STAGES for f in FAULTS]
        plan = [rng.choice(pairs) for _ in range(count)]
    else:
        plan = list(CI_TRIALS)
    return seed, plan, [rng.random() < 0.25 for _ in plan], [round(rng.uniform(0, BOOT_WINDOW), 1) for _ in plan]


def test_random_faults(tmp_path, namespaces):
    seed, plan, use_netns, delays = plan_trials()
    print(f"fault trials: {len(plan)}, seed {seed} (replay: KATA_PY_FAULT_SEED={seed} "
          f"KATA_PY_FAULT_TRIALS={len(plan)})", flush=True)
    failures = run_trials(tmp_path, plan, namespaces, use_netns, delays,
                          keep_going=bool(os.environ.get("KATA_PY_FAULT_TRIALS")))
    assert not failures, f"{len(failures)} of {len(plan)} trials failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("fault", ["kill-qemu", "kill-backend"])
def test_foreground_run_ends_clearly_when_its_vm_dies(tmp_path, fault):
    """A foreground `run` (podman without --detach, a shell user) whose VM is
    killed under the running container: `run` ends with a non-zero status and
    at most one error line, and, since it deletes what it ran, leaves nothing."""
    root, container_id = tmp_path / "root", f"kpfg{os.getpid()}"
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", INIT])
    root.mkdir()  # kata-py keeps its --root directory, as runc does
    checker = LeakChecker(roots=[root, bundle], temp_dir=tmp_path,
                          tokens=[container_id, sandbox_dir_for(str(root), container_id).name])
    before = checker.snapshot()
    run = subprocess.Popen(KATA + ["--root", str(root), "run", "--bundle", str(bundle), container_id],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (bundle / "rootfs" / "started").exists(), CLI_TIMEOUT, "the container to run")
        monitor = wait_for(lambda: monitor_of(root), 10, "the monitor")
        signal_pid(vm_process(monitor, "qemu" if fault == "kill-qemu" else "backend"), signal.SIGKILL)
        out, err = run.communicate(timeout=CLI_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    result = subprocess.CompletedProcess(run.args, run.returncode, out, err)
    assert result.returncode != 0, result
    if err.strip():
        assert_clear(result, f"foreground run x {fault}", allow_ok=False)
    assert_clear(cli(root, "list", timeout=CLI_TIMEOUT), "list after the run")
    (bundle / "rootfs" / "started").unlink()
    checker.assert_clean(before)
