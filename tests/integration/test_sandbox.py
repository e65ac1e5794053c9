"""Sandboxes through the Python API: concurrency over vsock, repeated boots, cleanup."""

import asyncio
import hashlib
import os

import pytest

from kata_py.sandbox.agent_client import open_stream
from tests.conftest import qemu_processes_under

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sandbox(module_vms):
    return module_vms.start(memory_mib=192)


def test_agent_reports_guest_kernel(sandbox, image):
    assert sandbox.agent_info["kernel"] == image.kernel_release
    assert sandbox.agent_info["protocol"] == 1


async def _cat_roundtrip(sb, index: int, size: int) -> str:
    process_id = f"cat-{index}"
    await sb.agent.request("create_process", {"process_id": process_id, "argv": ["cat"],
                                              "streams": ["stdin", "stdout"]})
    (_, stdin), (stdout, _) = [await open_stream(sb.transport, process_id, s) for s in ("stdin", "stdout")]
    await sb.agent.request("start_process", {"process_id": process_id})
    data = os.urandom(size)

    async def feed():
        for offset in range(0, size, 100_000):
            stdin.write(data[offset:offset + 100_000])
            await stdin.drain()
        stdin.write_eof()

    async def collect():
        digest = hashlib.sha256()
        while chunk := await stdout.read(1 << 16):
            digest.update(chunk)
        return digest.hexdigest()

    _, got = await asyncio.gather(feed(), collect())
    result = await sb.agent.request("wait_process", {"process_id": process_id}, timeout=120)
    stdin.close()
    assert result == {"exit_code": 0, "signal": None}
    assert got == hashlib.sha256(data).hexdigest(), f"stream {index} corrupted"
    return got


def test_eight_concurrent_connections(sandbox, loop_thread):
    async def go():
        return await asyncio.gather(*[_cat_roundtrip(sandbox, i, 2 << 20) for i in range(8)])
    digests = loop_thread.run(go(), timeout=600)
    assert len(set(digests)) == 8


def test_requests_while_a_wait_is_pending(sandbox, loop_thread):
    async def go():
        agent = sandbox.agent
        await agent.request("create_process", {"process_id": "sleeper", "argv": ["sleep", "600"]})
        await agent.request("start_process", {"process_id": "sleeper"})
        waiter = asyncio.ensure_future(agent.request("wait_process", {"process_id": "sleeper"}, timeout=60))
        info = await agent.request("ping")
        await agent.request("signal_process", {"process_id": "sleeper", "signal": 9})
        return info, await waiter
    info, result = loop_thread.run(go())
    assert info["protocol"] == 1
    assert result == {"exit_code": None, "signal": 9}


def test_fifty_consecutive_boots(vms, loop_thread):
    # Each boot must reach agent-ready: no TSC-calibration or entropy hangs.
    times = []
    for _ in range(50):
        sb = vms.start()
        times.append(sb.times.agent_ready)
        loop_thread.run(sb.stop())
    assert len(times) == 50
    print(f"agent ready: min {min(times):.2f}s median {sorted(times)[25]:.2f}s max {max(times):.2f}s")


def test_stop_leaves_nothing(vms, loop_thread):
    sb = vms.start()
    run_dir, pid = sb.run_dir, sb.machine.pid
    loop_thread.run(sb.stop())
    assert not run_dir.exists()
    assert not os.path.exists(f"/proc/{pid}")
    assert qemu_processes_under(run_dir) == []


def test_dead_vm_is_a_clear_error(vms, loop_thread):
    from kata_py.errors import AgentError

    sb = vms.start()
    sb.machine.process.kill()
    with pytest.raises(AgentError):
        loop_thread.run(sb.agent.request("ping", timeout=10))
    loop_thread.run(sb.stop())
    assert sb.run_dir is None
