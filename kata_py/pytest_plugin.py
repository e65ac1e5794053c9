"""pytest fixtures that give a test a kata-py sandbox (a VM of its own).

Enable it in a conftest.py (kata-py registers no pytest11 entry point):

    pytest_plugins = ["kata_py.pytest_plugin"]

then:

    def test_untrusted(kata_sandbox, kata_rootfs):
        result = kata_sandbox.run(["sh", "-c", "echo hi"], rootfs=kata_rootfs, timeout=10)
        assert result.stdout == b"hi\\n"

    @pytest.mark.kata_sandbox(memory="512M", cpus=2)
    def test_bigger(kata_sandbox): ...

Fixtures:
- `kata_sandbox`: a started kata_py.Sandbox, closed after the test (nothing
  of it is left). Its size comes from the test's `kata_sandbox` marker,
  else from the `--kata-memory` / `--kata-cpus` options (256M, 1).
- `kata_sandbox_module`: one sandbox shared by a module's tests (boot once:
  seconds under TCG); containers a test makes are its own to delete.
- `kata_rootfs`: a busybox-static root filesystem (a directory, built once
  per session from the host's busybox), for containers that need a shell.

Needs root on a host that can run kata-py (`kata-py check`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .api import Sandbox

MARKER = "kata_sandbox"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("kata-py")
    group.addoption("--kata-memory", default="256M", help="memory of a kata_sandbox VM (default 256M)")
    group.addoption("--kata-cpus", type=int, default=1, help="vCPUs of a kata_sandbox VM (default 1)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(memory=..., cpus=...): the size of the test's kata_sandbox")


def _size(request) -> dict:
    options = {"memory": request.config.getoption("--kata-memory"), "cpus": request.config.getoption("--kata-cpus")}
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        options.update(marker.kwargs)
    return options


@pytest.fixture
def kata_sandbox(request):
    with Sandbox(**_size(request)) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def kata_sandbox_module(request):
    with Sandbox(**_size(request)) as sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def kata_rootfs(tmp_path_factory) -> Path:
    from .oci.busybox import make_busybox_rootfs

    return make_busybox_rootfs(tmp_path_factory.mktemp("kata-rootfs") / "rootfs")
