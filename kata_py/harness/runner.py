"""Runs a battery: sets up the host side, creates one container with the
chosen runtime, runs every ordinary probe in one exec (each under its own
timeout), decides them (putting back anything a broken probe changed on
the host), then runs the probes with a host step in their middle (the
bombs), each in an exec of its own, and deletes the container.

`decide` is where a verdict is earned: a probe's check may say held only
if the probe ran to its end marker, with a status it accepts, and printed
the evidence it declares; otherwise it is inconclusive, with the reason."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import bundle as bundle_module
from . import catalog
from .host import HostSide
from .probe import (BROKE, CHECK_FAILED, DID_NOT_RUN, END, ERROR_STATUS, HELD, INCONCLUSIVE, MISSING_EVIDENCE,
                    MISSING_TOOL, NO_END_MARKER, NOTHING_PRINTED, RESULTS, TIMEOUT, Output, Probe, SkipProbe,
                    Verdict, inconclusive, one_line)
from .runtime import Runtime

log = logging.getLogger("kata_py.harness")

OUTPUT_KEPT = 4000  # characters of a probe's own output kept in the report
READY = "@@ready"
SCHEMA = "kata-py-harness-result/1"  # the JSON's format (result.schema.json)
KILLED = (124, 137)  # `timeout` ran out: 137 from `timeout -s KILL`, 124 from a plain timeout
_NOT_FOUND = re.compile(r"(?:^|\s)([A-Za-z0-9_.+-]+): (?:applet )?not found\b", re.MULTILINE)


@dataclass
class ProbeResult:
    name: str
    title: str
    result: str
    evidence: str
    output: str = ""
    reason: str = ""  # why it is inconclusive
    control: str = ""  # the configuration in which it must break (controls.py)


@dataclass
class HarnessReport:
    runtime: str
    runtime_version: str
    host_kernel: str
    host_name: str
    results: list[ProbeResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    host: str = ""  # where it ran: the hostname, or what a remote run names its node by
    configuration: str = "default"  # or the positive control it ran (controls.py)

    def __post_init__(self) -> None:
        self.host = self.host or self.host_name

    @property
    def summary(self) -> dict[str, int]:
        return {result: sum(1 for r in self.results if r.result == result) for result in RESULTS}

    def as_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self), "summary": self.summary}


def run_harness(runtime: str = "kata-py", bundle: str | None = None, rootfs: str | None = None,
                probe_names: list[str] | None = None, control=None, probes: list[Probe] | None = None
                ) -> HarnessReport:
    """One battery in one container. `control` (a controls.Control) weakens
    the harness's own spec so that its probes must break."""
    probes = probes if probes is not None else catalog.select(probe_names)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kata-py-harness-") as tmp:
        work = Path(tmp)
        engine = Runtime.resolve(runtime, work / "state")
        setup = bundle_module.prepare(work, bundle, rootfs)
        host = HostSide(setup.rootfs)
        host.runtime_exe = engine.argv[0]
        host.runtime = engine  # for a probe whose host step makes a container of its own (mount_probes)
        try:
            bin_dir = host.install_busybox()
            if control is not None:
                control.weaken(setup.config, host)
            note = engine.fit_limits(setup.config)
            if note is not None:
                setup.notes.append(note)
            setup.write(bin_dir)
            battery = Battery(engine, host, bin_dir, f"kata-py-harness-{host.token}",
                              leak_dir=host.canary_dir if control is not None and control.leak_fd else None)
            verdicts, outputs = battery.run(probes, setup.bundle, work / "init.log")
        finally:
            host.close()
        notes = list(setup.notes)
        if control is not None:
            notes.append(f"positive control {control.name}: {control.description}")
        if battery.delete_error:
            notes.append(f"{engine.name} delete --force failed: {battery.delete_error}")
        results = [ProbeResult(p.name, p.title, verdicts[p.name].result, verdicts[p.name].evidence,
                               outputs.get(p.name, Output()).text[-OUTPUT_KEPT:], verdicts[p.name].reason,
                               p.control) for p in probes]
        return HarnessReport(runtime=engine.name, runtime_version=engine.version(),
                             host_kernel=host.facts.kernel_release, host_name=host.facts.hostname,
                             results=results, notes=notes, seconds=round(time.monotonic() - started, 1),
                             configuration=control.name if control is not None else "default")


EXIT_INCONCLUSIVE = 3  # `harness run`: some probe earned no verdict (unless --allow-inconclusive)
EXIT_BLIND = 4  # `harness run --control`: some probe held in its positive control


def exit_status(reports: list[HarnessReport], allow_inconclusive: bool = False, control: bool = False) -> int:
    """`harness run`'s exit status: 0 when every probe has a verdict (held or
    broke; a break is a finding, not a failure of the run), 3 when one is
    inconclusive; with `control`, 4 when a probe held in its positive control."""
    results = [r.result for report in reports for r in report.results]
    if control and HELD in results:
        return EXIT_BLIND
    if INCONCLUSIVE in results and not allow_inconclusive:
        return EXIT_INCONCLUSIVE
    return 0


class Battery:
    """One container, the probes run in it, their verdicts."""

    def __init__(self, runtime: Runtime, host: HostSide, bin_dir: str, container_id: str,
                 leak_dir: Path | None = None) -> None:
        self.runtime = runtime
        self.host = host
        self.bin_dir = bin_dir
        self.container_id = container_id
        self.leak_dir = leak_dir  # a host directory handed to the batch's exec as fd 3 (a control)
        self.delete_error: str | None = None

    def run(self, probes: list[Probe], bundle: Path, init_log: Path) -> tuple[dict[str, Verdict], dict[str, Output]]:
        verdicts: dict[str, Verdict] = {}
        variables: dict[str, dict[str, str]] = {}
        for probe in probes:
            try:
                variables[probe.name] = probe.setup(self.host) if probe.setup else {}
            except SkipProbe as exc:
                verdicts[probe.name] = inconclusive(one_line(str(exc)))
        runnable = [p for p in probes if p.name not in verdicts]
        outputs: dict[str, Output] = {}
        try:
            started = time.monotonic()
            self.runtime.start(bundle, self.container_id, init_log)
            log.info("harness: %s started the container in %.1f s", self.runtime.name, time.monotonic() - started)
            batch = [p for p in runnable if p.during is None]
            if batch:
                started = time.monotonic()
                status, text = self.runtime.exec(self.container_id, self._argv(self._batch(batch, variables)),
                                                 timeout=sum(p.timeout for p in batch) + 120,
                                                 leak_dir=self.leak_dir)
                outputs.update(parse_batch(text))
                log.info("harness: %d probes ran in one exec in %.1f s", len(batch), time.monotonic() - started)
                why = f"the exec ended with status {status}: {one_line(text[-200:])}"
                # Decided at once: a broken probe's change to the host is put back before the bombs run.
                for probe in batch:
                    verdicts[probe.name] = decide(probe, outputs.get(probe.name, Output()), self.host, why)
            for probe in runnable:
                if probe.during is not None:
                    started = time.monotonic()
                    outputs[probe.name] = self._interactive(probe, variables[probe.name])
                    log.info("harness: %s ran in %.1f s", probe.name, time.monotonic() - started)
                    verdicts[probe.name] = decide(probe, outputs[probe.name], self.host, "see its output")
        finally:
            self.delete_error = self.runtime.delete(self.container_id)
        return verdicts, outputs

    def _argv(self, script: str) -> list[str]:
        return [f"{self.bin_dir}/sh", "-c", script]

    def _body(self, probe: Probe, variables: dict[str, str]) -> str:
        """A probe's script with what every probe has: the harness's busybox
        first on PATH, H_PLANT (the harness's directory in the rootfs), S (a
        scratch directory of its own, in the container's /dev: a tmpfs where
        device nodes can be made)."""
        lines = [f"export PATH={shlex.quote(self.bin_dir)}:$PATH", f"H_PLANT={shlex.quote(self.host.plant)}",
                 'S=/dev/.kata-py-harness-$$',
                 'mkdir -p "$S" 2>/dev/null || { S="$H_PLANT/scratch/$$"; mkdir -p "$S"; }']
        lines += [f"{key}={shlex.quote(value)}" for key, value in variables.items()]
        return "\n".join(lines) + "\n" + probe.script.rstrip("\n") + f"\necho {END}\n"

    def _timeout(self, probe: Probe) -> list[str]:
        return [f"{self.bin_dir}/timeout", "-s", "KILL", str(probe.timeout), f"{self.bin_dir}/sh", "-c"]

    def _batch(self, probes: list[Probe], variables: dict[str, dict[str, str]]) -> str:
        lines = ["exec 2>&1"]
        for probe in probes:
            command = " ".join(map(shlex.quote, self._timeout(probe) + [self._body(probe, variables[probe.name])]))
            lines += [f"echo '@@probe {probe.name}'", f"{command} </dev/null", 'echo "@@status $?"']
        return "\n".join(lines) + "\n"

    def _interactive(self, probe: Probe, variables: dict[str, str]) -> Output:
        """Run a probe with a host step in its middle (see Probe.during)."""
        proc = self.runtime.exec_interactive(self.container_id, self._timeout(probe) + [self._body(probe, variables)])
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if line == READY:
                    ready.set()
                else:
                    lines.append(line)
            ready.set()  # ended without getting ready: nothing to wait for

        reader = threading.Thread(target=read, name=f"harness-{probe.name}", daemon=True)
        reader.start()
        status = None
        try:
            if ready.wait(probe.timeout + 60) and proc.poll() is None:
                self.host.during[probe.name] = probe.during(self.host)
                try:
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass
            status = proc.wait(probe.timeout + 60)
        except subprocess.TimeoutExpired:  # a backstop: `timeout` in the container ends it first
            proc.kill()
            proc.wait()
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            reader.join(30)
        output = Output(text="\n".join(lines) + "\n", status=status, ran=True)
        return output


def parse_batch(text: str) -> dict[str, Output]:
    """The batch's output, split at its `@@probe NAME` / `@@status N` lines."""
    outputs: dict[str, Output] = {}
    current: Output | None = None
    for line in text.splitlines():
        if line.startswith("@@probe "):
            current = outputs[line[len("@@probe "):].strip()] = Output(ran=True)
        elif line.startswith("@@status ") and current is not None:
            value = line[len("@@status "):].strip()
            current.status = int(value) if value.isdigit() else None
            current = None
        elif current is not None:
            current.text += line + "\n"
    return outputs


def decide(probe: Probe, output: Output, host: HostSide, why_not_run: str) -> Verdict:
    """The probe's check, then whether a `held` was earned. Host-side
    evidence of a break stands however the script ended; a `held` needs
    the script to have run to its end marker, with a status it accepts,
    and to have printed every piece of evidence it declares."""
    try:
        verdict = probe.check(output, host)
    except SkipProbe as exc:
        return inconclusive(one_line(str(exc)))
    except (KeyError, ValueError, OSError) as exc:
        log.warning("probe %s: check failed: %s", probe.name, exc)
        return inconclusive(one_line(f"the host-side check failed: {exc}"), CHECK_FAILED)
    if verdict.result == BROKE:
        return verdict
    unearned = unearned_held(probe, output, why_not_run)
    if unearned is None:
        return verdict  # held, or what the check itself found missing
    reason, detail = unearned
    return inconclusive(one_line(f"{detail}; host side: {verdict.evidence}"), reason)


def unearned_held(probe: Probe, output: Output, why_not_run: str) -> tuple[str, str] | None:
    """(reason, detail) when the output does not earn a held; None when it does."""
    if not output.ran:
        return DID_NOT_RUN, f"did not run ({why_not_run})"
    if output.status in KILLED and not output.ended:
        return TIMEOUT, f"killed by its {probe.timeout} s timeout (status {output.status})"
    if not output.text.strip():
        return NOTHING_PRINTED, "printed nothing" + (f" (status {output.status})" if output.status is not None
                                                     else "")
    tools = sorted(set(_NOT_FOUND.findall(output.text)))
    missing = [keys for keys in probe.evidence if not output.has(keys)]
    if tools and (missing or output.status == 127 or not output.ended):
        return MISSING_TOOL, f"not found in the container: {', '.join(tools)}"
    if output.status is None:
        return NO_END_MARKER, "did not finish: no exit status reported"
    if not output.ended:
        return NO_END_MARKER, f"ended before its end marker (status {output.status})"
    if output.status not in probe.ok_status:
        return ERROR_STATUS, f"ended with status {output.status}"
    if missing:
        return MISSING_EVIDENCE, f"printed no {', '.join(missing)}"
    return None
