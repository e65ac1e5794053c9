"""What was made in a container's network namespace, on disk.

The record is written before each step's result could be lost (after every
link, qdisc or filter made), so that whoever undoes it (the monitor at its
end, or `delete` after a killed monitor) removes exactly those things and
nothing else. Each entry names its link by index and name: a link that is
gone took what was made on it along, and an index that now belongs to
another link is left alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import NetworkError

MAX_RECORD = 1 << 20


@dataclass
class Made:
    what: str           # "tap", "qdisc" (an ingress qdisc) or "filter" (an ingress filter)
    link: str           # the link's name ...
    index: int          # ... and index, which must still match to undo it
    prio: int = 0       # a filter's preference


@dataclass
class Record:
    path: Path
    netns: str
    identity: tuple[int, int]
    made: list[Made] = field(default_factory=list)

    def add(self, made: Made) -> None:
        self.made.append(made)
        self.save()

    def save(self) -> None:
        data = {"netns": self.netns, "identity": list(self.identity), "made": [asdict(m) for m in self.made]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for path in (self.path, self.path.with_name(self.path.name + ".tmp")):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def load(path: Path) -> Record | None:
    """The record at `path`; None when there is none."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD + 1)
    except FileNotFoundError:
        return None
    try:
        if len(raw) > MAX_RECORD:
            raise ValueError("too large")
        data = json.loads(raw)
        made = [Made(str(m["what"]), str(m["link"]), int(m["index"]), int(m.get("prio", 0)))
                for m in data["made"]]
        identity = (int(data["identity"][0]), int(data["identity"][1]))
        return Record(Path(path), str(data["netns"]), identity, made)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise NetworkError(f"network record {path} is unreadable: {exc}") from None
