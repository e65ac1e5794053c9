"""The battery, in the order it runs: the bombs last, each in an exec of
its own, once every other probe has had the container intact."""

from __future__ import annotations

from ..errors import ConfigError
from . import (bomb_probes, device_probes, escape_probes, fs_probes, kernel_probes, mount_probes, net_probes,
               posture_probes)
from .probe import Probe

PROBES: list[Probe] = (fs_probes.PROBES + net_probes.PROBES + device_probes.PROBES + kernel_probes.PROBES
                       + escape_probes.PROBES + mount_probes.PROBES + posture_probes.PROBES + bomb_probes.PROBES)
BY_NAME = {probe.name: probe for probe in PROBES}


def select(names: list[str] | None) -> list[Probe]:
    """The default battery, or the probes named (in battery order)."""
    if not names:
        return [probe for probe in PROBES if probe.default]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"unknown probe(s) {', '.join(unknown)}; the probes are: {', '.join(BY_NAME)}")
    return [probe for probe in PROBES if probe.name in names]
