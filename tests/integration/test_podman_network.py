"""podman's default bridge network (CNI from Debian: bridge, host-local IPAM,
portmap) with kata-py: a published port reaches a server in the guest."""

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.engines import IMAGE, Podman, image_tar
from tests.oci_helpers import owned_container

pytestmark = [pytest.mark.vm, pytest.mark.skipif(os.geteuid() != 0, reason="podman's bridge network needs root")]

HOST_PORT = 18080


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    directory = tmp_path_factory.mktemp("podman-net")
    engine = Podman(directory)
    engine.import_image(image_tar(directory))
    yield engine
    engine.cleanup()


def monitors_of(container_id: str) -> list[str]:
    """kata-py monitors of this container still running (others may be running
    tests of their own at the same time)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        owned = owned_container(argv)
        if owned is not None and owned[1] == container_id:
            found.append(f"{proc.name}: {' '.join(argv)[:200]}")
    return found


def fetch_until(url: str, deadline: float) -> bytes:
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.read()
        except (urllib.error.URLError, OSError) as exc:   # not listening yet, or the guest still booting
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered: {last}")


def test_published_port_reaches_httpd_in_the_guest(podman, image):
    name = "kp-web"
    result = podman("run", "-d", "--name", name, "--runtime", "kata-py", "-p", f"{HOST_PORT}:8080", IMAGE,
                    "sh", "-c", "mkdir -p /www && uname -r > /www/index.html && exec httpd -f -p 8080 -h /www")
    assert result.returncode == 0, result.stderr
    container_id = result.stdout.decode().strip()
    try:
        body = fetch_until(f"http://127.0.0.1:{HOST_PORT}/", time.monotonic() + 120)
        # Served by the guest kernel's container, not by anything on the host.
        assert body.decode().strip() == image.kernel_release != os.uname().release
        inspect = podman("inspect", "--format", "{{.NetworkSettings.IPAddress}}", name).stdout.decode().strip()
        assert inspect, "podman gave the container no address"
        execed = podman("exec", name, "ip", "-o", "-4", "addr", "show", "eth0")
        assert f"inet {inspect}/" in execed.stdout.decode(), execed.stdout
    finally:
        podman("rm", "-f", "-t", "0", name)
    assert monitors_of(container_id) == []
