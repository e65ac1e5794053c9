"""The guest agent's server, process table and stdio streams, driven by the real
host client over a Unix socket (no VM): fast checks of the logic that the VM
tests then exercise for real over vsock."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kata_py.sandbox.agent_client import AgentRequestError, open_stream
from kata_py.sandbox.handle import ReattachedSandbox
from kata_py.sandbox.process import run_process

HERE = Path(__file__).resolve().parent.parent


class UnixTransport:
    def __init__(self, path):
        self.path = str(path)

    async def open_connection(self, port, timeout):
        return await asyncio.wait_for(asyncio.open_unix_connection(self.path), timeout)


@pytest.fixture
def agent(tmp_path):
    path = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, str(HERE / "agent_over_unix.py"), str(path)],
                            stdout=subprocess.PIPE, cwd=HERE.parent)
    assert proc.stdout.readline().strip() == b"ready"
    yield UnixTransport(path)
    proc.kill()
    proc.wait()


def run(coro):
    return asyncio.run(coro)


async def _session(transport, fn):
    handle = ReattachedSandbox(transport, timeout=5)
    await handle.start()
    try:
        return await fn(handle.agent, handle)
    finally:
        await handle.stop()


def test_ping(agent):
    info = run(_session(agent, lambda c, sb: c.request("ping")))
    assert info["protocol"] == 1 and info["kernel"] == os.uname().release


def _pipe_run(agent, argv, stdin_data=None):
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    if stdin_data is not None:
        r_in, w_in = os.pipe()
    chunks = {"out": [], "err": []}

    async def go(client, sb):
        loop = asyncio.get_running_loop()
        if stdin_data is not None:
            loop.run_in_executor(None, lambda: (os.write(w_in, stdin_data), os.close(w_in)))
        readers = [loop.run_in_executor(None, _drain, r_out, chunks["out"]),
                   loop.run_in_executor(None, _drain, r_err, chunks["err"])]
        status = await run_process(sb, argv, stdin_fd=r_in if stdin_data is not None else None,
                                   stdout_fd=w_out, stderr_fd=w_err)
        os.close(w_out)
        os.close(w_err)
        await asyncio.gather(*readers)
        return status

    status = run(_session(agent, go))
    return status, b"".join(chunks["out"]), b"".join(chunks["err"])


def _drain(fd, sink):
    while True:
        data = os.read(fd, 65536)
        if not data:
            os.close(fd)
            return
        sink.append(data)


def test_exit_codes_and_signals(agent):
    assert _pipe_run(agent, ["sh", "-c", "exit 7"])[0] == 7
    assert _pipe_run(agent, ["sh", "-c", "kill -9 $$"])[0] == 137
    status, out, err = _pipe_run(agent, ["sh", "-c", "echo out; echo err >&2"])
    assert (status, out, err) == (0, b"out\n", b"err\n")


def test_stdin_round_trip(agent):
    data = os.urandom(3 << 20)
    status, out, _ = _pipe_run(agent, ["cat"], stdin_data=data)
    assert status == 0 and out == data


def test_errors_are_typed(agent):
    async def go(client, sb):
        with pytest.raises(AgentRequestError) as info:
            await client.request("start_process", {"process_id": "nope"})
        assert info.value.code == "not_found"
        await client.request("create_process", {"process_id": "a", "argv": ["true"], "streams": ["stdout"]})
        with pytest.raises(AgentRequestError) as info:
            await client.request("create_process", {"process_id": "a", "argv": ["true"]})
        assert info.value.code == "exists"
        # start before the announced stream is attached is refused
        with pytest.raises(AgentRequestError) as info:
            await client.request("start_process", {"process_id": "a"})
        assert info.value.code == "state"
        with pytest.raises(AgentRequestError):
            await open_stream(sb.transport, "a", "stderr")  # not announced
        await client.request("create_process", {"process_id": "b", "argv": ["/no/such/binary"]})
        with pytest.raises(AgentRequestError) as info:
            await client.request("start_process", {"process_id": "b"})
        assert info.value.code == "failed"
        with pytest.raises(AgentRequestError) as info:
            await client.request("create_process", {"process_id": "c", "argv": ["true"], "cwd": "/no/such/dir"})
        assert info.value.code == "invalid"
    run(_session(agent, go))


def test_signal_a_running_process(agent):
    async def go(client, sb):
        await client.request("create_process", {"process_id": "s", "argv": ["sleep", "30"]})
        await client.request("start_process", {"process_id": "s"})
        await client.request("signal_process", {"process_id": "s", "signal": 15})
        return await client.request("wait_process", {"process_id": "s"}, timeout=10)
    assert run(_session(agent, go)) == {"exit_code": None, "signal": 15}


def test_tty_process(agent):
    async def go(client, sb):
        await client.request("create_process", {"process_id": "t", "argv": ["sh", "-c", "tty; stty size"],
                                                "tty": True, "rows": 33, "cols": 99, "streams": ["stdout"]})
        reader, writer = await open_stream(sb.transport, "t", "stdout")
        await client.request("start_process", {"process_id": "t"})
        output = await reader.read()
        result = await client.request("wait_process", {"process_id": "t"}, timeout=10)
        return output, result
    output, result = run(_session(agent, go))
    assert result == {"exit_code": 0, "signal": None}
    assert b"/dev/pts/" in output and b"33 99" in output


def test_concurrent_waits_and_requests(agent):
    async def go(client, sb):
        for i in range(8):
            await client.request("create_process", {"process_id": f"w{i}", "argv": ["sh", "-c", f"sleep 0.{i}; exit {i}"]})
            await client.request("start_process", {"process_id": f"w{i}"})
        results = await asyncio.gather(*[client.request("wait_process", {"process_id": f"w{i}"}, timeout=10)
                                         for i in reversed(range(8))])
        return [r["exit_code"] for r in results]
    assert run(_session(agent, go)) == list(reversed(range(8)))


def test_sigpipe_is_default_in_children(agent):
    # Python ignores SIGPIPE for itself; a child must get the default back, or
    # `yes | head -1` never ends.
    status, out, _ = _pipe_run(agent, ["sh", "-c", "yes | head -n 1; exit 0"])
    assert (status, out) == (0, b"y\n")


def test_no_agent_fds_leak_into_children(agent):
    status, out, _ = _pipe_run(agent, ["sh", "-c", "ls /proc/self/fd | sort -n | tr '\\n' ' '"])
    assert status == 0
    assert out.split() == [b"0", b"1", b"2", b"3"]  # 3 is ls's own directory handle


def test_process_security_fields_apply(agent):
    # umask and rlimits through create_process (caps and users: test_agent_credentials.py).
    status, out, err = _pipe_run_with(agent, ["sh", "-c", "umask; ulimit -n; ulimit -Hn"],
                                      security={"umask": 0o027, "rlimits": [
                                          {"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}]})
    assert (status, out, err) == (0, b"0027\n100\n200\n", b"")


def test_invalid_security_fields_are_refused(agent):
    async def go(client, sb):
        codes = []
        for fields in ({"capabilities": {"bounding": ["CAP_NOT_ONE"]}},
                       {"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]},
                       {"umask": 0o10000}):
            with pytest.raises(AgentRequestError) as info:
                await client.request("create_process", {"process_id": "x", "argv": ["true"], **fields})
            codes.append(info.value.code)
        return codes
    assert run(_session(agent, go)) == ["invalid"] * 3


def _pipe_run_with(agent, argv, security):
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    chunks = {"out": [], "err": []}

    async def go(client, sb):
        loop = asyncio.get_running_loop()
        readers = [loop.run_in_executor(None, _drain, r_out, chunks["out"]),
                   loop.run_in_executor(None, _drain, r_err, chunks["err"])]
        status = await run_process(sb, argv, stdin_fd=None, stdout_fd=w_out, stderr_fd=w_err, security=security)
        os.close(w_out)
        os.close(w_err)
        await asyncio.gather(*readers)
        return status

    status = run(_session(agent, go))
    return status, b"".join(chunks["out"]), b"".join(chunks["err"])
