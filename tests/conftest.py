"""Shared fixtures.

VM tests run real QEMU guests (TCG when KVM does not boot a guest here). The
`vms` fixture is the VM factory: it tracks every sandbox a test starts, stops
them all at teardown, and keeps the console and backend logs of a failed test
under tests/logs/<test name>/.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LOGS = TESTS / "logs"
RUN_DIR = Path(os.environ.setdefault("KATA_PY_RUN_DIR", f"/run/kata-py-test-{os.getpid()}"))
KATA = [sys.executable, "-m", "kata_py.cli.main"]


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


class LoopThread:
    """One asyncio loop in a thread, so sandboxes can outlive a single test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def pytest_sessionfinish(session, exitstatus):
    # The run directory is this session's own; empty once every VM is gone.
    try:
        RUN_DIR.rmdir()
    except OSError:
        pass


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def image():
    from kata_py.image import ensure_image

    return ensure_image(progress=False)


class VMFactory:
    def __init__(self, loop_thread: LoopThread, image) -> None:
        self.lt = loop_thread
        self.image = image
        self.sandboxes = []

    def start(self, **kwargs):
        from kata_py.sandbox.sandbox import Sandbox

        sandbox = Sandbox(self.image, **kwargs)
        self.sandboxes.append(sandbox)
        self.lt.run(sandbox.start())
        return sandbox

    def keep_logs(self, name: str) -> None:
        for index, sandbox in enumerate(self.sandboxes):
            if sandbox.run_dir is None:
                continue
            dest = LOGS / name / str(index)
            dest.mkdir(parents=True, exist_ok=True)
            for log in sandbox.run_dir.glob("*.log"):
                shutil.copy(log, dest / log.name)

    def stop_all(self) -> None:
        for sandbox in self.sandboxes:
            self.lt.run(sandbox.stop(), timeout=60)
        self.sandboxes.clear()


def _factory(request, loop_thread, image):
    factory = VMFactory(loop_thread, image)
    yield factory
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        factory.keep_logs(request.node.name)
    factory.stop_all()


@pytest.fixture
def vms(request, loop_thread, image):
    yield from _factory(request, loop_thread, image)


@pytest.fixture(scope="module")
def module_vms(request, loop_thread, image):
    yield from _factory(request, loop_thread, image)


def qemu_processes_under(run_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline.split(b"\0")[0] and str(run_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids
