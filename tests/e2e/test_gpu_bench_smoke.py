"""``bash bench/gpu.sh --cpu-smoke``: the GPU bench's script, environment checks, correctness-test step and every row
(real-shape checkpoint written and loaded, our decode, transformers' generate, the tiered cluster over HTTP) run on
tiny shapes on the CPU, so the script a GPU machine runs is known to work before one is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_bench_runs_on_tiny_shapes_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke", "--workdir", str(tmp_path / "work"), "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== GPU correctness tests" in proc.stdout and "HBM bound" in proc.stdout
    results = json.loads(out.read_text())
    assert [(r["model"], r["batch"]) for r in results["decode"]] == [("llava-tiny", 1), ("llava-tiny", 8)]
    for row in results["decode"]:
        assert row["tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0 and row["floor_tokens_per_s"] > 0
        assert row["loop_tokens_per_s"] > 0
    arrivals = results["arrivals"]
    assert arrivals["chunked"]["prefill_steps"] > arrivals["unchunked"]["prefill_steps"] == 1
    tiered = results["tiered"]
    assert tiered["requests"] == 8 and tiered["requests_per_s"] > 0 and 0 < tiered["ttft_p50_ms"]
