"""Logging setup: readable text by default, JSON lines when configured.

Library loggers that would print request bodies (mautrix logs request content at DEBUG)
are held at INFO or above so message text never reaches the logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time

QUIET_LOGGERS = ("mau", "bridge.http", "asyncio")
# These log SQL parameters (message text) at INFO: never below WARNING.
SILENT_LOGGERS = ("sqlalchemy", "aiosqlite", "asyncpg", "aiohttp.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
