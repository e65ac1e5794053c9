"""kata-py answers as runc does where its clients decide by the answer.

containerd's runc shim tolerates a failed kill only when the error says
"container not running", "no such process" or "does not exist"; conmon and
CRI-O read the same messages; CRI sends `kill --all ID 9` after every exit and
records the exit only once that succeeds. So each refusal below is run
against a real runc and kata-py on the same bundle, in the same states, in the
same test, and the exit status and the message must be the same.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.bundles import make_bundle
from tests.conftest import KATA
from tests.oci_helpers import cli

pytestmark = pytest.mark.vm

RUNC_MESSAGE = re.compile(r'level=error msg="(.*)"')
RUNC_FRAMING = re.compile(r"^runc \w+ failed: ")      # runc naming itself: "runc create failed: ..."

# (what the container's state is, the command); "{created}" etc. name the
# container in that state. Order matters: later steps see the earlier ones.
STEPS = [
    ("unknown", ["state", "nope"]),
    ("unknown", ["kill", "nope", "9"]),
    ("unknown", ["kill", "--all", "nope", "9"]),
    ("unknown", ["delete", "nope"]),
    ("unknown", ["delete", "--force", "nope"]),
    ("unknown", ["start", "nope"]),
    ("unknown", ["pause", "nope"]),
    ("unknown", ["resume", "nope"]),
    ("unknown", ["exec", "nope", "true"]),
    ("unknown", ["ps", "nope"]),
    ("unknown", ["events", "--stats", "nope"]),
    ("unknown", ["update", "--memory", "100000000", "nope"]),
    ("created", ["resume", "{created}"]),
    ("created", ["exec", "{created}", "true"]),
    ("created", ["create", "--bundle", "{bundle}", "{created}"]),
    ("running", ["start", "{running}"]),
    ("running", ["resume", "{running}"]),
    ("running", ["delete", "{running}"]),
    ("running", ["pause", "{running}"]),
    ("paused", ["pause", "{running}"]),
    ("paused", ["start", "{running}"]),
    ("paused", ["exec", "{running}", "true"]),
    ("paused", ["resume", "{running}"]),
    ("stopped", ["kill", "{stopped}", "9"]),
    ("stopped", ["kill", "--all", "{stopped}", "9"]),
    ("stopped", ["kill", "-a", "{stopped}"]),
    ("stopped", ["start", "{stopped}"]),
    ("stopped", ["pause", "{stopped}"]),
    ("stopped", ["resume", "{stopped}"]),
    ("stopped", ["exec", "{stopped}", "true"]),
    ("stopped", ["ps", "{stopped}"]),
    ("stopped", ["update", "--memory", "100000000", "{stopped}"]),
    ("stopped", ["events", "--stats", "{stopped}"]),
    ("stopped", ["delete", "{stopped}"]),
    ("stopped", ["delete", "{stopped}"]),
]


class Runtime:
    def __init__(self, name: str, argv: list[str], root: Path, bundle: Path, logs: Path) -> None:
        self.name, self.argv, self.root, self.bundle, self.logs = name, argv, root, bundle, logs
        self.ids = {"created": "created1", "running": "running1", "stopped": "stopped1"}

    def __call__(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        # A create leaves its container holding its stdio: files, not pipes we wait on.
        result = cli(self.root, *args, io=self.logs, runtime=self.argv, timeout=timeout)
        result.stderr = result.stderr.decode()
        return result

    def expand(self, args: list[str]) -> list[str]:
        return [a.format(bundle=self.bundle, **self.ids) for a in args]

    def must(self, *args) -> None:
        result = self(*args)
        assert result.returncode == 0, (self.name, args, result.stderr)

    def status(self, container_id: str) -> str:
        result = cli(self.root, "state", container_id, runtime=self.argv, timeout=60)
        return json.loads(result.stdout)["status"] if result.returncode == 0 else "?"

    def prepare(self, sleeper: Path, quitter: Path) -> None:
        """One container created, one running, one stopped."""
        self.must("create", "--bundle", sleeper, self.ids["created"])
        self.must("create", "--bundle", sleeper, self.ids["running"])
        self.must("start", self.ids["running"])
        self.must("create", "--bundle", quitter, self.ids["stopped"])
        self.must("start", self.ids["stopped"])
        deadline = time.monotonic() + 60
        while self.status(self.ids["stopped"]) != "stopped":
            assert time.monotonic() < deadline, f"{self.name}: the container running `true` never stopped"
            time.sleep(0.2)

    def cleanup(self) -> None:
        for container_id in self.ids.values():
            self("delete", "--force", container_id)


def answer(runtime: Runtime, result: subprocess.CompletedProcess) -> tuple[int, str | None]:
    """(exit status, the error message without the runtime's own framing)."""
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        return 0, None
    if runtime.name == "runc":
        messages = [m.group(1) for m in map(RUNC_MESSAGE.search, lines) if m]
        assert messages, result.stderr
        return result.returncode, RUNC_FRAMING.sub("", messages[-1])
    assert len(lines) == 1 and lines[0].startswith("kata-py: "), result.stderr
    return result.returncode, lines[0].removeprefix("kata-py: ")


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    base = tmp_path_factory.mktemp("wording")
    # A network namespace of its own, so that runc's containers never share the host's.
    namespaces = {"linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")]}}
    sleeper = make_bundle(base / "sleeper", ["sleep", "1000"], **namespaces)
    quitter = make_bundle(base / "quitter", ["true"], **namespaces)
    made = [Runtime("runc", ["runc"], base / "runc-root", sleeper, base / "runc-io"),
            Runtime("kata-py", list(KATA), base / "kata-root", sleeper, base / "kata-io")]
    try:
        for runtime in made:
            runtime.prepare(sleeper, quitter)
        yield made
    finally:
        for runtime in made:
            runtime.cleanup()


def test_refusals_match_runc(runtimes):
    runc, kata = runtimes
    differences = []
    table = []
    for state, args in STEPS:
        answers = []
        for runtime in (runc, kata):
            answers.append(answer(runtime, runtime(*runtime.expand(args))))
        label = " ".join(args).format(bundle="BUNDLE", created="C", running="R", stopped="S")
        table.append(f"{state:8} {label:40} runc={answers[0]} kata-py={answers[1]}")
        if answers[0] != answers[1]:
            differences.append(table[-1])
    print("\n".join(table))
    assert differences == [], "\n".join(differences)
    # The table is not vacuous: runc refused most of it, with messages.
    assert sum(1 for line in table if "runc=(0, None)" not in line) >= 20
