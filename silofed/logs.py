"""Logging setup for both roles' long-running commands: `--log-format text|json|auto`.

Rule: one place decides how log records look. `json` writes one JSON object per line to stderr
(`ts` ISO-8601 UTC, `level`, `logger`, `message`, `exc` when there is a traceback, and any
`extra=` fields a caller attached), for log shippers. `text` writes timestamped plain lines.
`auto` (the default) uses rich on a terminal and plain lines otherwise.

In `json` mode stderr stays pure JSON even for what Python's logging never sees: grpc's C core
writes its own lines (e.g. the cause of a refused TLS handshake, `I1128 ... Handshake failed
...`) straight to file descriptor 2. `setup_logging` then points fd 2 at a pipe and a thread
rewrites every line that arrives there as a JSON object (`logger` "grpc" with `level` from the
line's I/W/E/F prefix and `source` file:line; anything else, e.g. a crash traceback, line by line
as `logger` "stderr", level WARNING) before writing it to the real stderr. Handshake causes are
kept (grpc's INFO verbosity, set by the CLI, still applies) instead of being silenced.
Nothing here imports grpc (silofed must not): the redirect only reads what reaches fd 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
import threading
import time
from typing import IO, Any, TextIO

from rich.console import Console

FORMATS = ("auto", "text", "json")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# grpc core / abseil: "I0000 00:00:1732812345.123456   12345 file.cc:123] message"
_GRPC_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_GRPC_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_write_lock = threading.Lock()  # one JSON line at a time on the real stderr
_console: Console | None = None
_redirect: _StderrToJson | None = None


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


def foreign_line_to_json(line: str, now: float) -> str:
    """A line written to stderr outside `logging` (grpc core, a traceback) as one JSON object.

    A line that already is a JSON object is kept as it is.
    """
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            if isinstance(json.loads(text), dict):
                return text
        except ValueError:
            pass
    doc: dict[str, Any] = {"ts": dt.datetime.fromtimestamp(now, dt.UTC).isoformat()}
    match = _GRPC_LINE.match(text)
    if match:
        doc |= {"level": _GRPC_LEVELS[match[1]], "logger": "grpc", "message": match[3]}
        doc["source"] = match[2]
    else:
        doc |= {"level": "WARNING", "logger": "stderr", "message": text}
    return json.dumps(doc)


class _LineHandler(logging.Handler):
    """Writes each formatted record and its newline in one piece, under the shared lock."""

    def __init__(self, out: IO[str]) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with _write_lock:
                self.out.write(line)
                self.out.flush()
        except Exception:
            self.handleError(record)


class _StderrToJson:
    """Points fd 2 at a pipe; a thread writes every line from it as JSON to the real stderr."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.out = os.fdopen(os.dup(2), "w", encoding="utf-8", errors="replace")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(
            target=self._pump, args=(read_fd,), name="stderr-to-json", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    def _pump(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as source:
            for raw in source:
                line = foreign_line_to_json(raw.decode("utf-8", "replace"), time.time())
                with _write_lock:
                    self.out.write(line + "\n")
                    self.out.flush()

    def close(self) -> None:
        """Give fd 2 back to the real stderr; the pipe closes and the last lines are written."""
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self.out.fileno(), 2)
        self._thread.join(timeout=2.0)


class _CurrentStderr:
    """Whatever `sys.stderr` is at write time (rich's live display swaps it to keep its line
    at the bottom while log lines scroll above it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def console() -> Console:
    """The one rich console on stderr, shared by the log handler and the progress display."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def progress_enabled(log_format: str, stream: TextIO | None = None) -> bool:
    """Live progress only for people: stderr is a terminal and the logs are not JSON."""
    out = stream if stream is not None else sys.stderr
    return log_format != "json" and out.isatty()


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="auto",
        help="json: one JSON object per line (grpc core's lines included); text: plain lines; "
        "auto (default): rich on a terminal, text otherwise",
    )


def setup_logging(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process.

    With `json` and no `stream`, fd 2 is also rerouted so foreign lines become JSON (see the
    module docstring); with a `stream`, records go there and fd 2 is left alone.
    """
    global _redirect
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler
    if log_format == "json":
        if stream is None:
            if _redirect is None:
                _redirect = _StderrToJson()
            handler = _LineHandler(_redirect.out)
        else:
            handler = _LineHandler(stream)
        handler.setFormatter(JsonFormatter())
    elif log_format == "auto" and out.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(
            console=console() if stream is None else Console(file=out), show_path=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        target: TextIO | _CurrentStderr = _CurrentStderr() if stream is None else out
        handler = logging.StreamHandler(target)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
