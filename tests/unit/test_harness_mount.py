"""The mount-target symlink race probe's logic, without a container: its
verdicts from what the host step measured, its attempts driven against a
runtime that only records what it is asked, the control's host-side
resolution, and that nothing it made is left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kata_py.harness import catalog, controls, mount_probes
from kata_py.harness.mount_probes import FOLLOW_ON_HOST, NAME, MountRace
from kata_py.harness.probe import BROKE, END, HELD, INCONCLUSIVE, MISSING_EVIDENCE, Output, SkipProbe
from kata_py.harness.runner import decide
from kata_py.harness.runtime import HarnessError

PROBE = catalog.BY_NAME[NAME]
SCRIPT_OUT = "planted=/x/lnk -> /t\nswaps=120\n"


class RecordingRuntime:
    """Stands in for the runtime under test: records each call; its exec
    returns what `report` gives for the container's spec."""

    def __init__(self, report=None, refuse: bool = False, root: Path | None = None) -> None:
        self.root = root or Path("/nonexistent/kata-py-test-state")
        self.failing_deletes = 0  # this many deletes fail (with the state entry kept)
        self.calls: list[tuple] = []
        self.specs: list[dict] = []
        self.report = report or (lambda spec, race: "exposed=\n@@end\n")
        self.refuse = refuse
        self.race: MountRace | None = None

    def start(self, bundle, container_id, log) -> None:
        self.calls.append(("start", container_id))
        self.specs.append(json.loads((bundle / "config.json").read_text()))
        if self.refuse:
            raise HarnessError("runc could not run the harness container: mount /vol/lnk: possible malicious path")

    def exec(self, container_id, argv, timeout, leak_dir=None):
        self.calls.append(("exec", container_id))
        return 0, self.report(self.specs[-1], self.race)

    def delete(self, container_id):
        self.calls.append(("delete", container_id))
        if self.failing_deletes:
            self.failing_deletes -= 1
            (self.root / container_id).mkdir(parents=True, exist_ok=True)
            return "container is busy"
        if (self.root / container_id).exists():
            (self.root / container_id).rmdir()
        return None


def prepared(host, runtime=None) -> MountRace:
    host.runtime = runtime or RecordingRuntime()
    variables = PROBE.setup(host)
    race = host.fixtures[NAME]
    assert variables["H_TARGET"] == str(race.exposed) and race.exposed.is_dir()
    assert variables["H_RACE"] == f"{host.plant}/scratch/{mount_probes.RACE}"
    return race


def plant(race: MountRace, symlink: bool) -> None:
    """What container 1's script leaves in its race directory (one moment of its swaps)."""
    race.race.mkdir()
    if symlink:
        os.symlink(str(race.exposed), race.race / "lnk")
    else:
        (race.race / "lnk").mkdir()


def out(text: str, status: int | None = 0, ended: bool = True) -> Output:
    return Output(text=text + (f"{END}\n" if ended else ""), status=status, ran=True)


def attempt(number: int, report: str = "exposed=\n@@end\n", **kwargs) -> dict:
    fields = {"number": number, "destination": "/vol/lnk", "refused": "", "report": report,
              "reported": "@@end" in report, "host": [], "delete_error": ""}
    return {**fields, **kwargs}


def measured(*attempts: dict, symlink: int = 40) -> dict:
    return {"attempts": list(attempts), "planned": 5, "seconds": 1.0, "followed": False,
            "samples": {"symlink": symlink, "directory": 40, "absent": 10, "other": 0}}


def test_held_needs_its_evidence(host):
    race = prepared(host)
    token = f"token-at=/vol/lnk: {race.secret}\n"
    host.during[NAME] = measured(attempt(1, token + "exposed=\n@@end\n"), attempt(2))
    verdict = decide(PROBE, out(SCRIPT_OUT), host, "")
    assert verdict.result == HELD, verdict
    assert "2 attempt(s)" in verdict.evidence and "in /vol (its destination" in verdict.evidence
    assert "1x" in verdict.evidence and "swapped 120" in verdict.evidence
    # No swaps reported, or the script cut short: no held.
    assert decide(PROBE, out("planted=/x/lnk -> /t\n"), host, "").result == INCONCLUSIVE
    cut = decide(PROBE, out(SCRIPT_OUT, status=137, ended=False), host, "")
    assert (cut.result, cut.reason) == (INCONCLUSIVE, "timeout")
    assert decide(PROBE, out("planted=/x/lnk -> /t\nswaps=0\n"), host, "").result == INCONCLUSIVE
    # The host never saw the symlink in place: the race was not on.
    host.during[NAME] = measured(attempt(1), symlink=0)
    quiet = decide(PROBE, out(SCRIPT_OUT), host, "")
    assert (quiet.result, quiet.reason) == (INCONCLUSIVE, MISSING_EVIDENCE) and "never saw" in quiet.evidence


def test_the_token_at_exposed_is_a_break_however_the_script_ended(host):
    race = prepared(host)
    host.during[NAME] = measured(attempt(1), attempt(2, f"token-at=/exposed: {race.secret}\nexposed=t\n@@end\n"))
    verdict = decide(PROBE, out(SCRIPT_OUT, status=137, ended=False), host, "")
    assert verdict.result == BROKE and "attempt 2" in verdict.evidence and str(race.exposed) in verdict.evidence
    # A line naming /exposed without the token's secret is no break.
    host.during[NAME] = measured(attempt(1, "token-at=/exposed: cat: can't open\nexposed=\n@@end\n"))
    assert decide(PROBE, out(SCRIPT_OUT), host, "").result == HELD
    # Host-side evidence alone is enough (a runtime that mounts on the host).
    host.during[NAME] = measured(attempt(1, host=[f"the host's {race.exposed} holds the token"]))
    assert decide(PROBE, out(SCRIPT_OUT), host, "").result == BROKE


def test_container_2_that_never_ran_is_inconclusive(host):
    prepared(host)
    refused = "runc could not run the harness container: possible malicious path detected"
    host.during[NAME] = measured(attempt(1, "", refused=refused), attempt(2, "", refused=refused))
    verdict = decide(PROBE, out(SCRIPT_OUT), host, "")
    assert (verdict.result, verdict.reason) == (INCONCLUSIVE, MISSING_EVIDENCE)
    assert "never ran" in verdict.evidence and "malicious path" in verdict.evidence
    # A report without its end marker does not count as having run.
    host.during[NAME] = measured(attempt(1, "exposed=\n"))
    assert decide(PROBE, out(SCRIPT_OUT), host, "").result == INCONCLUSIVE
    # The host step failed, or never ran.
    host.during[NAME] = {"error": "the host step failed: boom"}
    assert decide(PROBE, out(SCRIPT_OUT), host, "").reason == "check failed"
    del host.during[NAME]
    assert decide(PROBE, out(SCRIPT_OUT), host, "").result == INCONCLUSIVE


def test_attempts_mount_the_volume_then_the_token_and_delete_every_container(host):
    runtime = RecordingRuntime()
    race = prepared(host, runtime)
    plant(race, symlink=False)
    result = race.run()
    assert [a["number"] for a in result["attempts"]] == list(range(1, mount_probes.MAX_ATTEMPTS + 1))
    assert all(a["reported"] and not a["refused"] for a in result["attempts"])
    starts = [cid for call, cid in runtime.calls if call == "start"]
    assert starts == [cid for call, cid in runtime.calls if call == "delete"]  # each one deleted
    assert all(f"kata-py-harness-{host.token}" not in cid for cid in starts)  # not the battery's id
    mounts = runtime.specs[0]["mounts"]
    assert mounts[-2] == {"destination": "/vol", "type": "bind", "source": str(race.race), "options": ["rbind", "rw"]}
    assert mounts[-1] == {"destination": "/vol/lnk", "type": "bind", "source": str(race.token_dir),
                          "options": ["rbind", "ro"]}
    assert runtime.specs[0]["root"]["path"] == str(race.rootfs) and race.containers == set()


def test_a_refusing_runtime_is_recorded_per_attempt(host):
    race = prepared(host, RecordingRuntime(refuse=True))
    plant(race, symlink=False)
    result = race.run()
    assert result["attempts"] and all("malicious path" in a["refused"] for a in result["attempts"])


def test_a_container_whose_delete_failed_is_deleted_again_at_close(host, tmp_path):
    runtime = RecordingRuntime(root=tmp_path / "state")
    runtime.failing_deletes = 1
    race = prepared(host, runtime)
    plant(race, symlink=False)
    result = race.run()
    assert result["attempts"][0]["delete_error"] == "container is busy"
    assert race.containers == {race.container_id(1)}
    race.close()
    assert race.containers == set() and not race.work.exists()
    assert runtime.calls.count(("delete", race.container_id(1))) == 2


def test_the_race_directory_must_be_a_real_directory(host):
    race = prepared(host)
    assert "planted no directory" in race.run()["error"]  # the script never planted it
    os.symlink("/", race.race)
    assert "planted no directory" in race.run()["error"]  # a symlink is never handed to the runtime
    assert host.runtime.calls == []


def test_the_control_resolves_the_destination_on_the_host(host):
    race = prepared(host)
    spec: dict = {}
    controls.CONTROLS["symlink-followed"].weaken(spec, host)
    assert spec == {} and host.fixtures[FOLLOW_ON_HOST] is True
    plant(race, symlink=True)
    assert race.follow_on_host("/vol/lnk") == "/exposed"

    def report(spec, _race):
        destination = spec["mounts"][-1]["destination"]
        return (f"token-at={destination}: {_race.secret}\n" if destination == "/exposed" else "") + \
            "exposed=\n@@end\n"

    runtime = RecordingRuntime(report)
    host.runtime = race.runtime = runtime
    runtime.race = race
    result = race.run()
    assert len(result["attempts"]) == 1 and result["attempts"][0]["destination"] == "/exposed"  # stopped at the break
    host.during[NAME] = result
    verdict = decide(PROBE, out(SCRIPT_OUT), host, "")
    assert verdict.result == BROKE and "handed to the runtime as /exposed" in verdict.evidence


def test_the_control_never_resolves_outside_the_second_rootfs(host, monkeypatch):
    race = prepared(host)
    monkeypatch.setattr(mount_probes, "FOLLOW_WINDOW", 0.05)
    race.race.mkdir()
    os.symlink(str(host.canary_dir), race.race / "lnk")  # a host path, but not in container 2's rootfs
    assert race.follow_on_host("/vol/lnk") == "/vol/lnk"
    (race.race / "lnk").unlink()
    os.symlink(str(race.rootfs), race.race / "lnk")  # its root itself: not a destination to hand over
    assert race.follow_on_host("/vol/lnk") == "/vol/lnk"


def test_without_the_runtime_the_probe_cannot_run(host):
    with pytest.raises(SkipProbe, match="runtime under test"):
        PROBE.setup(host)


def test_the_probe_is_in_the_battery_with_its_own_control():
    assert PROBE.default and PROBE.during is not None and PROBE.control == "symlink-followed"
    assert "CVE-2021-30465" in PROBE.title and "symlink race" in PROBE.title
    assert [p.name for probes in [ps for c, ps in controls.plan([NAME])] for p in probes] == [NAME]
    assert "securejoin" in controls.CONTROLS["symlink-followed"].description
