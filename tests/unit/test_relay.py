"""tributary/relay.py: ``tributary up``'s output never blocks it, even when nobody reads that output."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tributary.relay import Relay

ROOT = Path(__file__).resolve().parents[2]


def _read_all(fd: int, into: bytearray) -> threading.Thread:
    def run():
        while chunk := os.read(fd, 1 << 16):
            into.extend(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_lines_put_while_nobody_reads_never_block_and_those_dropped_are_told_once_output_flows():
    r, w = os.pipe()
    out = os.fdopen(w, "wb")
    relay = Relay(out, max_bytes=1 << 20)
    lines = [f"line {i:07d} ".encode() + b"x" * 90 + b"\n" for i in range(50_000)]  # 5 MB: the pipe holds 64 KiB
    started = time.monotonic()
    for line in lines:
        relay.put(line)
    took = time.monotonic() - started
    assert took < 5, f"putting took {took:.1f} s: a put waited for the reader"
    assert relay.dropped > 0 or not relay.drain(0.5)  # the reader is stopped: lines wait (and past 1 MiB, drop)
    got = bytearray()
    reader = _read_all(r, got)
    assert relay.drain(10), "the lines held were not written once the reader read"
    out.close()
    reader.join(5)
    text = got.decode().splitlines()
    kept = [t for t in text if t.startswith("line ")]
    notices = [t for t in text if "dropped" in t]
    # One notice per stretch of drops (the writer may have taken a first batch before the pipe filled).
    assert notices and all(n.startswith("tributary: ") for n in notices), notices
    dropped = sum(int(n.split()[1]) for n in notices)
    assert dropped > 0 and len(kept) + dropped == len(lines), (len(kept), dropped)
    assert kept == sorted(kept) and kept[0] == lines[0].decode().rstrip("\n")  # in order, the first ones first


def test_a_notice_is_a_json_line_when_the_logs_are():
    import json

    r, w = os.pipe()
    out = os.fdopen(w, "wb")
    relay = Relay(out, max_bytes=1 << 16, json_lines=True)
    for i in range(5_000):
        relay.put(b'{"msg": "x"}\n' * 10)
    got = bytearray()
    reader = _read_all(r, got)
    assert relay.drain(10)
    out.close()
    reader.join(5)
    notices = [json.loads(t) for t in got.decode().splitlines() if "dropped" in t]
    assert notices and all(n["level"] == "warning" and n["dropped"] > 0 for n in notices)


SUPERVISED = """
import sys
from tributary.relay import install
from tributary.supervisor import Child

install(json_lines=False)
child = Child("noisy", [sys.executable, "-c", "for i in range(200_000): print('y' * 100)\\nprint('done')"])
child.start()
rc = child.proc.wait(60)
print("child exited", rc, child.last_lines().splitlines()[-1], flush=True)
"""


def test_a_child_writing_much_while_ups_stderr_is_not_read_still_runs_to_its_end():
    """The class of failure: a paused terminal (Ctrl-S) froze every child in its next log line, once its pipe to
    ``up`` held 64 KiB: the supervisor's pump was blocked writing to the stopped reader. The child here writes 20 MB
    while nobody reads the supervising process's stderr; it must still end."""
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    said: list[bytes] = []
    reader = threading.Thread(target=lambda: said.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(90)
    try:
        assert said and said[0].startswith(b"child exited 0 done"), \
            f"the child did not end while stderr was not read: {said}"
        _, err = proc.communicate(timeout=30)  # now read: what was held comes out, with the count of lines dropped
        assert b"output line(s) dropped" in err and err.count(b"y" * 100) > 1000
    finally:
        proc.kill()
        proc.wait(10)
