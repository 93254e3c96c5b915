"""Prometheus metrics without a cluster: the gateway's request metrics and names, the queue metrics exported by the
one gateway holding the metrics lease (a real Redis), a worker's metrics port, multiprocess mode, the dashboard."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backbone.kv import KVPool
from cache.client import connect_async
from cache.keys import BACKBONE_GROUP, ENCODER_GROUP, Keys
from gateway.metrics import ClusterMetrics, GatewayMetrics, lease_owner
from router.metrics import BackboneCollector, EncoderMetrics, pool_usage, serve, stop

ROOT = Path(__file__).resolve().parents[2]
TIERS = ["encoder:image", "encoder:audio", "backbone"]


def samples(text: str | bytes) -> list:
    text = text.decode() if isinstance(text, bytes) else text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(found: list, name: str, **labels) -> float:
    hits = [s.value for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_a_request_is_observed_under_vllms_names():
    g = GatewayMetrics()
    t = g.request(time.perf_counter() - 0.3)  # arrived 300 ms ago
    t.tokens(1, 12)  # the first token: TTFT ~0.3 s, the prompt counted once
    t.tokens(0, 12)  # an event without new tokens is no inter-token gap
    t.tokens(3, 12)
    t.finish("length")
    g.request(time.perf_counter()).finish("abort")  # gone before its first token
    g.cache("image", True)
    g.cache("audio", False)
    found = samples(g.render())
    assert value(found, "tributary_time_to_first_token_seconds_count") == 1
    assert 0.3 <= value(found, "tributary_time_to_first_token_seconds_sum") < 5
    assert value(found, "tributary_time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(found, "tributary_inter_token_latency_seconds_count") == 1
    assert value(found, "tributary_e2e_request_latency_seconds_count") == 2
    assert value(found, "tributary_prompt_tokens_total") == 12
    assert value(found, "tributary_generation_tokens_total") == 4
    assert value(found, "tributary_request_success_total", finished_reason="length") == 1
    assert value(found, "tributary_request_success_total", finished_reason="abort") == 1
    assert value(found, "tributary_request_success_total", finished_reason="stop") == 0
    assert value(found, "tributary_encoder_cache_hits_total", modality="image") == 1
    assert value(found, "tributary_encoder_cache_misses_total", modality="audio") == 1
    assert value(found, "tributary_encoder_cache_misses_total", modality="image") == 0
    assert value(found, "tributary_gateway_requests_in_flight") == 0


def test_the_in_flight_gauge_follows_the_chat_services_count():
    from gateway.chat import ChatService

    svc = ChatService.__new__(ChatService)  # only the counter: no Redis, no model
    svc.metrics = GatewayMetrics()
    svc.inflight = 0
    svc.inflight += 2
    svc.inflight -= 1
    assert value(samples(svc.metrics.render()), "tributary_gateway_requests_in_flight") == 1


def test_requests_refused_at_admission_are_counted_by_code():
    """A 503 at admission (here: the in-flight bound, then Redis away) moves the rejected counter under its code
    and no request counter: nothing began."""
    from gateway.chat import ChatService
    from gateway.config import GatewayConfig
    from gateway.errors import Overloaded, Unavailable
    from gateway.monitor import ClusterView

    class Monitor:
        view = ClusterView(up=True, reason="ok", backlog={})

    svc = ChatService.__new__(ChatService)  # admission only: no Redis, no model
    svc.metrics, svc.monitor, svc.closing = GatewayMetrics(), Monitor(), False
    svc.cfg = GatewayConfig(model_dir="m", redis_url="redis://x", max_inflight=1)
    svc.inflight = 0
    svc.admit(["backbone"])  # under the bound: admitted, not counted
    svc.inflight = 1
    for _ in range(2):
        with pytest.raises(Overloaded):
            svc.admit(["backbone"])
    Monitor.view = ClusterView(up=False, reason="TimeoutError", backlog={})
    with pytest.raises(Unavailable):
        svc.admit(["backbone"])
    found = samples(svc.metrics.render())
    assert value(found, "tributary_request_rejected_total", code="server_overloaded") == 2
    assert value(found, "tributary_request_rejected_total", code="redis_unavailable") == 1
    assert not [s for s in found if s.name == "tributary_request_success_total" and s.value]


def seed_queues(url: str) -> None:
    """jobs:image: 3 entries, 1 delivered (pending) and 2 unread; one live image encoder; stats hashes."""
    r, keys = redis.Redis.from_url(url), Keys()
    r.xgroup_create(keys.jobs("image"), ENCODER_GROUP, id="0", mkstream=True)
    for i in range(3):
        r.xadd(keys.jobs("image"), {"m": b"x%d" % i})
    r.xreadgroup(ENCODER_GROUP, "w1", {keys.jobs("image"): ">"}, count=1)
    r.xgroup_create(keys.gen(), BACKBONE_GROUP, id="0", mkstream=True)
    r.zadd(keys.live("encoder:image"), {"w1": time.time()})
    r.zadd(keys.live("encoder:audio"), {"dead": time.time() - 60})
    r.hset(keys.stats("encoder:image"), mapping={"cache_hits": 5, "encode_seconds": "1.25", "last_batch_size": 2})
    r.hset(keys.stats("backbone"), mapping={"tokens": 40})


def test_only_the_lease_holder_exports_the_queues(redis_url):
    seed_queues(redis_url)

    async def scenario():
        a = ClusterMetrics(connect_async(redis_url), Keys(), TIERS, "gw-a", interval_s=0.5)
        b = ClusterMetrics(connect_async(redis_url), Keys(), TIERS, "gw-b", interval_s=0.5)
        try:
            await a.refresh()
            await b.refresh()
            assert a.leader and not b.leader
            lead, other = samples(_render(a)), samples(_render(b))
            await b.refresh()  # still a's: b exports nothing but its leader flag
            assert not b.leader
            await a.close()  # a stops: b takes the lease at its next refresh
            await b.refresh()
            await a.refresh()
            taken = (b.leader, a.leader, samples(_render(b)))
        finally:
            await a.r.aclose()
            await b.r.aclose()
        return lead, other, taken

    lead, other, (b_leads, a_leads, after) = asyncio.run(scenario())
    assert value(lead, "tributary_cluster_metrics_leader") == 1
    assert value(lead, "tributary_queue_length", tier="encoder:image") == 3
    assert value(lead, "tributary_queue_pending", tier="encoder:image") == 1
    assert value(lead, "tributary_queue_lag", tier="encoder:image") == 2
    assert value(lead, "tributary_tier_live_workers", tier="encoder:image") == 1
    assert value(lead, "tributary_tier_live_workers", tier="encoder:audio") == 0  # its only beat is too old
    for tier in ("encoder:audio", "backbone"):  # no stream yet, or an empty one: zeros, but a sample per tier
        for name in ("tributary_queue_length", "tributary_queue_pending", "tributary_queue_lag"):
            assert value(lead, name, tier=tier) == 0
    assert value(lead, "tributary_tier_stat", tier="encoder:image", stat="cache_hits") == 5
    assert value(lead, "tributary_tier_stat", tier="encoder:image", stat="encode_seconds") == 1.25
    assert value(lead, "tributary_tier_stat", tier="backbone", stat="tokens") == 40
    assert value(other, "tributary_cluster_metrics_leader") == 0
    assert not [s for s in other if s.name.startswith(("tributary_queue", "tributary_tier"))]
    assert b_leads and not a_leads
    assert value(after, "tributary_queue_length", tier="encoder:image") == 3


def test_the_leader_exports_the_local_autoscalers_replicas(redis_url):
    seed_queues(redis_url)
    redis.Redis.from_url(redis_url).hset(Keys().autoscale(), mapping={
        "encoder:image": 3, "encoder:image:recommended": 5, "encoder:audio": 1, "encoder:audio:recommended": 0})

    async def scenario():
        c = ClusterMetrics(connect_async(redis_url), Keys(), TIERS, "gw-as", interval_s=0.5)
        try:
            await c.refresh()
            return samples(_render(c))
        finally:
            await c.close()
            await c.r.aclose()

    got = asyncio.run(scenario())
    assert value(got, "tributary_autoscaler_replicas", tier="encoder:image") == 3
    assert value(got, "tributary_autoscaler_recommended", tier="encoder:image") == 5
    assert value(got, "tributary_autoscaler_replicas", tier="encoder:audio") == 1
    redis.Redis.from_url(redis_url).delete(Keys().autoscale())


def test_a_stale_snapshot_is_not_exported_and_redis_away_means_no_leader(redis_url):
    async def scenario():
        c = ClusterMetrics(connect_async(redis_url), Keys(), TIERS, "gw", interval_s=0.5)
        await c.refresh()
        fresh = samples(_render(c))
        c.at -= 10  # as if Redis had not answered for a while
        stale = samples(_render(c))
        await c.r.aclose()
        gone = ClusterMetrics(connect_async("redis://127.0.0.1:1/0", retries=0), Keys(), TIERS, "gw", 0.5)
        await gone.refresh()
        await gone.r.aclose()
        return fresh, stale, gone

    fresh, stale, gone = asyncio.run(scenario())
    assert value(fresh, "tributary_queue_length", tier="backbone") == 0
    assert value(stale, "tributary_cluster_metrics_leader") == 0
    assert not [s for s in stale if s.name.startswith("tributary_queue")]
    assert not gone.leader and gone.snapshot is None


def _render(collector) -> bytes:
    g = GatewayMetrics()
    g.attach(collector)
    return g.render()


def test_an_encoder_serves_its_metrics_on_its_own_port():
    e = EncoderMetrics("image")
    e.in_flight.set(3)
    e.encode_seconds.observe(0.02)
    e.batch_size.observe(4)
    e.finished({"encoded": 4, "bad_media": 1})
    server = serve(e.registry, 0)  # 0: any free port (the CLI's 0 means off)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            found = samples(resp.read())
        assert serve(e.registry, server.server_port) is None  # a taken port is logged, not fatal
    finally:
        stop(server)
    assert value(found, "tributary_encoder_in_flight_jobs", modality="image") == 3
    assert value(found, "tributary_encoder_encode_seconds_count", modality="image") == 1
    assert value(found, "tributary_encoder_batch_size_bucket", modality="image", le="4.0") == 1
    assert value(found, "tributary_encoder_batch_size_bucket", modality="image", le="2.0") == 0
    assert value(found, "tributary_encoder_jobs_total", modality="image", outcome="encoded") == 4
    assert value(found, "tributary_encoder_jobs_total", modality="image", outcome="bad_media") == 1
    assert value(found, "tributary_encoder_jobs_total", modality="image", outcome="gave_up") == 0


def test_a_workers_live_route_turns_503_once_its_loop_stops_coming_round():
    """``/live`` on a worker's metrics port follows the heartbeat's own judgement (router/liveness.py): 200 while
    the loop ticks within ``stall_s``, 503 once it has not (what the Kubernetes liveness probe reads); /metrics is
    served beside it; without a ``live`` callable it is 200 while the process serves."""
    import urllib.error

    from cache.keys import Keys
    from router.liveness import Heartbeat

    hb = Heartbeat("redis://127.0.0.1:1", Keys(), "encoder:image", "w", stall_s=30)  # never started: no Redis call
    e = EncoderMetrics("image")
    server, bare = serve(e.registry, 0, live=hb.live), serve(e.registry, 0)
    base = f"http://127.0.0.1:{server.server_port}"

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        hb.tick()
        assert status(f"{base}/live") == 200
        hb._ticked = time.monotonic() - 31  # no tick for longer than stall_s: stuck
        assert status(f"{base}/live") == 503 and status(f"{base}/metrics") == 200
        hb.tick()
        assert status(f"{base}/live") == 200
        assert status(f"http://127.0.0.1:{bare.server_port}/live") == 200
    finally:
        stop(server)
        stop(bare)


def test_the_backbone_reports_its_scheduler_and_kv_pool_when_scraped():
    import torch
    from prometheus_client import CollectorRegistry

    pool = KVPool(num_layers=1, num_blocks=8, block_size=4, kv_heads=1, head_dim=2, dtype=torch.float32,
                  device="cpu")
    running, waiting = {"a": 1, "b": 2}, [1]
    registry = CollectorRegistry()
    phases = {"step": 1.5, "io_wait": 0.0, "host": 0.25}
    registry.register(BackboneCollector(lambda: pool_usage(pool), lambda: len(running), lambda: len(waiting),
                                        preemptions=lambda: 2, steps=lambda: 7, loop=lambda: phases))
    table: list[int] = []
    assert pool.grow(table, 4 * 3)  # 3 of 8 blocks
    found = samples(generate_latest(registry))
    assert value(found, "tributary_kv_cache_usage_perc") == 3 / 8
    assert value(found, "tributary_num_requests_running") == 2 and value(found, "tributary_num_requests_waiting") == 1
    assert value(found, "tributary_num_preemptions_total") == 2 and value(found, "tributary_backbone_steps_total") == 7
    assert [value(found, "tributary_backbone_loop_seconds_total", phase=p) for p in phases] == [1.5, 0.0, 0.25]
    pool.release(table)
    running.clear()
    found = samples(generate_latest(registry))  # read when scraped: nothing to update on the hot path
    assert value(found, "tributary_kv_cache_usage_perc") == 0 and value(found, "tributary_num_requests_running") == 0
    shard = CollectorRegistry()  # a pipeline shard other than 0: its own pool only
    shard.register(BackboneCollector(lambda: pool_usage(pool)))
    assert {s.name for s in samples(generate_latest(shard))} == {"tributary_kv_cache_usage_perc"}


_MULTIPROCESS = """
import sys, time
from gateway.metrics import GatewayMetrics
from router.metrics import EncoderMetrics
g = GatewayMetrics()
if sys.argv[1] == "observe":
    t = g.request(time.perf_counter())
    t.tokens(2, 5)
    t.finish("stop")
    EncoderMetrics("image").finished({"encoded": 1})  # a worker's metrics stay in its memory
else:
    sys.stdout.write(g.render().decode())
"""


def test_multiprocess_mode_merges_every_gateway_process(tmp_path):
    """Under PROMETHEUS_MULTIPROC_DIR (a gateway run as several processes), /metrics merges every process's
    request metrics; a worker's metrics never land in those files; the processes share one lease owner."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _MULTIPROCESS, "observe"], env=env, check=True, timeout=60)
    out = subprocess.run([sys.executable, "-c", _MULTIPROCESS, "render"], env=env, check=True, timeout=60,
                         capture_output=True, text=True).stdout
    found = samples(out)
    assert value(found, "tributary_time_to_first_token_seconds_count") == 2
    assert value(found, "tributary_generation_tokens_total") == 4
    assert value(found, "tributary_request_success_total", finished_reason="stop") == 2
    assert not [s for s in found if s.name.startswith("tributary_encoder_jobs")]
    owner = subprocess.run([sys.executable, "-c", "from gateway.metrics import lease_owner; print(lease_owner('x'))"],
                           env=env, check=True, timeout=60, capture_output=True, text=True).stdout.strip()
    assert owner.endswith(":" + os.path.realpath(tmp_path)) and lease_owner("gw-1") == "gw-1"


def known_samples() -> set[str]:
    """Every sample name the gateway, an encoder and a backbone export (the queue metrics as their leader)."""
    g = GatewayMetrics()
    g.error(504, "token_timeout")  # a labelled series exports nothing before its first count
    cluster = ClusterMetrics(None, Keys(), TIERS, "gw")
    cluster.leader, cluster.at = True, time.monotonic()
    cluster.snapshot = {t: {"length": 0, "pending": 0, "lag": 0, "live": 1, "stats": {"tokens": 1.0}} for t in TIERS}
    cluster.autoscale = {"encoder:image": 1.0, "encoder:image:recommended": 1.0}  # while tributary up --autoscale runs
    g.attach(cluster)
    from prometheus_client import CollectorRegistry

    backbone = CollectorRegistry()
    backbone.register(BackboneCollector(lambda: 0.0, lambda: 0, lambda: 0, lambda: 0, lambda: 0))
    exposition = [g.render(), generate_latest(EncoderMetrics("image").registry), generate_latest(backbone)]
    return {s.name for text in exposition for s in samples(text)}


def test_the_dashboard_reads_only_metrics_that_exist():
    dash = json.loads((ROOT / "deploy" / "grafana" / "tributary.json").read_text())
    known = known_samples()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 18
    used = {name for e in exprs for name in re.findall(r"\btributary_[a-z0-9_]+", e)}
    assert used and not used - known, sorted(used - known)
    wanted = {"tributary_time_to_first_token_seconds_bucket", "tributary_inter_token_latency_seconds_bucket",
              "tributary_e2e_request_latency_seconds_bucket", "tributary_num_requests_running",
              "tributary_num_requests_waiting", "tributary_kv_cache_usage_perc", "tributary_generation_tokens_total",
              "tributary_queue_length", "tributary_queue_lag", "tributary_queue_pending",
              "tributary_tier_live_workers", "tributary_encoder_batch_size_bucket",
              "tributary_encoder_encode_seconds_bucket", "tributary_encoder_cache_hits_total"}
    assert wanted <= used, sorted(wanted - used)
    assert {v["name"] for v in dash["templating"]["list"]} >= {"DS_PROMETHEUS"}
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_the_alert_rules_read_only_metrics_that_exist():
    """deploy/prometheus/alerts.yml: a rule over a metric nobody exports never fires."""
    import yaml

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    used = {name for r in rules for name in re.findall(r"\btributary_[a-z0-9_]+", r["expr"])}
    assert len(rules) >= 8 and used and not used - known_samples(), sorted(used - known_samples())
    assert {"tributary_redis_up", "tributary_tier_live_workers", "tributary_request_rejected_total"} <= used
    assert all(r["alert"].startswith("Tributary") and r["labels"]["severity"] in ("critical", "warning")
               for r in rules)
