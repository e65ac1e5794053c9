"""The JSON log line runc writes and containerd's runc shim reads back: the
shim takes the runtime's error from the last JSON line of `--log`, so every
process writing to that file (the CLI, the container's monitor) writes these."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower().replace("warning", "warn"),
                           "msg": record.getMessage(),
                           "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat()})
