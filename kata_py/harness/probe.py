"""What a probe is: a busybox shell script run inside the container, the
evidence it must print, a host-side check that decides, from evidence,
whether the boundary held, and the control configuration in which it must
report broke.

The container's output is untrusted and is only ever evidence of what the
container saw; wherever the proof can come from the host (a canary's
content, a listener's accepted connection, a sysctl's value), it does.

A verdict is earned: `held` needs the script to have run to its end
marker with the status it declares and to have printed every piece of
evidence it declares; anything less is `inconclusive`, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

HELD = "held"
BROKE = "broke"
INCONCLUSIVE = "inconclusive"  # the probe did not produce what a verdict needs: no verdict either way
RESULTS = (HELD, BROKE, INCONCLUSIVE)

# Earlier names of the non-verdict, for probe modules that still use them.
SKIPPED = INCONCLUSIVE

END = "@@end"  # the last line of every probe script: it ran to the end

# Why a probe is inconclusive (Verdict.reason).
DID_NOT_RUN = "did not run"
TIMEOUT = "timeout"
ERROR_STATUS = "error status"
MISSING_TOOL = "missing tool"
NOTHING_PRINTED = "nothing printed"
NO_END_MARKER = "no end marker"
MISSING_EVIDENCE = "missing evidence"
CHECK_FAILED = "check failed"
UNAVAILABLE = "unavailable here"  # this host (or container) lacks what the probe needs
CONNECTION_LOST = "connection lost"  # a remote run: the probe's result never came back
REASONS = (DID_NOT_RUN, TIMEOUT, ERROR_STATUS, MISSING_TOOL, NOTHING_PRINTED, NO_END_MARKER,
           MISSING_EVIDENCE, CHECK_FAILED, UNAVAILABLE, CONNECTION_LOST)

_LINE = re.compile(r"^([A-Za-z0-9_.:/@-]{1,200})=(.*)$")


class SkipProbe(Exception):
    """Raised by a probe's setup (or check) when this host cannot give it what
    it needs: the probe is inconclusive, with this as its evidence."""


@dataclass(frozen=True)
class Verdict:
    result: str
    evidence: str  # one line
    reason: str = ""  # for inconclusive: one of REASONS


def held(evidence: str) -> Verdict:
    return Verdict(HELD, evidence)


def broke(evidence: str) -> Verdict:
    return Verdict(BROKE, evidence)


def inconclusive(evidence: str, reason: str = UNAVAILABLE) -> Verdict:
    return Verdict(INCONCLUSIVE, evidence, reason)


skipped = inconclusive  # the earlier name


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

    @property
    def ended(self) -> bool:
        """Did the script reach its end marker?"""
        return END in self.text.splitlines()

    def has(self, alternatives: str) -> bool:
        """Did it print one of `a|b|c`?"""
        return any(self.values(key) for key in alternatives.split("|"))


@dataclass(frozen=True)
class Probe:
    """One probe. `setup(host)` plants what the probe needs on the host and
    returns the shell variables its script reads; `check(output, host)`
    decides. A probe with `during` runs in an exec of its own: its script
    prints `@@ready` and waits for a line on stdin, which the harness sends
    once `during(host)` (a host-side measurement) has returned; `check` then
    gets that measurement as `host.during[probe.name]`.

    `evidence` names the keys its script must print for `held` (`a|b`: one
    of them); `ok_status` the exit statuses its script may end with.
    `control` names the configuration (controls.py) in which it must
    report broke: the proof that it can see a break at all."""

    name: str
    title: str
    script: str
    check: Callable[[Output, object], Verdict]
    evidence: tuple[str, ...] = ()
    control: str = "privileged"
    setup: Callable[[object], dict[str, str]] | None = None
    during: Callable[[object], dict] | None = None
    default: bool = True  # part of the battery when no --probe is given
    timeout: int = 30     # seconds the script may run in the container
    ok_status: tuple[int, ...] = (0,)


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
