"""The guest kernel's recipe: the fragment is read strictly, every option it
names must survive Kconfig, and the cache key follows its inputs."""

from __future__ import annotations

import pytest

from kata_py.errors import ImageError
from kata_py.image import builder, kernel_build


def test_fragment_options_skip_comments_and_reject_junk():
    text = "# a group\nCONFIG_A=y\n\n  CONFIG_B=\"x y\"\n# CONFIG_C is not set\n"
    assert kernel_build.fragment_options(text) == {"CONFIG_A": "y", "CONFIG_B": '"x y"'}
    with pytest.raises(ImageError, match="line 2"):
        kernel_build.fragment_options("CONFIG_A=y\nVIRTIO=y\n")


def test_config_values_read_unset_options_as_n():
    values = kernel_build.config_values("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=64\n")
    assert values == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_N": "64"}


def test_unmet_names_every_option_kconfig_dropped():
    wanted = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_N": "64"}
    final = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_N": "8"}
    assert kernel_build.unmet(wanted, final) == ["CONFIG_B=y (got n)", "CONFIG_N=64 (got 8)"]
    assert kernel_build.unmet({"CONFIG_A": "y"}, {"CONFIG_A": "y"}) == []


def test_kernel_hash_follows_fragment_and_source_version():
    a = kernel_build.kernel_hash(b"CONFIG_A=y\n", "6.1.1-1")
    assert a == kernel_build.kernel_hash(b"CONFIG_A=y\n", "6.1.1-1")
    assert a != kernel_build.kernel_hash(b"CONFIG_A=n\n", "6.1.1-1")
    assert a != kernel_build.kernel_hash(b"CONFIG_A=y\n", "6.1.2-1")


def test_shipped_fragment_parses_and_builds_in_what_a_sandbox_needs():
    options = kernel_build.fragment_options(
        (builder.Inputs.from_repo().guest_dir / "kernel.config").read_text())
    for name in ("CONFIG_PVH", "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_9P_FS",
                 "CONFIG_VIRTIO_FS", "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_BALLOON", "CONFIG_SECCOMP_FILTER",
                 "CONFIG_MEMCG", "CONFIG_PID_NS", "CONFIG_EROFS_FS", "CONFIG_VIRTIO_BLK", "CONFIG_OVERLAY_FS"):
        assert options.get(name) == "y", name
    assert "CONFIG_MODULES" not in options or options["CONFIG_MODULES"] == "n"


def test_variant_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(builder.VARIANT_ENV, raising=False)
    assert builder.variant_from_env() == "sandbox"
    monkeypatch.setenv(builder.VARIANT_ENV, "debian")
    assert builder.variant_from_env() == "debian"
    monkeypatch.setenv(builder.VARIANT_ENV, "bogus")
    with pytest.raises(ImageError, match="KATA_PY_GUEST_KERNEL"):
        builder.variant_from_env()
    assert builder.image_hash("l", {"p": "1"}, "sandbox") != builder.image_hash("l", {"p": "1"}, "debian")
