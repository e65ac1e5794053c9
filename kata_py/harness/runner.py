"""Runs a battery: sets up the host side, creates one container with the
chosen runtime, runs every ordinary probe in one exec (each under its own
timeout), decides them (putting back anything a broken probe changed on
the host), then runs the bombs, each in an exec of its own, and deletes the
container."""

from __future__ import annotations

import logging
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
from .probe import HELD, Output, Probe, SkipProbe, Verdict, one_line, skipped
from .runtime import Runtime

log = logging.getLogger("kata_py.harness")

OUTPUT_KEPT = 4000  # characters of a probe's own output kept in the report
READY = "@@ready"


@dataclass
class ProbeResult:
    name: str
    title: str
    result: str
    evidence: str
    output: str = ""


@dataclass
class HarnessReport:
    runtime: str
    runtime_version: str
    host_kernel: str
    host_name: str
    results: list[ProbeResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        summary = {result: sum(1 for r in self.results if r.result == result) for result in ("held", "broke",
                                                                                               "skipped")}
        return {**asdict(self), "summary": summary}


def run_harness(runtime: str = "kata-py", bundle: str | None = None, rootfs: str | None = None,
                probe_names: list[str] | None = None) -> HarnessReport:
    probes = catalog.select(probe_names)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kata-py-harness-") as tmp:
        work = Path(tmp)
        engine = Runtime.resolve(runtime, work / "state")
        setup = bundle_module.prepare(work, bundle, rootfs)
        host = HostSide(setup.rootfs)
        try:
            bin_dir = host.install_busybox()
            setup.write(bin_dir)
            battery = Battery(engine, host, bin_dir, f"kata-py-harness-{host.token}")
            verdicts, outputs = battery.run(probes, setup.bundle, work / "init.log")
        finally:
            host.close()
        notes = list(setup.notes)
        if battery.delete_error:
            notes.append(f"{engine.name} delete --force failed: {battery.delete_error}")
        results = [ProbeResult(p.name, p.title, verdicts[p.name].result, verdicts[p.name].evidence,
                               outputs.get(p.name, Output()).text[-OUTPUT_KEPT:]) for p in probes]
        return HarnessReport(runtime=engine.name, runtime_version=engine.version(),
                             host_kernel=host.facts.kernel_release, host_name=host.facts.hostname,
                             results=results, notes=notes, seconds=round(time.monotonic() - started, 1))


class Battery:
    """One container, the probes run in it, their verdicts."""

    def __init__(self, runtime: Runtime, host: HostSide, bin_dir: str, container_id: str) -> None:
        self.runtime = runtime
        self.host = host
        self.bin_dir = bin_dir
        self.container_id = container_id
        self.delete_error: str | None = None

    def run(self, probes: list[Probe], bundle: Path, init_log: Path) -> tuple[dict[str, Verdict], dict[str, Output]]:
        verdicts: dict[str, Verdict] = {}
        variables: dict[str, dict[str, str]] = {}
        for probe in probes:
            try:
                variables[probe.name] = probe.setup(self.host) if probe.setup else {}
            except SkipProbe as exc:
                verdicts[probe.name] = skipped(str(exc))
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
                                                 timeout=sum(p.timeout for p in batch) + 120)
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
        return "\n".join(lines) + "\n" + probe.script

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
    """The probe's check; a probe that did not run to the end cannot have held."""
    try:
        verdict = probe.check(output, host)
    except (KeyError, ValueError, OSError) as exc:
        log.warning("probe %s: check failed: %s", probe.name, exc)
        return skipped(one_line(f"the host-side check failed: {exc}"))
    if verdict.result == HELD and output.status is None:
        if not output.ran:
            return skipped(one_line(f"did not run ({why_not_run}); host side: {verdict.evidence}"))
        return skipped(one_line(f"did not finish; host side: {verdict.evidence}"))
    return verdict
