"""The sandbox owner's lifetime rules and request handling without a VM (its
boot replaced by a stand-in), its record's clean-up after a dead owner, and
its 9p export in a mount namespace of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from kata_py.sandbox import record as records
from kata_py.sandbox.containers import Containers
from kata_py.sandbox.owner import Owner, describe_exit
from kata_py.sandbox.owner_client import OwnerClient, OwnerConnectionError, OwnerRequestError


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KATA_PY_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def _fake_boot(fail: str | None = None):
    async def boot(self):
        await asyncio.sleep(0.05)
        if fail:
            self.booted.set_exception(RuntimeError(fail))
            self.end(f"the sandbox's VM did not boot: {fail}", failed=True)
            return
        self.containers = Containers(None, self.export, self.publish, self._agent_lost, self.save)
        self.status = "running"
        self.save()
        self.booted.set_result(None)
    return boot


async def _start(sandbox_id: str):
    ours, theirs = socket.socketpair()
    records.sandbox_dir(sandbox_id).mkdir(parents=True)
    owner = Owner(sandbox_id, 256, 1, control_fd=theirs.detach())
    task = asyncio.ensure_future(owner.main())
    client = await OwnerClient.from_socket(ours)
    return owner, task, client


def test_the_control_connection_holds_the_sandbox(run_dir, monkeypatch):
    monkeypatch.setattr(Owner, "_boot", _fake_boot())

    async def main():
        owner, task, control = await _start("t1")
        record = await control.request("ready")
        assert record["status"] == "running" and record["owner_pid"] == os.getpid()
        sock = records.sandbox_dir("t1") / records.SOCKET
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert json.loads((records.sandbox_dir("t1") / records.RECORD).read_text())["id"] == "t1"
        # Another client comes and goes: the sandbox stays.
        other = await OwnerClient.connect(sock)
        assert (await other.request("info"))["id"] == "t1"
        await other.close()
        await asyncio.sleep(0.1)
        assert not task.done()
        # The control connection closes (its client died): the sandbox ends, leaving nothing.
        await control.close()
        assert await asyncio.wait_for(task, 10) == 0
        assert owner.reason == "its client closed the control connection"
        assert not records.sandbox_dir("t1").exists()

    asyncio.run(main())


def test_shutdown_replies_once_all_is_gone_and_tells_everyone(run_dir, monkeypatch):
    monkeypatch.setattr(Owner, "_boot", _fake_boot())

    async def main():
        owner, task, control = await _start("t2")
        await control.request("ready")
        events = []
        control.add_listener(events.append)
        other = await OwnerClient.connect(records.sandbox_dir("t2") / records.SOCKET)
        assert await other.request("shutdown") == {}
        assert not (records.sandbox_dir("t2") / records.RECORD).exists()
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(asyncio.shield(control.closed), 5)
        assert [e["event"] for e in events] == ["gone"] and events[0]["reason"] == "shutdown requested"
        with pytest.raises(OwnerConnectionError):
            await control.request("info")
        await control.close()
        await other.close()

    asyncio.run(main())


def test_requests_are_validated_before_anything_is_done(run_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(Owner, "_boot", _fake_boot())

    async def main():
        owner, task, control = await _start("t3")
        await control.request("ready")
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("x")
        with pytest.raises(OwnerRequestError, match="not a directory") as caught:
            await control.request("create_container", {"name": "c", "rootfs": str(not_a_dir), "args": ["sh"]})
        assert caught.value.code == "invalid"
        with pytest.raises(OwnerRequestError, match="KEY=VALUE"):
            await control.request("exec", {"name": "c", "args": ["sh"], "env": ["=x"]})
        with pytest.raises(OwnerRequestError, match="bind mounts"):
            await control.request("create_container", {"name": "c", "rootfs": str(tmp_path), "args": ["sh"],
                                                       "mounts": [{"destination": "/x", "source": "/",
                                                                   "options": ["rbind"]}]})
        with pytest.raises(OwnerRequestError, match="host's /"):
            await control.request("run", {"rootfs": "/", "args": ["sh"]})
        for request, args in (("start", {"name": "nope"}), ("wait", {"name": "nope"}),
                              ("get_file", {"name": "nope", "path": "/x"})):
            with pytest.raises(OwnerRequestError) as missing:
                await control.request(request, args)
            assert missing.value.code == "not_found", request
        await control.close()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_a_failed_boot_is_the_answer_to_ready(run_dir, monkeypatch):
    monkeypatch.setattr(Owner, "_boot", _fake_boot(fail="no kernel"))

    async def main():
        owner, task, control = await _start("t4")
        with pytest.raises((OwnerRequestError, OwnerConnectionError), match="no kernel"):
            await control.request("ready")
        assert await asyncio.wait_for(task, 10) == 1
        assert not records.sandbox_dir("t4").exists()
        await control.close()

    asyncio.run(main())


def test_describe_exit():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit status 3"


def test_clean_up_after_a_dead_owner(run_dir):
    directory = records.sandbox_dir("dead")
    (directory / records.SHARE / "c1").mkdir(parents=True)
    vm = records.vm_dir("dead")
    vm.mkdir()
    (vm / "console.log").write_text("x")
    (directory / records.LOG).write_text("log")
    leftover = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {"id": "dead", "run_dir": str(directory), "share_dir": str(directory / records.SHARE),
              "vm_run_dir": str(vm), "owner_pid": dead.pid, "owner_start": 1,
              "qemu_pid": leftover.pid, "qemu_start": records.start_time(leftover.pid)}
    records.write(record)
    started = time.monotonic()
    records.clean_up_after(record, timeout=1.0)
    assert time.monotonic() - started < 5
    assert leftover.wait(5) == -signal.SIGKILL
    assert not directory.exists() and not vm.exists()


def test_clean_up_leaves_a_live_owner_alone(run_dir):
    directory = records.sandbox_dir("alive")
    directory.mkdir(parents=True)
    record = {"id": "alive", "run_dir": str(directory), "owner_pid": os.getpid(),
              "owner_start": records.start_time(os.getpid())}
    records.write(record)
    records.clean_up_after(record)
    assert records.read(directory)["id"] == "alive"


EXPORT_CHILD = """
import json, os, sys
from pathlib import Path
from kata_py.sandbox.share import ContainerShare, enter_private_mount_namespace
root, source = Path(sys.argv[1]), sys.argv[2]
enter_private_mount_namespace()
export = ContainerShare(root / "share")
export.add(source, name="c1")
export.add(source, readonly=True, name="c2")
seen = {"entries": sorted(os.listdir(root / "share")), "c1": (root / "share" / "c1" / "f").read_text()}
try:
    (root / "share" / "c2" / "new").write_text("x")
    seen["ro_write"] = "allowed"
except OSError as exc:
    seen["ro_write"] = exc.errno
export.remove("c1")
seen["after_remove"] = sorted(os.listdir(root / "share"))
if sys.argv[3] == "close":
    export.close()
print(json.dumps(seen))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
@pytest.mark.parametrize("ending", ["close", "killed"])
def test_export_binds_live_in_the_owners_namespace_only(tmp_path, ending):
    source = tmp_path / "rootfs"
    source.mkdir()
    (source / "f").write_text("hello")
    result = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(tmp_path), str(source), ending],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"entries": ["c1", "c2"], "c1": "hello", "ro_write": 30, "after_remove": ["c2"]}
    share = tmp_path / "share"
    if ending == "close":
        assert not share.exists()
    else:   # the namespace died with the process: an empty mount point is all that is left
        assert os.listdir(share) == ["c2"] and os.listdir(share / "c2") == []
        from kata_py.sandbox.share import remove_share_dir
        remove_share_dir(share)
        assert not share.exists()
    assert (source / "f").read_text() == "hello" and os.listdir(source) == ["f"]
