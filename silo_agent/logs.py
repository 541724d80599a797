"""Logging setup for the silo's long-running commands: `--log-format text|json|auto`.

Rule: one place decides how log records look. `json` writes one JSON object per line to stderr
(`ts` ISO-8601 UTC, `level`, `logger`, `message`, `exc` when there is a traceback, and any
`extra=` fields a caller attached), for log shippers. `text` writes timestamped plain lines.
`auto` (the default) uses rich on a terminal and plain lines otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

FORMATS = ("auto", "text", "json")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="auto",
        help="json: one JSON object per line; text: plain lines; auto (default): rich on a "
        "terminal, text otherwise",
    )


def setup_logging(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process."""
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    elif log_format == "auto" and out.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
