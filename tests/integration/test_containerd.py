"""containerd 1.6 drives kata-py through its standard runc shim (io.containerd.runc.v2)
with the shim's binary pointed at kata-py, as `ctr run --runc-binary`."""

import os
import subprocess
import time

import pytest

from tests.engines import IMAGE, Containerd, Podman, image_tar, kata_binary, leftover_processes

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    directory = tmp_path_factory.mktemp("containerd")
    # The image travels podman import -> podman save (OCI archive) -> ctr import.
    podman = Podman(tmp_path_factory.mktemp("podman-for-ctr"))
    podman.import_image(image_tar(directory))
    archive = directory / "image.tar"
    saved = podman("save", "--format", "oci-archive", "-o", archive, IMAGE)
    assert saved.returncode == 0, saved.stderr
    podman.cleanup()
    engine = Containerd(directory / "state-root")
    imported = engine.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], archive)
    assert imported.returncode == 0, imported.stderr
    yield engine
    engine.stop()
    assert leftover_processes() == []


def run(ctr, name, *argv, extra=()):
    return ctr.ctr("run", "--rm", "--runc-binary", kata_binary(), *extra, IMAGE, name, *argv)


def test_run_prints_guest_kernel_and_id(ctr, image):
    result = run(ctr, "k1", "sh", "-c", "id -u; uname -r")
    assert result.returncode == 0, result.stderr
    uid, release = result.stdout.decode().split()
    assert uid == "0" and release == image.kernel_release != os.uname().release


@pytest.mark.parametrize("code", [0, 7, 137])
def test_exit_codes_propagate(ctr, code):
    # A pid namespace's init ignores SIGKILL from inside it (as with runc): a child dies of it.
    script = "sh -c 'kill -9 $$'; exit $?" if code == 137 else f"exit {code}"
    result = run(ctr, f"exit{code}", "sh", "-c", script)
    assert result.returncode == code, result.stderr


def test_task_kill_and_delete_leave_nothing(ctr):
    started = ctr.ctr("run", "-d", "--runc-binary", kata_binary(), IMAGE, "bg1", "sleep", "1000")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 60
    while b"RUNNING" not in ctr.ctr("tasks", "ls").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    execed = ctr.ctr("tasks", "exec", "--exec-id", "e1", "bg1", "sh", "-c", "echo via-exec; exit 3")
    assert (execed.returncode, execed.stdout.strip()) == (3, b"via-exec")
    assert ctr.ctr("tasks", "kill", "-s", "SIGKILL", "bg1").returncode == 0
    deadline = time.monotonic() + 60
    while b"STOPPED" not in ctr.ctr("tasks", "ls").stdout:
        assert time.monotonic() < deadline, ctr.ctr("tasks", "ls").stdout
        time.sleep(0.5)
    deleted = ctr.ctr("tasks", "delete", "bg1")
    assert deleted.returncode == 0, deleted.stderr
    assert ctr.ctr("containers", "rm", "bg1").returncode == 0
    assert ctr.ctr("tasks", "ls", "-q").stdout.strip() == b""
    assert leftover_processes() == []


def test_contrib_cri_config_loads():
    """The documented CRI handler snippet is valid containerd configuration."""
    config = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "containerd", "config.toml")
    dump = subprocess.run(["containerd", "--config", config, "config", "dump"], capture_output=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout.decode()
    assert "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-py]" in text
    assert "BinaryName = \"/usr/local/bin/kata-py\"" in text
