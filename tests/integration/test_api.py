"""kata_py's public API on real TCG guests: several containers in one
sandbox (one VM, one owner process), their isolation from one another
except for the network they share, files, one-shot runs, timeouts, pushed
events, and what is left when a sandbox closes or its owner, its QEMU or
its client dies: nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kata_py
from kata_py.sandbox import record as records
from tests.bundles import make_rootfs
from tests.conftest import RUN_DIR
from tests.leaks import LeakChecker

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
LATENCY = {}        # what the event tests measured, printed at the end of the module


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    """Three busybox root filesystems: a container's own files are its own."""
    base = tmp_path_factory.mktemp("api")
    return {name: str(make_rootfs(base / name)) for name in ("a", "b", "c")}


@pytest.fixture(scope="module")
def sb(image):
    with kata_py.Sandbox(memory="256M", cpus=1) as sandbox:
        yield sandbox
    print(f"\nevent latencies (s): {json.dumps(LATENCY)}")


def _tokens(sandbox) -> list[str]:
    return [records.vm_dir(sandbox.id).name, records.sandbox_dir(sandbox.id).name]


def _checker(*sandboxes) -> LeakChecker:
    return LeakChecker(tokens=[t for s in sandboxes for t in _tokens(s)])


def _gone(sandbox) -> None:
    for path in (records.sandbox_dir(sandbox.id), records.vm_dir(sandbox.id)):
        assert not path.exists(), f"{path} left behind: {list(path.iterdir())}"


def _next(stream, match, timeout=30.0) -> kata_py.Event:
    deadline = time.monotonic() + timeout
    while True:
        event = stream.get(max(0.01, deadline - time.monotonic()))
        if match(event):
            return event


def test_two_containers_share_the_network_only(sb, rootfs):
    a = sb.create_container("a", rootfs=rootfs["a"], args=["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/www"])
    b = sb.create_container("b", rootfs=rootfs["b"], env={"WHO": "bee"})
    a.put_file("/www/index.html", b"served by a\n")
    a.start()
    b.start()
    # B reaches A's server on the loopback they share (httpd may still be starting).
    for _ in range(50):
        got = b.exec(["wget", "-qO-", "http://127.0.0.1:8080/index.html"], timeout=20)
        if got.exit_code == 0:
            break
        time.sleep(0.1)
    assert got.exit_code == 0 and got.stdout == b"served by a\n", got
    probe = ["sh", "-c", "hostname; for n in net mnt pid; do readlink /proc/self/ns/$n; done; "
                         "echo \"$WHO\"; ps -o pid,args"]
    seen = {}
    for c in (a, b):
        result = c.exec(probe, timeout=20)
        assert result.exit_code == 0, result
        host, net, mnt, pid, who, *ps = result.stdout.decode().splitlines()
        seen[c.name] = {"host": host, "net": net, "mnt": mnt, "pid": pid, "who": who, "ps": "\n".join(ps)}
    assert seen["a"]["host"] == "a" and seen["b"]["host"] == "b"
    assert seen["a"]["net"] == seen["b"]["net"]
    assert seen["a"]["mnt"] != seen["b"]["mnt"] and seen["a"]["pid"] != seen["b"]["pid"]
    assert seen["b"]["who"] == "bee" and seen["a"]["who"] == ""
    # Each is PID 1 of its own pid namespace and sees none of the other's processes.
    assert "1 httpd" in seen["a"]["ps"] and "sleep" not in seen["a"]["ps"], seen["a"]["ps"]
    assert "1 sleep" in seen["b"]["ps"] and "httpd" not in seen["b"]["ps"], seen["b"]["ps"]
    # A mount made in A (a privileged exec may mount) stays in A.
    made = a.exec(["sh", "-c", "mkdir -p /mnt && mount -t tmpfs t /mnt && echo x > /mnt/only-a && ls /mnt"],
                  privileged=True, timeout=20)
    assert made.stdout == b"only-a\n", made
    assert b.exec(["sh", "-c", "mkdir -p /mnt; ls -A /mnt; grep -c ' /mnt ' /proc/mounts"],
                  timeout=20).stdout == b"0\n"
    # Without `privileged`, a container cannot mount (nor reconfigure the network all share).
    assert b.exec(["mount", "-t", "tmpfs", "t", "/mnt"], timeout=20).exit_code != 0
    assert b.exec(["ip", "link", "set", "lo", "down"], timeout=20).exit_code != 0
    # One exits, the other runs on.
    a.kill()
    ended = a.wait(timeout=30)
    assert ended.signal == signal.SIGKILL and ended.status == 137
    assert b.exec(["true"], timeout=20).exit_code == 0
    with pytest.raises(kata_py.ContainerExited):
        a.exec(["true"])
    assert {c.name: c.status for c in sb.containers()} == {"a": "stopped", "b": "running"}
    a.delete()
    b.delete()
    assert sb.containers() == []


def test_put_and_get_files_as_the_container_sees_them(sb, rootfs):
    c = sb.create_container("files", rootfs=rootfs["c"])
    c.start()
    data = os.urandom(1_300_000)        # several agent chunks
    c.put_file("/data/in.bin", data)
    assert c.get_file("/data/in.bin") == data
    c.put_file("/data/text", "hello files\n")
    assert c.exec(["sh", "-c", "tr a-z A-Z < /data/text > /data/out"], timeout=20).exit_code == 0
    assert c.get_file("/data/out") == b"HELLO FILES\n"
    # /dev/shm is a tmpfs of the container's own mount namespace: not on the host.
    c.put_file("/dev/shm/mem", b"in memory")
    assert c.exec(["cat", "/dev/shm/mem"], timeout=20).stdout == b"in memory"
    assert not (Path(rootfs["c"]) / "dev" / "shm" / "mem").exists()
    # A symlink the container plants resolves inside its root, never the guest's.
    c.exec(["sh", "-c", "ln -s ../../../../../init /data/up; ln -s /etc/passwd /data/abs"], timeout=20)
    assert c.get_file("/data/abs") == (Path(rootfs["c"]) / "etc" / "passwd").read_bytes()
    with pytest.raises(kata_py.NotFound):
        c.get_file("/data/up")          # /init of the container's root: there is none
    with pytest.raises(kata_py.InvalidRequest):
        c.get_file("/data/in.bin", max_size=1000)
    with pytest.raises(kata_py.InvalidRequest):
        c.get_file("/data")
    c.delete()


def test_one_shot_run(sb, rootfs):
    result = sb.run(["sh", "-c", "tr a-z A-Z; echo to-stderr >&2; exit 3"], rootfs=rootfs["c"], stdin=b"shout\n",
                    timeout=30)
    assert (result.exit_code, result.signal, result.stdout, result.stderr) == (3, None, b"SHOUT\n", b"to-stderr\n")
    with pytest.raises(kata_py.CommandFailed):
        sb.run(["false"], rootfs=rootfs["c"], check=True)
    big = sb.run(["sh", "-c", "head -c 300000 /dev/zero"], rootfs=rootfs["c"], max_output=1000)
    assert len(big.stdout) == 1000 and big.stdout_truncated and big.exit_code == 0
    assert sb.containers() == []       # one-shot containers are deleted


def test_timeout_kills_the_process_and_the_sandbox_stays_usable(sb, rootfs):
    started = time.monotonic()
    with pytest.raises(kata_py.SandboxTimeout) as caught:
        sb.run(["sh", "-c", "echo started; exec sleep 60"], rootfs=rootfs["c"], timeout=1.5)
    assert time.monotonic() - started < 15
    assert caught.value.result.timed_out and caught.value.result.signal == signal.SIGKILL
    assert caught.value.result.stdout == b"started\n"
    c = sb.create_container("t", rootfs=rootfs["c"])
    c.start()
    with pytest.raises(kata_py.SandboxTimeout):
        c.exec(["sleep", "60"], timeout=1)
    assert c.exec(["echo", "still here"], timeout=20).stdout == b"still here\n"
    assert sb.run(["true"], rootfs=rootfs["c"], timeout=30).exit_code == 0
    c.delete()


def test_exit_events_are_pushed_within_a_second(sb, rootfs):
    with sb.events() as stream:
        # An init killed: from the host's kill to the event in this process.
        c = sb.create_container("ev", rootfs=rootfs["c"])
        c.start()
        sent = time.time()
        c.kill()
        event = _next(stream, lambda e: e.kind == "exit" and e.container == "ev" and e.init)
        assert event.status == 137 and event.signal == signal.SIGKILL
        LATENCY["init_killed"] = round(event.received - sent, 3)
        # A process that ends by itself: from the line that makes it exit to the event.
        c.delete()
        d = sb.create_container("ev2", rootfs=rootfs["c"])
        d.start()
        process = d.exec_stream(["sh", "-c", "read line; exit 7"], streams=("stdin",))
        time.sleep(0.3)
        sent = time.time()
        process.write(b"go\n")
        event = _next(stream, lambda e: e.kind == "exit" and e.container == "ev2" and not e.init)
        assert event.exit_code == 7 and event.process_id == process.process_id
        LATENCY["exec_exited"] = round(event.received - sent, 3)
        assert process.wait(timeout=10).exit_code == 7
        d.delete()
    assert LATENCY["init_killed"] < 1.0 and LATENCY["exec_exited"] < 1.0, LATENCY


def test_oom_kill_is_pushed(sb, rootfs):
    c = sb.create_container("oom", rootfs=rootfs["c"], memory="32M")
    c.start()
    with sb.events() as stream:
        hog = c.exec(["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], timeout=60)
        done = time.time()
        assert hog.status == 137, hog
        event = _next(stream, lambda e: e.kind == "oom" and e.container == "oom")
        assert event.oom_kill >= 1
        # The kill comes before dd's exit; its event within a second of that exit.
        LATENCY["oom_after_exit"] = round(event.received - done, 3)
        assert event.received - done < 1.0
    assert c.info().oom_kill >= 1
    c.delete()


def test_streaming_stdio(sb, rootfs):
    c = sb.create_container("stream", rootfs=rootfs["c"])
    c.start()
    process = c.exec_stream(["sh", "-c", "while read line; do echo \"<$line>\"; done; echo done >&2"])
    process.write(b"one\n")
    assert process.readline() == b"<one>\n"
    process.write(b"two\n")
    assert process.readline() == b"<two>\n"
    process.close_stdin()
    assert process.read() == b"" and process.read(stream="stderr") == b"done\n"
    assert process.wait(timeout=10).exit_code == 0
    c.delete()


def test_async_api_and_closing_leaves_nothing(rootfs, image):
    async def main(sandbox) -> tuple:
        async with sandbox:
            c = await sandbox.create_container("x", rootfs=rootfs["c"], args=["sh", "-c", "echo up; sleep 1000"])
            await c.start()
            result = await c.exec(["cat"], stdin=b"async\n", timeout=20)
            await c.kill()
            ended = await c.wait(timeout=30)
            one_shot = await sandbox.run(["echo", "once"], rootfs=rootfs["c"], timeout=30)
            return result.stdout, ended.stdout, one_shot.stdout, sandbox.record

    sandbox = kata_py.AsyncSandbox(memory="256M")
    checker = _checker(sandbox)
    before = checker.snapshot()
    out, init_out, once, record = asyncio.run(main(sandbox))
    assert (out, init_out, once) == (b"async\n", b"up\n", b"once\n")
    checker.assert_clean(before)
    _gone(sandbox)
    for key in ("owner", "qemu", "backend"):
        assert not records.same_process(record[f"{key}_pid"], record[f"{key}_start"]), key


@pytest.mark.parametrize("victim", ["owner", "qemu"])
def test_a_killed_owner_or_qemu_gives_a_clear_error_and_leaves_nothing(victim, rootfs, image):
    sandbox = kata_py.Sandbox()
    checker = _checker(sandbox)
    before = checker.snapshot()
    sandbox.start()
    try:
        c = sandbox.create_container("k", rootfs=rootfs["c"])
        c.start()
        stream = sandbox.events()
        pid = sandbox.owner_pid if victim == "owner" else sandbox.record["qemu_pid"]
        os.kill(pid, signal.SIGKILL)
        gone = _next(stream, lambda e: e.kind == "gone", timeout=30)
        expected = "sandbox owner" if victim == "owner" else "VM exited unexpectedly (QEMU killed by SIGKILL)"
        assert expected in gone.reason and "SIGKILL" in gone.reason, gone.reason
        with pytest.raises(kata_py.SandboxGone, match="SIGKILL"):
            c.exec(["true"])
        assert not sandbox.alive
        checker.assert_clean(before)    # before close(): the API cleaned up when it noticed
    finally:
        sandbox.close()
    checker.assert_clean(before)
    _gone(sandbox)


def test_a_dead_client_ends_its_sandbox(rootfs, image, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, time
        import kata_py
        sb = kata_py.Sandbox().start()
        c = sb.create_container("orphan", rootfs={rootfs['c']!r})
        c.start()
        print(json.dumps({{"id": sb.id, "record": sb.record}}), flush=True)
        time.sleep(600)
    """)
    # Every process and file of this session that appears from here on (its
    # cgroups once the sandbox's id is known: other sessions make VMs too).
    checker = LeakChecker()
    before = checker.snapshot()
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO,
                              env=dict(os.environ, KATA_PY_RUN_DIR=str(RUN_DIR)))
    try:
        line = client.stdout.readline()
        assert line, "the client did not start its sandbox"
        started = json.loads(line)
        record = started["record"]
        assert records.same_process(record["owner_pid"], record["owner_start"])
    finally:
        client.kill()
        client.wait()
    checker.assert_clean(before, timeout=30)
    cgroups = LeakChecker(tokens=[f"vm-{started['id']}"]).cgroups
    deadline = time.monotonic() + 10
    while cgroups() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cgroups(), cgroups()
    for key in ("owner", "qemu", "backend"):
        assert not records.same_process(record[f"{key}_pid"], record[f"{key}_start"]), key
    assert not records.sandbox_dir(started["id"]).exists() and not records.vm_dir(started["id"]).exists()


def test_pytest_plugin_gives_a_test_a_sandbox(tmp_path, image):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["kata_py.pytest_plugin"]\n')
    (tmp_path / "test_in_a_vm.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.kata_sandbox(memory="192M")
        def test_in_a_vm(kata_sandbox, kata_rootfs):
            assert kata_sandbox.memory_mib == 192
            result = kata_sandbox.run(["uname", "-r"], rootfs=kata_rootfs, timeout=30)
            assert result.exit_code == 0 and result.stdout.strip()
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def _pool_vms() -> list[int]:
    from tests.conftest import qemu_processes_under

    return [pid for pid in qemu_processes_under(RUN_DIR)
            if b"kata-py-pool-" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.fixture
def factory(subreaper):
    """A VM factory of one 256 MiB VM (the API's default size), stopped after the test."""
    import shutil

    from kata_py.sandbox import pool
    from tests.oci_helpers import cli

    started = cli(Path("/nonexistent-root"), "factory", "start", "--size", "1", "--memory", "256",
                  "--wait", "300", timeout=330)
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["ready"] == 1
    try:
        yield pool
    finally:
        assert cli(Path("/nonexistent-root"), "factory", "stop").returncode == 0
        deadline = time.monotonic() + 60
        while _pool_vms() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _pool_vms() == []
        shutil.rmtree(pool.factory_dir(), ignore_errors=True)  # its logs; nothing is mounted there any more


def test_a_sandbox_claims_a_pooled_vm_when_a_factory_runs(factory, rootfs):
    before = factory.request({"op": "status"})
    with kata_py.Sandbox() as sandbox:
        info = sandbox.info()
        assert info["vm"] == "pooled" and info["qemu_pid"] is None, info
        on_disk = records.read(records.sandbox_dir(sandbox.id))
        assert on_disk["vm"] == "pooled"
        assert records.same_process(on_disk["standby_pid"], on_disk["standby_start"])
        assert factory.request({"op": "status"})["handed_out"] == before["handed_out"] + 1
        share = Path(info["share_dir"])
        a = sandbox.create_container("a", rootfs=rootfs["a"], args=["sh", "-c", "echo a > /mine; sleep 1000"])
        b = sandbox.create_container("b", rootfs=rootfs["b"])
        a.start()
        b.start()
        assert a.exec(["sh", "-c", "sleep 0.2; cat /mine"], timeout=30).stdout == b"a\n"
        assert b.exec(["sh", "-c", "test -e /mine || echo own-files"], timeout=30).stdout == b"own-files\n"
        once = sandbox.run(["echo", "once"], rootfs=rootfs["c"], timeout=30)
        assert once.stdout == b"once\n" and once.exit_code == 0
        assert [c.name for c in sandbox.containers()] == ["a", "b"]
    _gone(sandbox)
    # Nothing of that VM: its standby, its QEMU, its share and run directory.
    assert not records.same_process(on_disk["standby_pid"], on_disk["standby_start"])
    assert not share.exists() and not share.parent.exists(), list(share.parent.iterdir())
    assert not records.same_process(info["owner_pid"], info["owner_start"])

    # pool=False: a fresh boot, though the factory has (or is booting) a VM that fits.
    with kata_py.Sandbox(pool=False) as sandbox:
        info = sandbox.info()
        assert info["vm"] == "booted" and info["qemu_pid"], info
        assert sandbox.run(["echo", "booted"], rootfs=rootfs["c"], timeout=30).stdout == b"booted\n"
    _gone(sandbox)
    assert factory.request({"op": "status"})["handed_out"] == before["handed_out"] + 1
