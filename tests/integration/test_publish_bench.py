"""bench/publish.py runs (small shapes) and measures both answer paths against a real Redis: every answer of every
batch is sent (it asserts so), and the report carries both ways and both loops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_publish_bench_answers_every_job_both_ways(tmp_path):
    out = tmp_path / "publish.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "publish.py"), "--batch", "4", "--rows", "16",
                           "--hidden", "32", "--repeats", "2", "--forward-ms", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for way in ("before", "now"):
        assert res[way]["publish_s"] > 0 and res[way]["serialize_s"] > 0
    assert set(res["loop_images_per_s"]) == {"inline", "thread"}
    assert "now / before" in proc.stdout
