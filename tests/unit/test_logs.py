"""router/logs.py: JSON lines for machines, one readable line for people, chosen by --log-format (auto: by
whether stderr is a terminal)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from router.logs import JsonFormatter, TextFormatter, resolve_format


def record(msg: str = "request", exc: bool = False, **extra) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("bad")
        except ValueError:
            info = sys.exc_info()
    rec = logging.LogRecord("gateway.chat", logging.INFO, __file__, 1, msg, (), info)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_tier_message_and_every_extra_field():
    out = json.loads(JsonFormatter("gateway").format(record(request_id="chatcmpl-1", tokens=3)))
    assert out["tier"] == "gateway" and out["msg"] == "request" and out["level"] == "info"
    assert out["request_id"] == "chatcmpl-1" and out["tokens"] == 3


def test_text_is_one_readable_line_with_the_same_fields():
    line = TextFormatter("encoder:image").format(record("encoded", request_id="chatcmpl-1", via="rest api", n=2))
    assert "\n" not in line
    assert " INFO " in line and "encoder:image" in line and "encoded" in line
    assert "request_id=chatcmpl-1" in line and 'via="rest api"' in line and "n=2" in line
    assert not line.lstrip().startswith("{")


@pytest.mark.parametrize("text", ["/\x1b]0;owned\x07", "a\x1b[2K\rforged", "x\x1b[8m", "\u202eevil", "a\rb",
                                  "tenant=admin\x1b[1C", 'q"uote'])
def test_a_clients_text_reaches_the_terminal_escaped(text):
    """An outside tester set the operator's window title and overwrote a line with a path sent unauthenticated
    (``unauthorized path=...``): control and format characters in fields, the message or an exception's text are
    written out as escapes, and the line stays one line."""
    try:
        raise ValueError(f"bad {text}")
    except ValueError:
        info = sys.exc_info()
    rec = logging.LogRecord("gateway.auth", logging.INFO, __file__, 1, f"refused {text}", (), info)
    rec.path = text
    out = TextFormatter("gateway").format(rec)
    assert not any(c in out for c in "\x1b\x07\r\u202e"), repr(out)
    head = out.split("\n", 1)[0]
    assert "Traceback" not in head and f"path={json.dumps(text)}" in head


def test_text_keeps_the_traceback_of_an_exception():
    text = TextFormatter("backbone").format(record("step failed", exc=True))
    assert "Traceback" in text and "ValueError: bad" in text


def test_auto_is_text_on_a_terminal_and_json_otherwise(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TRIBUTARY_LOG_FORMAT", raising=False)
    monkeypatch.setattr(sys, "stderr", Tty())
    assert resolve_format() == "text" and resolve_format("json") == "json"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert resolve_format() == "json" and resolve_format("text") == "text"
    monkeypatch.setenv("TRIBUTARY_LOG_FORMAT", "text")
    assert resolve_format() == "text"
    with pytest.raises(ValueError, match="auto, json, text"):
        resolve_format("xml")


def test_a_repeated_fault_line_is_let_through_once_per_period_with_how_many_were_held():
    import time

    from router.logs import Throttle

    t = Throttle(0.2)
    assert [t.due() for _ in range(4)] == [True, False, False, False] and t.held == 0
    time.sleep(0.25)
    assert t.due() and t.held == 3 and not t.due()


def test_a_failed_pipeline_commands_arguments_are_not_logged():
    """redis-py names a failed pipeline command with its first 100 characters of arguments: an outside tester found
    a media part's PNG bytes in the gateway's error lines. The command and its key are kept, nothing after."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import OutOfMemoryError

    exc = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    Pipeline.annotate_exception(None, exc, 1, ("SET", "trib:blob:{abc}", b"\x89PNG\r\n\x1a\nsecret pixels", "EX", 60))
    error = f"{type(exc).__name__}: {exc}"
    assert "secret pixels" in error  # what redis-py says
    out = json.loads(JsonFormatter("gateway").format(record("redis unavailable", error=error)))
    assert out["error"] == ("OutOfMemoryError: Command # 1 (SET trib:blob:{abc} …) of pipeline caused error: "
                            "(\"command not allowed when used memory > 'maxmemory'.\",)")
    line = TextFormatter("gateway").format(record(f"failed: {error}", error=error))
    assert "secret" not in line and "PNG" not in line and "SET trib:blob:{abc} …" in line
    assert JsonFormatter("g").format(record("x", error="Command # 2 (GET k) of pipeline caused error: y")).count(
        "(GET k)") == 1  # nothing dropped: no ellipsis


def test_a_line_logged_while_a_request_is_handled_names_it():
    """The gateway's request handlers set REQUEST_ID: a line that names no request (a media probe's, logged where
    the id is not known) gets it; one that names its own keeps it (an outside tester's "unreadable media" line
    could not be found by the request's id)."""
    import asyncio

    from router.logs import REQUEST_ID

    async def handling():
        REQUEST_ID.set("rid-1")
        lines = [JsonFormatter("gateway").format(record("unreadable media")),
                 JsonFormatter("gateway").format(record("x", request_id="resp-2")),
                 await asyncio.to_thread(JsonFormatter("gateway").format, record("parsed on a thread"))]
        return [json.loads(line)["request_id"] for line in lines], TextFormatter("gateway").format(record("t"))

    ids, text = asyncio.run(handling())
    assert ids == ["rid-1", "resp-2", "rid-1"] and "request_id=rid-1" in text
    assert "request_id" not in json.loads(JsonFormatter("gateway").format(record("outside any request")))
