"""Kernel module load order from modules.dep."""

import pytest

from kata_py.image import kmod

MODULES_DEP = """\
kernel/net/vmw_vsock/vsock.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/9p/9pnet.ko: kernel/fs/fscache/fscache.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio-blk.ko: kernel/drivers/virtio/virtio.ko
"""


def _names(paths):
    return [kmod.module_name(p) for p in paths]


def test_dependencies_come_first_and_wanted_order_is_kept():
    deps = kmod.parse_modules_dep(MODULES_DEP)
    order = _names(kmod.order_modules(
        ["vsock", "vmw_vsock_virtio_transport", "virtio_mmio", "9pnet_virtio"], deps))
    assert order == ["vsock", "virtio_ring", "virtio", "vmw_vsock_virtio_transport_common",
                     "vmw_vsock_virtio_transport", "virtio_mmio",
                     "netfs", "fscache", "9pnet", "9pnet_virtio"]
    for i, name in enumerate(order):
        path = next(p for p in deps if kmod.module_name(p) == name)
        for dep in deps[path]:
            assert order.index(kmod.module_name(dep)) < i


def test_dash_and_underscore_are_the_same_module():
    deps = kmod.parse_modules_dep(MODULES_DEP)
    assert _names(kmod.order_modules(["virtio-blk"], deps)) == ["virtio_ring", "virtio", "virtio_blk"]


def test_builtin_modules_are_skipped():
    deps = kmod.parse_modules_dep(MODULES_DEP)
    builtin = kmod.parse_builtin("kernel/drivers/block/virtio_net.ko\n")
    assert kmod.order_modules(["virtio_net"], deps, builtin) == []


def test_unknown_module_is_an_error():
    with pytest.raises(kmod.ModuleError):
        kmod.order_modules(["nonexistent"], kmod.parse_modules_dep(MODULES_DEP))


def test_cycle_is_an_error():
    deps = kmod.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(kmod.ModuleError, match="cycle"):
        kmod.order_modules(["a"], deps)


def test_compressed_name_and_format():
    assert kmod.module_name("kernel/net/9p/9pnet_virtio.ko.xz") == "9pnet_virtio"
    deps = kmod.parse_modules_dep(MODULES_DEP)
    assert kmod.parse_modules_dep(kmod.format_modules_dep(deps)) == deps


def test_read_wanted_ignores_comments(tmp_path):
    f = tmp_path / "modules.txt"
    f.write_text("# header\nvsock  # control channel\n\nvirtio-net\n")
    assert kmod.read_wanted(f) == ["vsock", "virtio_net"]
