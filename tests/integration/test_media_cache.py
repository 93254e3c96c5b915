"""The content-addressed tensor cache across real processes on a real Redis: hits skip the encoder, identical
misses from two gateway processes are encoded once, entries expire, media uuids, an expired blob is re-queued."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from cache.client import connect_async
from cache.embedded import free_port
from cache.keys import Keys
from gateway.config import GatewayConfig
from gateway.encoding import MediaEncoder
from gateway.media import MediaPart, content_digest
from gateway.replies import ReplyRouter
from tests.integration.procs import start_tier
from tests.media import data_url, png_bytes

KEYS = Keys()
TENSOR_TTL_S = 3


@pytest.fixture(scope="module")
def tiers(tiny_model, redis_server):
    """Two gateway processes, one image encoder (short tensor TTL), one backbone."""
    redis.Redis.from_url(redis_server.url).flushall()
    procs = [start_tier(["encoder", "--modality", "image", "--model", str(tiny_model), "--max-wait-ms", "20",
                         "--tensor-ttl", str(TENSOR_TTL_S)], redis_server.url, "encoder:image"),
             start_tier(["backbone", "--model", str(tiny_model)], redis_server.url, "backbone")]
    urls = []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tributary.cli", "gateway", "--model", str(tiny_model), "--port", str(port),
             "--redis-url", redis_server.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1")))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            deadline = time.monotonic() + 120
            while True:
                try:
                    workers = httpx.get(f"{url}/health", timeout=1).json()["workers"]
                    if workers["backbone"] and workers["encoder:image"]:  # no audio encoder in this cluster
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "gateway not ready"
                time.sleep(0.2)  # importing; the health probe is the readiness signal
        yield urls, procs[0]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def encoder_calls(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).hget(KEYS.stats("encoder:image"), "encoder_calls") or 0)


def chat(url: str, model: str, image: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 1,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, image]}]})


def image_part(data: bytes | None, uuid: str | None = None) -> dict:
    part = {"type": "image_url", "image_url": {"url": data_url(data)} if data else None}
    return {**part, "uuid": uuid} if uuid else part


def test_identical_misses_from_two_gateways_are_encoded_once(tiers, tiny_model, redis_server):
    urls, _ = tiers
    before = encoder_calls(redis_server.url)
    img = image_part(png_bytes(61, 47, seed=101))
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: chat(urls[i % 2], tiny_model.name, img), range(8)))
    assert [r.status_code for r in responses] == [200] * 8, responses[0].text
    assert len({r.json()["usage"]["prompt_tokens"] for r in responses}) == 1
    assert encoder_calls(redis_server.url) == before + 1


def test_hit_skips_the_encoder_and_expiry_brings_it_back(tiers, tiny_model, tiny_spec, redis_server):
    urls, _ = tiers
    r = redis.Redis.from_url(redis_server.url)
    data = png_bytes(30, 30, seed=102)
    img = image_part(data)
    key = KEYS.tensor(tiny_spec.encoder_id("image"),
                      content_digest(tiny_spec.encoder_id("image"), tiny_spec.preprocess["image"], data))
    before = encoder_calls(redis_server.url)
    assert chat(urls[0], tiny_model.name, img).status_code == 200
    assert encoder_calls(redis_server.url) == before + 1
    assert 0 < r.ttl(key) <= TENSOR_TTL_S
    deadline = time.monotonic() + 3 * TENSOR_TTL_S
    while r.exists(key) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for Redis to expire the entry
    assert not r.exists(key), "the tensor did not expire"
    assert chat(urls[1], tiny_model.name, img).status_code == 200
    assert encoder_calls(redis_server.url) == before + 2


def test_media_uuid_reuses_the_encoding(tiers, tiny_model, redis_server):
    urls, _ = tiers
    data = png_bytes(44, 22, seed=103)
    first = chat(urls[0], tiny_model.name, image_part(data, uuid="sku-103"))
    assert first.status_code == 200
    before = encoder_calls(redis_server.url)
    again = chat(urls[1], tiny_model.name, image_part(None, uuid="sku-103"))
    assert again.status_code == 200, again.text
    assert again.json()["usage"]["prompt_tokens"] == first.json()["usage"]["prompt_tokens"]
    assert encoder_calls(redis_server.url) == before
    unknown = chat(urls[0], tiny_model.name, image_part(None, uuid="never-sent"))
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_media_id"
    assert unknown.json()["error"]["param"] == "messages.0.content.1"


def test_blob_that_expires_while_queued_is_queued_again(tiers, tiny_model, tiny_spec, redis_server):
    """A paused encoder lets the blob expire; on resume it reports media_expired and the gateway re-queues."""
    _, encoder = tiers

    async def scenario() -> tuple:
        r = connect_async(redis_server.url)
        cfg = GatewayConfig(model_dir=str(tiny_model), redis_url=redis_server.url, blob_ttl_s=1,
                            encode_timeout_s=60)
        replies = ReplyRouter(r, KEYS, "test-gw")
        reader = asyncio.create_task(replies.run())
        media = MediaEncoder(r, cfg, tiny_spec, replies, KEYS.reply("test-gw"))
        data = png_bytes(20, 20, seed=104)
        part = MediaPart("image", data, "messages.0.content.0",
                         content_digest(tiny_spec.encoder_id("image"), tiny_spec.preprocess["image"], data))
        queue = replies.subscribe("req-104")
        encoder.send_signal(signal.SIGSTOP)
        try:
            task = asyncio.create_task(media.encode("req-104", [part], queue))
            blob = KEYS.blob(part.digest)
            while not await r.exists(blob):
                await asyncio.sleep(0.01)  # the job is being queued
            while await r.exists(blob):
                await asyncio.sleep(0.05)  # waiting for the 1 s blob TTL to lapse
        finally:
            encoder.send_signal(signal.SIGCONT)
        refs = await asyncio.wait_for(task, 30)
        reader.cancel()
        await r.aclose()
        return refs

    before = encoder_calls(redis_server.url)
    refs = asyncio.run(scenario())
    assert refs[0].num_tokens == 16
    assert encoder_calls(redis_server.url) == before + 1
