"""`kata-py harness run --host ssh://user@node[:port]`: the battery run on a
node over SSH, with that node's runtime, its host-side evidence gathered
there, and the same report a local run gives (plus `host`).

For each node: connect (ssh_session: host key checked, key login), clean up
after any earlier run there that was cut short (remote_record), make a
private directory (0700) on the node, copy the probe bundle into it over
SFTP (ssh_bundle), run it (remote_node) and read its results as they come,
then remove everything it made (remote_cleanup) and check that it is gone.

A connection lost mid-run keeps the results that came back; every probe
whose result did not is `inconclusive` (the connection was lost). Cleanup is
tried again on a new connection at once, and, if that fails too, at the
next run against the node. `--hosts FILE` runs several nodes at once, one
thread each."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, KataError
from . import remote_record, ssh_bundle
from .probe import CONNECTION_LOST, DID_NOT_RUN, INCONCLUSIVE
from .remote_record import Record
from .runner import HarnessReport, ProbeResult, exit_status
from .ssh_session import ConnectionLost, LoginOptions, Session
from .ssh_target import SshTarget, targets_from
from .ssh_trust import KnownHosts, RemoteError, default_known_hosts

log = logging.getLogger("kata_py.harness")

MIN_PYTHON = (3, 11)
RECONNECT_TRIES, RECONNECT_PAUSE = 3, 2.0
CLEANUP_TIMEOUT = 600  # a TERMed harness has 30 s, then each container's delete up to 300 s

Progress = Callable[[str], None]


@dataclass
class RemoteOptions:
    runtime: str
    probe_names: list[str] | None
    login: LoginOptions


# -- one node


def run_on(target: SshTarget, options: RemoteOptions, progress: Progress | None = None) -> dict:
    """The node's report (the local JSON report, plus `host`)."""
    runtime = target.runtime or options.runtime
    say = progress or (lambda _line: None)
    started = time.monotonic()
    session = Session.open(target, options.login)
    notes: list[str] = []
    try:
        notes += remote_record.clean_leftovers(target, lambda record: clean_node(session, record))
        node_arch = _check_node(session, target)
        record = Record.new(target, runtime)
        try:
            _make_work(session, record.work)
            notes += _upload(session, record.work, node_arch)
            say(f"{target.url}: bundle copied to {record.work}; running the battery with {runtime}")
            events, cut = _battery(session, record, runtime, options.probe_names, say)
        finally:
            left = None
            if session.alive():
                try:
                    left = clean_node(session, record)
                except RemoteError as exc:
                    log.warning("%s: cleanup: %s", target.url, exc)
            if left is None:
                session.close()
                session, left = _clean_after_reconnect(target, options.login, record)
            if left is None:
                record.release()
                notes.append(f"the node could not be reached to clean up {record.work}: recorded in "
                             f"{record.path}, cleaned up at the next run against {target.url}")
            elif left:
                record.release()
                notes.append(f"cleanup on the node left: {'; '.join(left)} (recorded in {record.path})")
            else:
                record.done()
    finally:
        if session is not None:
            session.close()
    if events.get("error"):
        raise RemoteError(f"{target.url}: {events['error']}")
    if not events["probes"]:  # cut before the node said which: the ones asked for
        from . import catalog

        events["probes"] = [{"name": p.name, "title": p.title} for p in catalog.select(options.probe_names)]
    return merge(target.url, runtime, events, cut, notes, round(time.monotonic() - started, 1))


def _check_node(session: Session, target: SshTarget) -> str:
    status, out, err = session.run("uname -m && python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    lines = out.split()
    if status != 0 or len(lines) != 2:
        raise RemoteError(f"{target.url}: the node has no usable python3 (the harness runs on it with python3 "
                          f"{'.'.join(map(str, MIN_PYTHON))}+): {(err or out).strip()[-200:]}")
    arch, version = lines
    if tuple(int(part) for part in version.split(".")) < MIN_PYTHON:
        raise RemoteError(f"{target.url}: the node's python3 is {version}; the harness needs "
                          f"{'.'.join(map(str, MIN_PYTHON))}+")
    return arch


def _make_work(session: Session, work: str) -> None:
    """The run's private directory. Its name (a random token) was recorded
    before it is made; mkdir fails on anything already there, symlinks
    included, and the result is checked: a directory, ours, mode 0700."""
    quoted = shlex.quote(work)
    status, _out, err = session.run(f"umask 077 && mkdir -m 700 {quoted} && mkdir {quoted}/tmp {quoted}/bin "
                                    "&& id -u")
    if status != 0:
        raise RemoteError(f"{session.target.url}: cannot make {work}: {err.strip()[-200:]}")
    uid = int(_out.strip() or -1)
    st = session.sftp.lstat(work)
    if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o700 or st.st_uid != uid:
        raise RemoteError(f"{session.target.url}: {work} is not a private directory of ours")


def _upload(session: Session, work: str, node_arch: str) -> list[str]:
    import io

    sftp = session.sftp
    sftp.putfo(io.BytesIO(ssh_bundle.zipapp()), f"{work}/harness.pyz")
    if node_arch == os.uname().machine:
        sftp.put(str(ssh_bundle.busybox()), f"{work}/bin/busybox")
        sftp.chmod(f"{work}/bin/busybox", 0o700)
        return []
    return [f"the node is {node_arch}, this host {os.uname().machine}: the probes use the node's own busybox"]


def _battery(session: Session, record: Record, runtime: str, probe_names: list[str] | None,
             say: Progress) -> tuple[dict, tuple[str, str] | None]:
    """Runs the bundle on the node; (what came back, None or why the rest
    did not: (reason, one line))."""
    work = shlex.quote(record.work)
    argv = ["run", "--runtime", runtime] + (["--probe", *probe_names] if probe_names else [])
    command = (f"cd {work} && exec env TMPDIR={work}/tmp PATH={work}/bin:\"$PATH\" python3 -I {work}/harness.pyz "
               + " ".join(map(shlex.quote, argv)))
    events: dict = {"probes": [], "chunks": [], "error": None, "done": False}
    try:
        stream = session.stream(command)
    except ConnectionLost as exc:
        return events, (CONNECTION_LOST, str(exc))
    for line in stream.lines():
        try:
            event = json.loads(line)
        except ValueError:
            log.info("%s: %s", session.target.url, line)
            continue
        kind = event.get("event")
        if kind == "started":
            record.update(pid=event.get("pid"))
        elif kind == "probes":
            events["probes"] = event["probes"]
        elif kind == "running":
            say(f"{session.target.url}: running {' '.join(event['probes'])}")
        elif kind == "chunk":
            events["chunks"].append(event["report"])
            for result in event["report"].get("results", []):
                say(f"{session.target.url}: {result['name']} {result['result']}")
        elif kind == "error":
            events["error"] = event["message"]
        elif kind == "done":
            events["done"] = True
    try:
        status = stream.status()
    except ConnectionLost:
        return events, (CONNECTION_LOST, f"the connection to {session.target.url} was lost while it ran")
    if events["done"] or events["error"]:
        return events, None
    detail = stream.stderr.decode(errors="replace").strip()[-300:]
    return events, (DID_NOT_RUN, f"the harness on the node ended with status {status} before it finished: "
                                 f"{detail}")


# -- cleanup on the node


def clean_node(session: Session, record: Record) -> list[str]:
    """Removes what the run of `record` made on the node; what is still
    there afterwards (empty: all gone, checked)."""
    request = json.dumps({"work": record.work, "pid": record.data.get("pid"), "runtime": record.data["runtime"]})
    status, out, err = session.run(f"python3 -I - {shlex.quote(request)}", stdin=ssh_bundle.cleanup_source(),
                                   timeout=CLEANUP_TIMEOUT)
    try:
        done = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"the cleanup on the node failed (status {status}): {err.strip()[-300:]}"]
    if done.get("containers_deleted") or done.get("processes_stopped"):
        log.info("%s: cleanup deleted containers %s, stopped processes %s", session.target.url,
                 done.get("containers_deleted"), done.get("processes_stopped"))
    return list(done.get("left", []))


def _clean_after_reconnect(target: SshTarget, login: LoginOptions, record: Record) -> tuple[Session | None,
                                                                                            list[str] | None]:
    """A new connection for the cleanup; (session, what is left) or (None, None) when none could be made."""
    for attempt in range(RECONNECT_TRIES):
        time.sleep(RECONNECT_PAUSE * (attempt + 1))
        try:
            session = Session.open(target, login)
        except RemoteError as exc:
            log.warning("%s: reconnecting for cleanup: %s", target.url, exc)
            continue
        try:
            return session, clean_node(session, record)
        except RemoteError as exc:
            session.close()
            log.warning("%s: cleanup after reconnecting: %s", target.url, exc)
    return None, None


# -- the report


def _probe_result(**values) -> ProbeResult:
    names = {f.name for f in dataclasses.fields(ProbeResult)}
    return ProbeResult(**{key: value for key, value in values.items() if key in names})


def merge(host: str, runtime: str, events: dict, cut: tuple[str, str] | None, notes: list[str],
          seconds: float) -> dict:
    """One report from the chunks that came back; a probe that did not come
    back is inconclusive, with the reason it did not."""
    chunks = events.get("chunks", [])
    base = dict(chunks[0]) if chunks else {"runtime": os.path.basename(runtime), "runtime_version": "unknown",
                                           "host_kernel": "unknown", "host_name": "unknown"}
    returned = {r["name"]: r for chunk in chunks for r in chunk.get("results", [])}
    wanted = events.get("probes") or [{"name": name, "title": r.get("title", "")} for name, r in returned.items()]
    results = []
    for probe in wanted:
        if probe["name"] in returned:
            results.append(_probe_result(**returned[probe["name"]]))
        else:
            reason, why = cut or (DID_NOT_RUN, "no result came back from the node")
            results.append(_probe_result(name=probe["name"], title=probe["title"], result=INCONCLUSIVE,
                                         evidence=f"no result came back: {why}", reason=reason))
    all_notes = []
    for note in [n for chunk in chunks for n in chunk.get("notes", [])] + notes + ([cut[1]] if cut else []):
        if note not in all_notes:
            all_notes.append(note)
    fields = {f.name for f in dataclasses.fields(HarnessReport)}
    values = {**base, "results": results, "notes": all_notes, "seconds": seconds, "host": host}
    merged = HarnessReport(**{k: v for k, v in values.items() if k in fields}).as_dict()
    merged["host"] = host  # the node as the user named it, whatever hostname it gives itself
    return merged


def report_of(merged: dict) -> HarnessReport:
    fields = {f.name for f in dataclasses.fields(HarnessReport)}
    values = {k: v for k, v in merged.items() if k in fields}
    values["results"] = [_probe_result(**r) for r in merged["results"]]
    return HarnessReport(**values)


# -- several nodes, and the command


def run_many(targets: list[SshTarget], options: RemoteOptions, progress: Progress | None = None) -> list[dict]:
    """Every node at once; a node that fails gives {"host", "error"}."""
    def one(target: SshTarget) -> dict:
        try:
            return run_on(target, options, progress)
        except KataError as exc:
            return {"host": target.url, "error": str(exc)}

    with ThreadPoolExecutor(max_workers=min(len(targets), 16), thread_name_prefix="harness-remote") as pool:
        return list(pool.map(one, targets))


def options_from(args) -> tuple[list[SshTarget], RemoteOptions]:
    if args.bundle or args.rootfs:
        raise ConfigError("--bundle/--rootfs name local paths; a run with --host uses the harness's own bundle")
    targets = targets_from(args.host, args.hosts)
    if args.identity and not Path(args.identity).is_file():
        raise ConfigError(f"--identity {args.identity}: no such file")
    known = Path(args.known_hosts) if args.known_hosts else default_known_hosts()
    login = LoginOptions(known_hosts=KnownHosts(known, accept_new=args.accept_new_host_key),
                         identity=args.identity)
    from . import catalog

    catalog.select(args.probe)  # unknown names are refused here, before any node is reached
    return targets, RemoteOptions(runtime=args.runtime, probe_names=args.probe, login=login)


def cmd_remote(args) -> int:
    """`harness run --host/--hosts`: the reports, one per node; non-zero when
    a node failed or (without --allow-inconclusive) a probe is inconclusive."""
    from .report import as_table

    targets, options = options_from(args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if len(targets) == 1 and not args.hosts:
        reports = [run_on(targets[0], options, progress)]  # a failure is the one line the CLI prints
    else:
        reports = run_many(targets, options, progress)
    if args.json or getattr(args, "format", None) == "json":
        print(json.dumps(reports[0] if len(reports) == 1 and not args.hosts else reports, indent=2))
    else:
        blocks = []
        for report in reports:
            body = f"error: {report['error']}" if "error" in report else as_table(report_of(report))
            blocks.append(f"host {report['host']}\n{body}")
        print("\n\n".join(blocks))
    for report in reports:
        if "error" in report:
            print(f"kata-py: {report['error']}", file=sys.stderr)
    if any("error" in r for r in reports):
        return 1
    return exit_status([report_of(r) for r in reports], getattr(args, "allow_inconclusive", False))
