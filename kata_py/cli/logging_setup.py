"""runc-style logging: --log FILE, --log-format text|json, --debug.

containerd's runc shim reads the last error line of a JSON log, so every
fatal error goes there as {"level":"error","msg":...,"time":...}.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from ..logformat import JsonFormatter


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat()
        return f'time="{when}" level={record.levelname.lower()} msg={json.dumps(record.getMessage())}'


def setup(log_file: str | None, log_format: str, debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        root.addHandler(handler)
        # Milestones of a container's start (kata_py/timing.py), for bench/.
        logging.getLogger("kata_py.timing").setLevel(logging.INFO)
    elif debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter())
        root.addHandler(handler)
    else:
        # Without this, logging's last-resort handler would print errors to
        # stderr a second time, next to the CLI's own one-line message.
        root.addHandler(logging.NullHandler())
    # asyncio and QMP are chatty at debug level and say nothing a user needs.
    logging.getLogger("qemu").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
