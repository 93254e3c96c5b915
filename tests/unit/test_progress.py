"""router/progress.py: long start-up work says how far it is and about how long is left, at most every few seconds;
models/checkpoint.read_matching reports reading weights through it."""

from __future__ import annotations

import logging

import pytest

import router.progress as progress_mod
from models.checkpoint import read_matching
from router.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", c)
    return c


def test_lines_come_at_most_every_interval_with_share_and_time_left(clock, caplog):
    caplog.set_level(logging.INFO, logger="progress-test")
    p = Progress("reading weights", 4 * 2**30, "B", log=logging.getLogger("progress-test"), every_s=5)
    for _ in range(4):
        clock.now += 1
        p.advance(2**29)  # 0.5 GiB a second
    assert not caplog.records  # 4 s in: nothing yet
    clock.now += 1
    p.advance(2**29)  # 5 s, 2.5 GiB of 4
    (rec,) = caplog.records
    assert rec.percent == 62.5 and rec.eta_s == 3.0 and rec.progress == "reading weights"
    assert "62%" in rec.getMessage() and "2.5 GiB of 4.0 GiB" in rec.getMessage() and "3 s left" in rec.getMessage()
    clock.now += 3
    p.advance(3 * 2**29)
    p.done()
    assert "done, 4.0 GiB in 8 s" in caplog.records[-1].getMessage()


def test_quick_work_says_nothing(clock, caplog):
    caplog.set_level(logging.INFO, logger="progress-test")
    p = Progress("capturing decode CUDA graphs", 8, log=logging.getLogger("progress-test"))
    for _ in range(8):
        clock.now += 0.1
        p.advance()
    p.done()
    assert not caplog.records


def test_reading_a_checkpoint_counts_its_bytes(tiny_model, monkeypatch):
    seen = []
    real = Progress.__init__

    def spy(self, what, total, *a, **kw):
        real(self, what, total, *a, **kw)
        seen.append(self)

    monkeypatch.setattr(Progress, "__init__", spy)
    tensors = read_matching(tiny_model, lambda name: name.startswith("language_model."))
    (p,) = seen
    assert p.total == sum(t.numel() * t.element_size() for t in tensors.values()) > 0
    assert p.done_n == p.total
