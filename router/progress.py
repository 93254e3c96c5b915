"""Progress of long start-up work (reading a checkpoint, capturing CUDA graphs): what is happening, how far it is and
roughly how long is left, as log lines at most every ``every_s`` seconds (so a fast run says nothing but its end).
In the text log format (a terminal, router/logs.py) each line carries a bar; in JSON the same figures are fields.

    progress = Progress("reading weights", total=bytes_to_read, unit="B", log=log)
    for t in tensors:
        ...
        progress.advance(t.nbytes)
    progress.done()
"""

from __future__ import annotations

import logging
import time

BAR = 24


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f}"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {name}"
    return f"{n:.0f} B"


class Progress:
    def __init__(self, what: str, total: float, unit: str = "", log: logging.Logger | None = None,
                 every_s: float = 5.0, extra: dict | None = None):
        self.what, self.total, self.unit = what, max(0.0, float(total)), unit
        self.log = log or logging.getLogger(__name__)
        self.every_s, self.extra = every_s, dict(extra or {})
        self.done_n = 0.0
        self.start = self.last = time.monotonic()

    def advance(self, n: float = 1) -> None:
        self.done_n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._say(now, final=False)

    def done(self) -> None:
        """The closing line, if the work took long enough to have said anything (or ``every_s`` is 0)."""
        now = time.monotonic()
        if now - self.start >= self.every_s:
            self._say(now, final=True)

    def fields(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        share = self.done_n / self.total if self.total else 1.0
        left = elapsed * (1 - share) / share if 0 < share < 1 else 0.0
        return {"done": round(self.done_n), "total": round(self.total), "percent": round(100 * min(share, 1.0), 1),
                "elapsed_s": round(elapsed, 1), "eta_s": round(left, 1)}

    def _say(self, now: float, final: bool) -> None:
        f = self.fields(now)
        filled = int(BAR * f["percent"] / 100)
        bar = "#" * filled + "." * (BAR - filled)
        if final:
            msg = f"{self.what}: done, {_amount(self.done_n, self.unit)} in {f['elapsed_s']:.0f} s"
        else:
            msg = (f"{self.what}: [{bar}] {f['percent']:.0f}% ({_amount(self.done_n, self.unit)} of "
                   f"{_amount(self.total, self.unit)}), about {f['eta_s']:.0f} s left")
        self.log.info(msg, extra={**self.extra, **f, "progress": self.what})
