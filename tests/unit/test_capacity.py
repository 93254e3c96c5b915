"""The capacity model (router/capacity.py) against closed forms, and `tributary plan --workload` as a user runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from router.capacity import (
    CapacityError,
    Rates,
    Workload,
    autoscaler_replicas,
    erlang_c_wait,
    load_json,
    plan_capacity,
)

RATES = Rates(image_s_per_item=0.05, audio_s_per_item=0.08, prefill_tokens_per_s=5000,
              decode_step_s={1: 0.01, 16: 0.02}, max_running=16, redis_write_MBps=1000, redis_read_MBps=1000)


def test_erlang_c_matches_mm1_and_mm2():
    lam, s = 8.0, 0.1  # rho 0.8
    mu = 1 / s
    assert erlang_c_wait(lam, s, 1) == pytest.approx(lam / (mu * (mu - lam)))
    rho = lam * s / 2
    assert erlang_c_wait(lam, s, 2) == pytest.approx((2 * rho**2 / (1 + rho)) / (2 * mu - lam))
    assert math.isinf(erlang_c_wait(10.0, 0.1, 1)) and erlang_c_wait(0.0, 0.1, 1) == 0.0


def test_replicas_keep_utilization_under_the_target_and_grow_with_load():
    w = Workload(requests_per_s=40, image_share=1.0, output_tokens=1, prompt_tokens=10, image_rows=16)
    p = plan_capacity(w, RATES, target_utilization=0.5)
    image = p.tiers[0]
    assert image.offered == pytest.approx(40 * 0.05) and image.replicas == 4 and image.utilization == 0.5
    double = plan_capacity(Workload(**{**w.__dict__, "requests_per_s": 80}), RATES, target_utilization=0.5).tiers[0]
    assert double.replicas == 8
    # cached media never reaches an encoder
    cached = plan_capacity(Workload(**{**w.__dict__, "repeat_share": 1.0}), RATES).tiers[0]
    assert cached.arrivals_per_s == 0 and cached.replicas == 1


def test_autoscaler_replicas_follow_littles_law():
    # Light load: one replica holds fewer than target_ongoing jobs.
    assert autoscaler_replicas(1.0, 0.05, 8.0) == 1
    # 100 jobs/s at 0.05 s each: 5 busy replicas at least; the in-system count over 8 per replica decides the rest.
    c = autoscaler_replicas(100.0, 0.05, 8.0)
    assert c >= 6
    in_system = 100 * (erlang_c_wait(100, 0.05, c) + 0.05)
    assert math.ceil(in_system / 8) <= c


def test_redis_bytes_and_the_bottleneck():
    w = Workload(requests_per_s=10, image_share=1.0, repeat_share=0.5, image_rows=576, hidden_size=4096,
                 wire_bytes=2, image_bytes=100_000, output_tokens=1, prompt_tokens=1, tensor_ttl_s=60)
    p = plan_capacity(w, RATES)
    tensor = 576 * 4096 * 2
    misses = 10 * 0.5
    assert p.redis_write_MBps == pytest.approx(misses * (100_000 + tensor) / 1e6)
    assert p.redis_read_MBps == pytest.approx((misses * 100_000 + 10 * tensor) / 1e6)
    assert p.redis_memory_MB == pytest.approx(misses * tensor * 60 / 1e6)
    assert p.bottleneck == "backbone"  # 586 prompt rows per request at 5000 tokens/s: 1.2 busy replicas
    slow_images = Rates(**{**RATES.__dict__, "image_s_per_item": 1.0})
    assert plan_capacity(w, slow_images).bottleneck == "encoder:image"


def test_load_json_names_unknown_fields(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({"requests_per_s": 1, "image_shar": 0.5}))
    with pytest.raises(CapacityError, match="image_shar"):
        load_json(bad, Workload)
    with pytest.raises(CapacityError, match="within"):
        Workload(requests_per_s=1, image_share=2)


def test_the_cli(tmp_path):
    w, r = tmp_path / "w.json", tmp_path / "r.json"
    w.write_text(json.dumps({"requests_per_s": 2, "image_share": 0.5}))
    r.write_text(json.dumps({**RATES.__dict__, "decode_step_s": {"1": 0.01, "16": 0.02}}))
    run = [sys.executable, "-m", "tributary.cli", "plan", "--workload", str(w)]
    out = subprocess.run([*run, "--rates", str(r), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [t["name"] for t in plan["tiers"]] == ["encoder:image", "encoder:audio", "backbone"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--rates" in out.stderr and "Traceback" not in out.stderr
