"""The JSON log line runc writes and containerd's runc shim reads back: the
shim takes the runtime's error from the last JSON line of `--log`, so every
process writing to that file (the CLI, the container's sandbox owner, an exec relay) writes these."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower().replace("warning", "warn"),
                           "msg": record.getMessage(),
                           "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat()})


def log_to_runtime_log(path: str | None, log_format: str, component: str) -> None:
    """Where a process started by the CLI logs: the CLI's --log file in its
    format, or nowhere. Never Python's last-resort stderr handler: such a
    process's stderr is the container's, and `create` reports errors itself."""
    if path and log_format == "json":
        handler = logging.FileHandler(path)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(handlers=[handler], level=logging.INFO)
    elif path:
        logging.basicConfig(filename=path, level=logging.INFO,
                            format=f"%(asctime)s {component} %(levelname)s %(message)s")
    else:
        logging.basicConfig(handlers=[logging.NullHandler()])
