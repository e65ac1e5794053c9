"""What a probe is: a busybox shell script run inside the container, and a
host-side check that decides, from evidence, whether the boundary held.

The container's output is untrusted and is only ever evidence of what the
container saw; wherever the proof can come from the host (a canary's
content, a listener's accepted connection, a sysctl's value), it does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

HELD = "held"
BROKE = "broke"
SKIPPED = "skipped"  # the probe could not be set up or did not run: no verdict either way

_LINE = re.compile(r"^([A-Za-z0-9_.:/@-]{1,200})=(.*)$")


class SkipProbe(Exception):
    """Raised by a probe's setup when this host cannot give it what it needs."""


@dataclass(frozen=True)
class Verdict:
    result: str
    evidence: str  # one line


def held(evidence: str) -> Verdict:
    return Verdict(HELD, evidence)


def broke(evidence: str) -> Verdict:
    return Verdict(BROKE, evidence)


def skipped(evidence: str) -> Verdict:
    return Verdict(SKIPPED, evidence)


@dataclass
class Output:
    """What one probe script printed: `key=value` lines, plus the raw text."""

    text: str = ""
    status: int | None = None  # the script's exit status; None when it did not report one
    ran: bool = False

    def values(self, key: str) -> list[str]:
        found = []
        for line in self.text.splitlines():
            match = _LINE.match(line)
            if match and match.group(1) == key:
                found.append(match.group(2))
        return found

    def value(self, key: str, default: str = "") -> str:
        found = self.values(key)
        return found[-1] if found else default

    def first_line(self, key: str) -> str:
        return self.values(key)[0] if self.values(key) else ""


@dataclass(frozen=True)
class Probe:
    """One probe. `setup(host)` plants what the probe needs on the host and
    returns the shell variables its script reads; `check(output, host)`
    decides. A probe with `during` runs in an exec of its own: its script
    prints `@@ready` and waits for a line on stdin, which the harness sends
    once `during(host)` (a host-side measurement) has returned; `check` then
    gets that measurement as `host.during[probe.name]`."""

    name: str
    title: str
    script: str
    check: Callable[[Output, object], Verdict]
    setup: Callable[[object], dict[str, str]] | None = None
    during: Callable[[object], dict] | None = None
    default: bool = True  # part of the battery when no --probe is given
    timeout: int = 30     # seconds the script may run in the container


def one_line(text: str, limit: int = 160) -> str:
    """Container text made fit for one line of evidence."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def same_kernel(output: Output, facts) -> bool | None:
    """Does the container run on the host's kernel? From the boot_id it
    printed (`boot_id=`): unique to one boot of one kernel. None when the
    container could not read it."""
    boot_id = output.value("boot_id")
    if len(boot_id) != 36:
        return None
    return boot_id == facts.boot_id


BOOT_ID = "echo \"boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)\"\n"
