"""``tributary up``'s output, never blocking it: its own lines and every line it passes through from its children go
to stderr through one writer thread and a bounded buffer.

A reader of that output that stops reading (a terminal paused with Ctrl-S, a pager not scrolled, a log shipper
backed up) used to freeze the whole cluster: a write to the stopped reader blocks, so the supervisor's pumps stopped
draining the children's pipes; each child then blocked in its next log line once its pipe held 64 KiB, the gateway's
event loop with it (every request hung), the workers stopped beating, and the supervisor itself blocked in its next
line (Ctrl-C could not stop it). Now a stopped reader costs lines: past ``MAX_HELD_BYTES`` waiting to be written,
lines are dropped, and one line says how many once output flows again.
"""

from __future__ import annotations

import atexit
import io
import json
import sys
import threading
import time

MAX_HELD_BYTES = 8 << 20  # lines waiting for a reader, at most: about a minute of a busy cluster's JSON logs
DRAIN_AT_EXIT_S = 2.0  # at exit, the lines still waiting are written within this, or left (the reader stopped)


class Relay:
    """Lines (bytes, each ending in a newline) written to the binary stream ``out`` in order by one thread;
    :meth:`put` never blocks."""

    def __init__(self, out, max_bytes: int = MAX_HELD_BYTES, json_lines: bool = False):
        self.out, self.max_bytes, self.json_lines = out, max_bytes, json_lines
        self.lines: list[bytes] = []
        self.held = 0  # bytes put and not yet written (those being written included)
        self.dropped = 0  # lines dropped since the last notice
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._write, name="output", daemon=True)
        self.thread.start()

    def put(self, line: bytes) -> None:
        with self.cond:
            if self.held + len(line) > self.max_bytes:
                self.dropped += 1
                return
            self.lines.append(line)
            self.held += len(line)
            self.cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every line put has been written, ``timeout`` at most; whether it was."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.held or self.dropped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.lines and not self.dropped:
                    self.cond.wait()
                lines, self.lines = self.lines, []
                dropped, self.dropped = self.dropped, 0
            size = sum(map(len, lines))
            data = b"".join(([self._notice(dropped)] if dropped else []) + lines)
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):  # our stderr is gone: the lines are dropped, the children still drained
                pass
            with self.cond:
                self.held -= size
                self.cond.notify_all()

    def _notice(self, dropped: int) -> bytes:
        message = f"{dropped} output line(s) dropped: stderr was not read (its reader paused or backed up)"
        if self.json_lines:  # a log collector reading JSON lines never meets a line that is not one
            return (json.dumps({"ts": round(time.time(), 3), "level": "warning", "tier": "up", "msg": message,
                                "dropped": dropped}) + "\n").encode()
        return f"tributary: {message}\n".encode()


class RelayedText(io.TextIOBase):
    """A text stream (for ``sys.stderr``) whose complete lines go to a :class:`Relay`."""

    def __init__(self, relay: Relay, original):
        self.relay, self.original = relay, original
        self.partial = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.partial += text
            if "\n" in self.partial:
                lines, _, self.partial = self.partial.rpartition("\n")
                self.relay.put((lines + "\n").encode(errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass  # lines go out as they end; a partial line waits for its end (or the exit)

    def close_partial(self) -> None:
        with self.lock:
            if self.partial:
                self.relay.put((self.partial + "\n").encode(errors="replace"))
                self.partial = ""

    def isatty(self) -> bool:
        return self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


_relay: Relay | None = None


def install(json_lines: bool) -> Relay:
    """Route this process's stderr (its log lines, ``say``, tracebacks) and :func:`write_line` through one
    :class:`Relay`; what waits is written at exit, within ``DRAIN_AT_EXIT_S``."""
    global _relay
    original = sys.stderr
    _relay = Relay(original.buffer, json_lines=json_lines)
    text = RelayedText(_relay, original)
    sys.stderr = text

    def at_exit() -> None:
        text.close_partial()
        _relay.drain(DRAIN_AT_EXIT_S)

    atexit.register(at_exit)
    return _relay


def write_line(line: bytes) -> None:
    """A child's output line, passed through: to the relay when one is installed, else straight to stderr."""
    if _relay is not None:
        _relay.put(line)
        return
    try:
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
    except (OSError, ValueError, AttributeError):  # our own stderr is gone (or not a byte stream): keep draining
        pass
