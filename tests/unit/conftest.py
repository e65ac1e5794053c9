"""Fixtures the unit tests share."""

import pytest

from kata_py.harness.host import HostSide


@pytest.fixture
def host(tmp_path):
    """The harness's host side for a rootfs of its own; afterwards, nothing of
    the harness may be left in the rootfs or beside it."""
    rootfs = tmp_path / "bundle" / "rootfs"
    rootfs.mkdir(parents=True)
    side = HostSide(rootfs)
    yield side
    side.close()
    assert sorted(p.name for p in rootfs.iterdir()) == [], "the harness left files in the rootfs"
    assert sorted(p.name for p in rootfs.parent.iterdir()) == ["rootfs"], "the harness left files beside it"
