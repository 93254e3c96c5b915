"""Structured logging shared by every tier: each record names its tier, its process and, when it is about one
request, the request id that follows the request through every tier.

Use ``log.info("encoded", extra={"request_id": rid, "ms": 12.5})``; any ``extra`` key becomes a field. Two formats
(``--log-format``, env ``TRIBUTARY_LOG_FORMAT``): ``json``, one JSON object per line, for machines (log shippers,
the tests and benchmarks that read the logs); ``text``, one readable line (time, level, tier, message, then
``key=value`` fields), for people. ``auto`` (the default) picks text when stderr is a terminal and JSON otherwise:
a cluster started from a shell reads well, and the same command under a supervisor or in a container logs JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from contextvars import ContextVar

# Attributes every LogRecord has (plus uvicorn's colour duplicate): anything else came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


# redis-py names a failed pipeline command with its first 100 characters of arguments: a media part's bytes (an
# outside tester found PNG headers in the gateway's error lines), a prompt's. Only the command and its key are kept.
_PIPELINE_COMMAND = re.compile(r"(Command # \d+ \(\S+(?: \S+)?)( .*?)?(\) of pipeline caused error)", re.S)


def _without_arguments(text: str) -> str:
    if "of pipeline caused error" not in text:
        return text
    return _PIPELINE_COMMAND.sub(lambda mt: mt[1] + (" …" if mt[2] else "") + mt[3], text)


def _clean(value):
    return _without_arguments(value) if isinstance(value, str) else value


# The request whose handling runs in this context (set by the gateway's request and Realtime handlers; copied into
# the tasks and threads they start): a record that names no request id gets this one, so that every line a request
# causes can be found by its id, those of helpers that never see it included (a media probe's, a parser's).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def _fields(record: logging.LogRecord) -> dict:
    """The record's ``extra`` fields, pipeline arguments written out, with the request id of the context when it
    names none."""
    fields = {k: _clean(v) for k, v in vars(record).items() if k not in _STANDARD}
    if fields.get("request_id") is None and (rid := REQUEST_ID.get()) is not None:
        fields["request_id"] = rid
    return fields


class JsonFormatter(logging.Formatter):
    def __init__(self, tier: str):
        super().__init__()
        self.tier = tier
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "tier": self.tier,
            "pid": self.pid,
            "logger": record.name,
            "msg": _without_arguments(record.getMessage()),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = _without_arguments(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(JsonFormatter):
    """``13:45:01.234 INFO  gateway        request  request_id=... via=rest``: the JSON record's fields, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = " ".join(f"{k}={_short(v)}" for k, v in _fields(record).items())
        line = f"{clock} {record.levelname:<7} {self.tier:<14} {_plain(_without_arguments(record.getMessage()))}" + (
            f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + _plain(_without_arguments(self.formatException(record.exc_info)), keep="\n")
        return line


def _plain(text: str, keep: str = "") -> str:
    """``text`` with terminal control characters (ESC, BEL, CR, ...) and Unicode format characters (bidi overrides)
    written out as escapes: a client's text carried into a line can neither recolour, move the cursor over, or hide
    lines of an operator's terminal, nor forge a line of its own. ``keep``: characters left as they are."""
    if all(c.isprintable() or c in keep for c in text):
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode() for c in text)


def _short(value) -> str:
    """A field's value: as it is when it is plain, else JSON-quoted (whitespace, quotes, control or format
    characters: all escaped)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if not text or not text.isprintable() or any(c in ' "' for c in text) else text


LOG_FORMATS = ("auto", "json", "text")


def resolve_format(fmt: str | None = None) -> str:
    """``json`` or ``text`` for ``fmt`` (None: env TRIBUTARY_LOG_FORMAT, default auto: text on a terminal)."""
    fmt = (fmt or os.environ.get("TRIBUTARY_LOG_FORMAT") or "auto").lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


_format = "text"  # what setup_logging resolved, for say()


def setup_logging(tier: str, level: str = "INFO", fmt: str | None = None) -> None:
    global _format
    _format = resolve_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter((TextFormatter if _format == "text" else JsonFormatter)(tier))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    logging.captureWarnings(True)  # a library's warnings (numpy's overflow on odd audio, ...) as log lines too


def say(message: str, level: int = logging.INFO, **fields) -> None:
    """A line for the operator of ``tributary up`` (starting, a child's exit and its last lines, stopping): as it is
    on stderr with text logs, a log record with JSON logs, so that a log collector reading JSON lines never meets a
    line that is not one."""
    if _format == "json":
        logging.getLogger("tributary").log(level, message, extra=fields)
    else:
        print(message if message.startswith("tributary") else f"tributary: {message}", file=sys.stderr, flush=True)


class Throttle:
    """For a line that a fault repeats every step or beat (Redis away): ``due()`` is True at most every ``every_s``
    seconds; ``skipped`` then says how many were held back since the last one (log it with the line)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.skipped, self.held = every_s, -1e18, 0, 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last, self.held = now, self.skipped  # held: how many were held back before this line
            self.skipped = 0
            return True
        self.skipped += 1
        return False
