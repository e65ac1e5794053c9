"""Fixtures shared by the integration modules.

`subreaper` (module scope) and `force_delete_leftovers` are not autouse: a
module that needs them asks for them, for every test in it, with
`pytestmark = pytest.mark.usefixtures(...)`.
"""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from kata_py.oci.state import StateStore
from tests.network_helpers import Namespaces
from tests.oci_helpers import cli

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module")
def subreaper(image):
    """Become a child subreaper, as conmon and containerd's shim are: the monitor
    that `create` leaves behind is re-parented to us, and its exit status (the
    container's, by contract) can be read with waitpid."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    # Orphans re-parented to us that no test waited for (a killed monitor's
    # helpers): no zombies left behind. Every subprocess.run has finished.
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.2)
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
        except ChildProcessError:
            break


@pytest.fixture
def force_delete_leftovers(tmp_path):
    """A test that fails half-way must not leave its container's VM running."""
    yield
    root = tmp_path / "root"
    for container_id in StateStore(root).list_ids():
        cli(root, "delete", "--force", container_id)


@pytest.fixture
def namespaces():
    """Network namespaces and veths made for a test, all removed after it."""
    made = Namespaces()
    yield made
    made.cleanup()
