"""What a remote run made on a node, written down here before it is made:
one JSON file per run (the node's work directory, the harness's pid there,
the runtime), kept until cleanup on the node is confirmed. A run whose
connection was cut, or whose client died, leaves its file, and the next run
against that node cleans up after it first.

A run holds an exclusive lock on its file while it lives, so a run against
the same node in parallel never removes another's work."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Iterator

from ..paths import state_dir
from .ssh_target import SshTarget

WORK_PREFIX = "/tmp/kata-py-harness-remote."  # the same as remote_cleanup.PREFIX


def records_dir() -> Path:
    """Under kata-py's state directory (KATA_PY_STATE_DIR, or /var/lib/kata-py
    for root); a user's own (XDG) state directory otherwise: the client side
    of a remote run needs no privileges here."""
    if "KATA_PY_STATE_DIR" in os.environ or os.geteuid() == 0:
        base = state_dir()
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "kata-py"
    return base / "harness-remote"


class Record:
    def __init__(self, path: Path, data: dict, fd: int) -> None:
        self.path = path
        self.data = data
        self._fd = fd

    @property
    def work(self) -> str:
        return self.data["work"]

    @classmethod
    def new(cls, target: SshTarget, runtime: str) -> "Record":
        directory = records_dir() / target.record_name
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_hex(10)
        path = directory / f"{token}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = cls(path, {"host": target.url, "work": WORK_PREFIX + token, "runtime": runtime, "pid": None,
                            "created": time.time()}, fd)
        record.save()
        return record

    def save(self) -> None:
        text = json.dumps(self.data).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)
        os.fsync(self._fd)

    def update(self, **values) -> None:
        self.data.update(values)
        self.save()

    def done(self) -> None:
        """Cleanup on the node is confirmed: the record goes."""
        self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def leftovers(target: SshTarget) -> Iterator[Record]:
    """Records of earlier runs against `target` that no live run holds,
    each locked while the caller cleans up after it."""
    directory = records_dir() / target.record_name
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a run in progress
            continue
        try:
            data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:
            data = {}
        if not str(data.get("work", "")).startswith(WORK_PREFIX):
            os.close(fd)
            path.unlink(missing_ok=True)  # not one of ours, or written half: nothing to act on
            continue
        yield Record(path, data, fd)


def clean_leftovers(target: SshTarget, clean: Callable[[Record], list[str]]) -> list[str]:
    """Cleans up after each earlier run; notes saying what was found."""
    notes = []
    for record in leftovers(target):
        try:
            left = clean(record)
        except BaseException:
            record.release()
            raise
        if left:
            notes.append(f"leftovers of an earlier run in {record.work} could not all be removed: "
                         f"{'; '.join(left)}")
            record.release()
        else:
            notes.append(f"cleaned up after an earlier run cut short ({record.work})")
            record.done()
    return notes
