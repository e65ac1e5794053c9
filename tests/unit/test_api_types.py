"""kata_py.api's values, argument handling and errors, without a VM."""

from __future__ import annotations

import pytest

import kata_py
from kata_py.api.aio import _env, _translate, _user
from kata_py.api.types import Event, ExecResult, parse_size
from kata_py.errors import KataError
from kata_py.sandbox.owner_client import OwnerRequestError


def test_the_api_is_reexported_typed_and_rooted_in_kata_error():
    from pathlib import Path

    assert kata_py.Sandbox is kata_py.api.Sandbox and kata_py.AsyncSandbox is kata_py.api.AsyncSandbox
    assert (Path(kata_py.__file__).parent / "py.typed").exists()
    for name in ("SandboxGone", "SandboxTimeout", "ContainerExited", "BootError", "NotFound", "InvalidRequest",
                 "Conflict", "CommandFailed", "RequestFailed"):
        assert issubclass(getattr(kata_py, name), kata_py.SandboxError)
    assert issubclass(kata_py.SandboxError, KataError)


@pytest.mark.parametrize("text,size", [("256M", 256 << 20), ("1G", 1 << 30), ("512KiB", 512 << 10),
                                       ("100", 100), (4096, 4096), ("2 MB", 2 << 20)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1M", "1.5G", "lots", -5, True])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_sandbox_size_is_checked_before_anything_starts():
    with pytest.raises(kata_py.InvalidRequest, match="at least"):
        kata_py.Sandbox(memory="64M")
    with pytest.raises(kata_py.InvalidRequest, match="cpus"):
        kata_py.Sandbox(cpus=0)
    assert kata_py.Sandbox(memory="1G").memory_mib == 1024
    with pytest.raises(kata_py.SandboxGone, match="never started"):
        kata_py.Sandbox().run(["true"], rootfs="/")


def test_exec_result_status():
    killed = ExecResult.from_wire({"exit_code": None, "signal": 9, "status": 137, "stdout": "aGk=", "stderr": "",
                                   "stdout_truncated": True, "stderr_truncated": False, "timed_out": True})
    assert killed.status == 137 and not killed.ok and killed.stdout == b"hi" and killed.stdout_truncated
    assert ExecResult(0, None, b"", b"").ok


def test_event_from_wire():
    event = Event.from_wire({"event": "oom", "container": "c", "oom_kill": 2, "time": 5.0}, 6.0)
    assert (event.kind, event.container, event.oom_kill, event.received) == ("oom", "c", 2, 6.0)


def test_environment_and_user():
    assert _env({"B": "2", "PATH": "/x"}, ["PATH=/bin", "A=1"]) == ["PATH=/x", "A=1", "B=2"]
    assert _env(["K=v=w"], ()) == ["K=v=w"]
    with pytest.raises(kata_py.InvalidRequest):
        _env(["novalue"], ())
    assert _user(1000) == {"uid": 1000, "gid": 1000} and _user("5:6") == {"uid": 5, "gid": 6}
    assert _user((1, 2)) == {"uid": 1, "gid": 2} and _user(None) is None
    with pytest.raises(kata_py.InvalidRequest):
        _user("root")


@pytest.mark.parametrize("code,error", [("gone", kata_py.SandboxGone), ("timeout", kata_py.SandboxTimeout),
                                        ("exited", kata_py.ContainerExited), ("not_found", kata_py.NotFound),
                                        ("invalid", kata_py.InvalidRequest), ("exists", kata_py.Conflict),
                                        ("state", kata_py.Conflict), ("failed", kata_py.RequestFailed)])
def test_owner_codes_become_typed_errors(code, error):
    translated = _translate(OwnerRequestError("exec", code, "why"))
    assert type(translated) is error and "why" in str(translated)
