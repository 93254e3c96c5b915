"""The content-addressed tensor cache across real processes on a real Redis: hits skip the encoder, identical
misses from two gateway processes are encoded once, entries expire, media uuids, an expired blob is re-queued."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import redis
import torch

from cache.client import connect_async
from cache.embedded import free_port
from cache.keys import Keys, alive
from cache.streams import fields_payload, payload_fields
from gateway.app import stop_tasks
from gateway.config import GatewayConfig
from gateway.encoding import CHECK_EVERY_S, MediaEncoder
from gateway.errors import Timeout
from gateway.media import MediaPart, content_digest
from gateway.replies import ReplyRouter
from router import messages as m
from tests.integration.procs import start_tier
from tests.media import data_url, png_bytes

KEYS = Keys()
TENSOR_TTL_S = 600  # long: a test expires an entry itself (PEXPIRE) instead of waiting


@pytest.fixture(scope="module")
def tiers(tiny_model, redis_server):
    """Two gateway processes, one image encoder, one backbone; and a third gateway with the media cache off."""
    redis.Redis.from_url(redis_server.url).flushall()
    procs = [start_tier(["encoder", "--modality", "image", "--model", str(tiny_model), "--max-wait-ms", "20",
                         "--tensor-ttl", str(TENSOR_TTL_S)], redis_server.url, "encoder:image"),
             start_tier(["backbone", "--model", str(tiny_model)], redis_server.url, "backbone")]
    urls = []
    for extra in ([], [], ["--no-media-cache"]):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tributary.cli", "gateway", "--model", str(tiny_model), "--port", str(port),
             "--redis-url", redis_server.url, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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


def cache_stats(redis_url: str) -> tuple[int, int]:
    """(cache_hits, cache_misses) the gateways counted for images."""
    hits, misses = redis.Redis.from_url(redis_url).hmget(KEYS.stats("encoder:image"), "cache_hits", "cache_misses")
    return int(hits or 0), int(misses or 0)


def jobs_queued(r) -> int:
    """Entries ever added to the image job stream (acked jobs are deleted, so not its length; Redis 7+)."""
    try:
        return int(r.xinfo_stream(KEYS.jobs("image"))["entries-added"])
    except redis.ResponseError:  # no such stream yet
        return 0


def wait_until(cond, what, timeout: float = 30):
    """Poll ``cond`` (Redis state other processes change) until true; fail with ``what`` (a str, or a callable
    giving one, evaluated at the deadline) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what} (waited {timeout}s)")
        time.sleep(0.02)
    return value


@contextmanager
def paused(encoder: subprocess.Popen, redis_url: str):
    """SIGSTOP the encoder process; meanwhile a stand-in heartbeat keeps its tier looking live (a stopped worker
    stops heartbeating, and gateways refuse requests with 503 no_live_worker once its last beat is 5 s old)."""
    r = redis.Redis.from_url(redis_url)
    live, standin, stop = KEYS.live("encoder:image"), "test-standin", threading.Event()

    def beat():
        while True:
            r.zadd(live, {standin: time.time()})
            if stop.wait(0.5):
                return

    beater = threading.Thread(target=beat, name="standin-heartbeat", daemon=True)
    beater.start()
    encoder.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        encoder.send_signal(signal.SIGCONT)
        resumed = time.time()
        try:
            wait_until(lambda: any(score >= resumed for member, score in r.zrange(live, 0, -1, withscores=True)
                                   if member != standin.encode()),
                       "the resumed encoder did not heartbeat again", timeout=30)
        finally:
            stop.set()
            beater.join(5)
            r.zrem(live, standin)


def chat(url: str, model: str, image: dict, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 1, **body,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, image]}]})


def greedy(url: str, model: str, image: dict) -> httpx.Response:
    return chat(url, model, image, temperature=0, max_tokens=8, ignore_eos=True)


def image_part(data: bytes | None, uuid: str | None = None) -> dict:
    part = {"type": "image_url", "image_url": {"url": data_url(data)} if data else None}
    return {**part, "uuid": uuid} if uuid else part


def digest_of(spec, data: bytes) -> str:
    return content_digest(spec.encoder_id("image"), spec.preprocess["image"], data)


def test_identical_misses_from_two_gateways_are_encoded_once(tiers, tiny_model, tiny_spec, redis_server):
    urls, encoder = tiers
    r = redis.Redis.from_url(redis_server.url)
    data = png_bytes(61, 47, seed=101)
    img = image_part(data)
    waiters = KEYS.waiters(tiny_spec.encoder_id("image"), digest_of(tiny_spec, data))
    calls, (hits, misses), queued = encoder_calls(redis_server.url), cache_stats(redis_server.url), jobs_queued(r)
    n = 4  # two from each gateway
    with ThreadPoolExecutor(n) as pool:
        with paused(encoder, redis_server.url):
            futures = [pool.submit(chat, urls[i % 2], tiny_model.name, img) for i in range(n)]
            # Every request missed, both gateways wait on the tensor, and only one job was queued for it.
            wait_until(lambda: cache_stats(redis_server.url)[1] == misses + n and r.scard(waiters) == 2,
                       lambda: f"expected {n} misses and both gateways as waiters; got misses +"
                               f"{cache_stats(redis_server.url)[1] - misses}, waiters {r.smembers(waiters)}")
            streams = r.smembers(waiters)
            assert all(w.startswith(KEYS.reply("").split("{")[0].encode()) for w in streams), streams
            wait_until(lambda: jobs_queued(r) > queued, "no encode job was queued")
            assert jobs_queued(r) == queued + 1
            done = [f.exception() or f.result() for f in futures if f.done()]
            assert not done, f"requests ended while the encoder was stopped: {[getattr(d, 'text', d) for d in done]}"
        responses = [f.result(timeout=90) for f in futures]
    assert [resp.status_code for resp in responses] == [200] * n, responses[0].text
    assert len({resp.json()["usage"]["prompt_tokens"] for resp in responses}) == 1
    assert encoder_calls(redis_server.url) == calls + 1
    assert jobs_queued(r) == queued + 1
    assert cache_stats(redis_server.url) == (hits, misses + n)
    assert not r.exists(waiters), "the publish left the waiters set behind"


def test_hit_skips_the_encoder_and_expiry_brings_it_back(tiers, tiny_model, tiny_spec, redis_server):
    urls, _ = tiers
    r = redis.Redis.from_url(redis_server.url)
    data = png_bytes(30, 30, seed=102)
    img = image_part(data)
    key = KEYS.tensor(tiny_spec.encoder_id("image"), digest_of(tiny_spec, data))
    calls, (hits, misses) = encoder_calls(redis_server.url), cache_stats(redis_server.url)
    # A miss: encoded once, stored with the encoder's TTL.
    assert chat(urls[0], tiny_model.name, img).status_code == 200
    assert encoder_calls(redis_server.url) == calls + 1
    assert cache_stats(redis_server.url) == (hits, misses + 1)
    assert 0 < r.ttl(key) <= TENSOR_TTL_S
    # A hit, from the other gateway, while the tensor is live: the encoder does not run.
    assert chat(urls[1], tiny_model.name, img).status_code == 200
    assert encoder_calls(redis_server.url) == calls + 1
    assert cache_stats(redis_server.url) == (hits + 1, misses + 1)
    assert r.ttl(key) > 0
    # Expired: the next request misses and encodes again.
    assert r.pexpire(key, 1)
    wait_until(lambda: not r.exists(key), "the tensor did not expire after PEXPIRE 1")
    assert chat(urls[1], tiny_model.name, img).status_code == 200
    assert encoder_calls(redis_server.url) == calls + 2
    assert cache_stats(redis_server.url) == (hits + 1, misses + 2)
    assert r.exists(key)


@pytest.mark.parametrize("damage", ["data", "count", "shape", "type", "nan", "no-data"])
def test_a_damaged_cache_entry_is_dropped_and_encoded_again(tiers, tiny_model, tiny_spec, redis_server, damage):
    """An entry whose tensor is not safetensors, whose row count is not a number, whose tensor has another shape
    or values that are not finite, that has a count but no tensor, or whose key is not a hash at all: the request
    sending that media is answered as a cold one would be (the entry dropped, the media encoded again), where it got
    a 500, a 500, a 400 blaming the client, a 500, a 503 and a 503 "Redis unavailable" for as long as the media kept
    being sent (each lookup refreshed the entry; outside testers')."""
    from cache.codec import encode_tensor

    urls, _ = tiers
    r = redis.Redis.from_url(redis_server.url)
    data = png_bytes(33, 29, seed=200 + ["data", "count", "shape", "type", "nan", "no-data"].index(damage))
    img = image_part(data)
    key = KEYS.tensor(tiny_spec.encoder_id("image"), digest_of(tiny_spec, data))
    cold = greedy(urls[0], tiny_model.name, img)
    assert cold.status_code == 200, cold.text
    rows = int(r.hget(key, "n"))
    if damage == "data":
        r.hset(key, "data", b"\x00garbage")
    elif damage == "count":
        r.hset(key, "n", b"abc")
    elif damage == "shape":
        r.hset(key, "data", encode_tensor(torch.zeros(rows - 1, 7)))
    elif damage == "nan":
        r.hset(key, "data", encode_tensor(torch.full((rows, tiny_spec.config["text_config"]["hidden_size"]),
                                                     float("nan"))))
    elif damage == "no-data":
        r.hdel(key, "data")
    else:
        ttl = r.ttl(key)
        r.delete(key)
        r.set(key, b"not a hash", ex=ttl)
    calls = encoder_calls(redis_server.url)
    again = greedy(urls[1], tiny_model.name, img)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == cold.json()["choices"][0]["message"]["content"]
    assert encoder_calls(redis_server.url) == calls + 1  # encoded again, once
    assert r.type(key) == b"hash" and int(r.hget(key, "n")) == rows


def test_media_uuid_reuses_the_encoding(tiers, tiny_model, redis_server):
    urls, _ = tiers
    images = {"sku-103": png_bytes(44, 22, seed=103), "sku-203": png_bytes(22, 44, seed=203)}
    texts = {}
    for uuid, data in images.items():
        first = greedy(urls[0], tiny_model.name, image_part(data, uuid=uuid))
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["completion_tokens"] == 8
        texts[uuid] = first.json()["choices"][0]["message"]["content"]
    # Precondition: the two images steer the (random, greedy) model to different answers, so the answer tells which
    # encoding a bare uuid was resolved to.
    assert texts["sku-103"] != texts["sku-203"], texts
    before = encoder_calls(redis_server.url)
    for i, uuid in enumerate(["sku-203", "sku-103"]):
        again = greedy(urls[(i + 1) % 2], tiny_model.name, image_part(None, uuid=uuid))
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == texts[uuid], uuid
    assert encoder_calls(redis_server.url) == before
    unknown = chat(urls[0], tiny_model.name, image_part(None, uuid="never-sent"))
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_media_id"
    assert unknown.json()["error"]["param"] == "messages.0.content.1"


def test_blob_that_expires_while_queued_is_queued_again(tiers, tiny_model, tiny_spec, redis_server):
    """A paused encoder lets the blob expire; on resume it reports media_expired and the gateway re-queues."""
    _, encoder = tiers

    async def until_exists(r, key: str, present: bool, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while bool(await r.exists(key)) != present:
            assert time.monotonic() < deadline, f"{what} (waited {timeout}s)"
            await asyncio.sleep(0.02)  # polling Redis state; bounded by the deadline

    async def scenario() -> tuple:
        r = connect_async(redis_server.url)
        # lease_ttl_s past the bound below: the waiter's lease-expiry retry cannot stand in for the re-queue
        cfg = GatewayConfig(model_dir=str(tiny_model), redis_url=redis_server.url, blob_ttl_s=1,
                            encode_timeout_s=60, lease_ttl_s=120)
        await r.set(alive(KEYS.reply("test-gw")), 1, ex=600)  # this test is the gateway: hold its lease
        replies = ReplyRouter(r, KEYS, "test-gw")
        reader = asyncio.create_task(replies.run())
        media = MediaEncoder(r, cfg, tiny_spec, replies, KEYS.reply("test-gw"))
        data = png_bytes(20, 20, seed=104)
        part = MediaPart("image", data, "messages.0.content.0", digest_of(tiny_spec, data))
        queue = replies.subscribe("req-104")
        with paused(encoder, redis_server.url):
            task = asyncio.create_task(media.encode("req-104", [part], queue))
            blob = KEYS.blob(part.digest)
            await until_exists(r, blob, True, "the job was never queued (no blob)")
            await until_exists(r, blob, False, "the blob outlived its 1 s TTL")
        try:
            refs = await asyncio.wait_for(task, 30)
        except asyncio.TimeoutError:
            raise AssertionError("no encoding 30 s after resuming: the expired blob was not queued again") from None
        reader.cancel()
        await r.aclose()
        return refs

    r = redis.Redis.from_url(redis_server.url)
    before, queued = encoder_calls(redis_server.url), jobs_queued(r)
    refs = asyncio.run(scenario())
    assert refs[0].num_tokens == 16
    assert encoder_calls(redis_server.url) == before + 1
    assert jobs_queued(r) == queued + 2, "the expired blob's job was not queued again"


class OwnGateway:
    """This test is the gateway (a prefix no worker reads, a live encoder faked in the live set) and the encoder:
    it reads the jobs the MediaEncoder queues and answers (or loses) them by hand. Its connection is ``r``; the
    encodes it started are cancelled as it ends."""

    def __init__(self, prefix: str, spec, model, redis_url: str, lease_ttl_s: int = 120):
        self.keys, self.spec, self.url = Keys(prefix), spec, redis_url
        self.cfg = GatewayConfig(model_dir=str(model), redis_url=redis_url, prefix=prefix,
                                 encode_timeout_s=60, lease_ttl_s=lease_ttl_s)  # 120: its lapse cannot stand in
        self.reply = self.keys.reply("test-gw")
        self.stream = self.keys.jobs("image")
        self.seen: list[tuple[bytes, m.EncodeJob]] = []
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self):
        self.r = connect_async(self.url)
        await self.r.set(alive(self.reply), 1, ex=600)
        await self.r.zadd(self.keys.live("encoder:image"), {"test-encoder": time.time() + 600})
        self.replies = ReplyRouter(self.r, self.keys, "test-gw")
        self.reader = asyncio.create_task(self.replies.run())
        self.media = MediaEncoder(self.r, self.cfg, self.spec, self.replies, self.reply)
        return self

    async def __aexit__(self, *exc):
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await stop_tasks([self.reader], timeout_s=5)
        await self.r.delete(self.stream, self.keys.live("encoder:image"))
        await self.r.aclose()

    def image(self, seed: int) -> MediaPart:
        data = png_bytes(20, 20, seed=seed)
        return MediaPart("image", data, "messages.0.content.0", digest_of(self.spec, data))

    def encode(self, rid: str, part: MediaPart) -> asyncio.Task:
        self.tasks.append(asyncio.create_task(self.media.encode(rid, [part], self.replies.subscribe(rid))))
        return self.tasks[-1]

    async def jobs(self, n: int, timeout: float = 10) -> list[tuple[bytes, m.EncodeJob]]:
        """The first ``n`` jobs ever queued (deleted ones too: noted as they come)."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < n:
            assert time.monotonic() < deadline, f"{len(self.seen)} job(s) queued, not {n}"
            for entry_id, fields in await self.r.xrange(self.stream):
                if entry_id not in [e for e, _ in self.seen]:
                    self.seen.append((entry_id, m.decode(fields_payload(fields), m.EncodeJob)))
            await asyncio.sleep(0.02)
        return self.seen[:n]


def test_a_claim_that_finds_the_tensor_gives_back_the_lease_it_took(tiny_model, tiny_spec, redis_server):
    """A request missed, then the encoder answered another request's job (its take freed the lease) before this one
    claimed: the claim took the lease and found the tensor in one round trip, and kept the lease. Once the entry
    went (evicted, expired), the next request for that media waited the lease out, 30 s (an auditor's)."""
    async def scenario() -> tuple:
        async with OwnGateway("claimhit", tiny_spec, tiny_model, redis_server.url) as gw:
            part = gw.image(110)
            key, lease = gw.media.tensor_key(part), gw.keys.lease(tiny_spec.encoder_id("image"), part.digest)
            lookup = gw.media._lookup

            async def then_stored(*args, **kwargs):  # as the encoder does between this lookup and the claim
                counts = await lookup(*args, **kwargs)
                await gw.r.delete(lease)
                await gw.r.hset(key, mapping={"data": b"unused", "n": 7})
                return counts

            gw.media._lookup = then_stored
            refs = await asyncio.wait_for(gw.encode("req-110", part), 30)
            held = await gw.r.get(lease)
            await gw.r.delete(key)
            return refs, held, len(await gw.r.xrange(gw.stream))

    refs, held, queued = asyncio.run(scenario())
    assert [ref.num_tokens for ref in refs] == [7] and queued == 0
    assert held is None, f"the lease stayed with {held!r}"


def test_a_job_waiting_longer_than_its_lease_is_queued_once(tiny_model, tiny_spec, redis_server):
    """A backlog longer than the lease: the holder's lease lapsed while its job still waited in the stream, and
    the holder itself (and each waiter) took it again and queued the media again, 4 jobs for one image in 7 s with
    a 2 s lease (an auditor's). The holder renews its lease while its job waits; a waiter queues nothing."""
    async def scenario() -> tuple:
        async with OwnGateway("backlog", tiny_spec, tiny_model, redis_server.url, lease_ttl_s=4) as gw:
            part = gw.image(111)
            gw.encode("req-111", part)
            await gw.jobs(1)
            gw.encode("req-111b", part)  # waits on the first's job
            await asyncio.sleep(13)  # no encoder reads the stream: three lease times
            return await gw.r.xlen(gw.stream), await gw.r.get(gw.keys.lease(tiny_spec.encoder_id("image"), part.digest))

    queued, holder = asyncio.run(scenario())
    assert queued == 1, f"{queued} jobs queued for one image"
    assert holder == b"req-111"


def test_a_job_that_failed_while_this_requests_lease_stayed_is_queued_again_at_once(tiny_model, tiny_spec,
                                                                                      redis_server):
    """A job failed with ``media_expired`` whose lease the encoder could not take (its Redis Cluster node was away
    when the answer was published): the request that holds that lease queued it again only once the lease lapsed
    (an outside tester's chaos run: images answered 30 s after the node came back). It gives up its own lease and
    queues the job again at once. This test is the encoder (a prefix no worker reads)."""
    async def scenario() -> list:
        async with OwnGateway("ownlease", tiny_spec, tiny_model, redis_server.url) as gw:
            part = gw.image(107)
            gw.encode("req-107", part)
            (_, first), = await gw.jobs(1)
            # As the encoder does when its node is away: the job fails, its lease is not taken.
            failed = m.EncodeFailed(request_id=first.request_id, job_id=first.job_id,
                                    tensor_key=gw.media.tensor_key(part), code=m.ErrorCode.MEDIA_EXPIRED,
                                    error="not stored: its node did not answer")
            await gw.r.xadd(gw.reply, payload_fields(m.encode(failed)))
            return [job for _, job in await gw.jobs(2)]

    first, again = asyncio.run(scenario())
    assert again.digest == first.digest and again.job_id != first.job_id


def test_a_job_whose_entry_was_lost_before_any_encoder_read_it_is_queued_again_at_once(tiny_model, tiny_spec,
                                                                                         redis_server):
    """A failover right after a primary took a job's XADD lost the entry before any encoder read it: nothing told
    the request, which queued it again only once its lease lapsed (an outside tester's chaos run: an image 32 s
    late). Its entry gone twice in a row with no tensor stored, the request queues the job again at once."""
    async def scenario() -> tuple[list, float]:
        async with OwnGateway("lostentry", tiny_spec, tiny_model, redis_server.url) as gw:
            gw.encode("req-108", gw.image(108))
            (entry_id, first), = await gw.jobs(1)
            await gw.r.xdel(gw.stream, entry_id)  # as the failover did
            lost_at = time.monotonic()
            queued = await gw.jobs(2)
            return [job for _, job in queued], time.monotonic() - lost_at

    (first, again), took = asyncio.run(scenario())
    assert again.digest == first.digest and again.job_id != first.job_id
    assert took < 2 * CHECK_EVERY_S + 3, f"queued again after {took:.1f} s"


def test_an_encoding_stored_whose_answer_was_lost_is_found(tiny_model, tiny_spec, redis_server):
    """The encoder stored the tensor but its answer to the gateway was dropped (the reply stream's node was away):
    the request waited for its lease to lapse (30 s) before it looked again. It finds the tensor at its next check,
    and queues nothing more."""
    async def scenario() -> tuple[list, int, float]:
        async with OwnGateway("lostanswer", tiny_spec, tiny_model, redis_server.url) as gw:
            part = gw.image(109)
            task = gw.encode("req-109", part)
            (entry_id, _), = await gw.jobs(1)
            key = gw.media.tensor_key(part)
            await gw.r.xdel(gw.stream, entry_id)  # as the encoder does: ack, delete, store; and no answer
            await gw.r.hset(key, mapping={"data": b"unused", "n": 9})
            stored_at = time.monotonic()
            refs = await asyncio.wait_for(task, 30)
            took = time.monotonic() - stored_at
            await gw.r.delete(key)
            return refs, len(gw.seen), took

    refs, queued, took = asyncio.run(scenario())
    assert [ref.num_tokens for ref in refs] == [9] and queued == 1
    assert took < CHECK_EVERY_S + 3, f"found after {took:.1f} s"


def test_a_waiter_with_time_left_queues_again_a_job_dropped_for_another_requests_deadline(tiers, tiny_model,
                                                                                         tiny_spec, redis_server):
    """Request A queues an image's job with a 2 s encode timeout; B, the same image with 60 s, waits on A's job. The
    encoder, paused past A's deadline, drops the job (deadline) and tells both: A has given up, and B, with time
    left, queues the job again under its own deadline and gets its encoding (it failed with a 504 at once, on A's
    deadline: an outside reviewer's reading)."""
    _, encoder = tiers

    async def scenario():
        r = connect_async(redis_server.url)
        await r.set(alive(KEYS.reply("test-gw")), 1, ex=600)  # this test is the gateway: hold its lease
        replies = ReplyRouter(r, KEYS, "test-gw")
        reader = asyncio.create_task(replies.run())

        def media(timeout: float) -> MediaEncoder:
            return MediaEncoder(r, GatewayConfig(model_dir=str(tiny_model), redis_url=redis_server.url,
                                                 encode_timeout_s=timeout), tiny_spec, replies, KEYS.reply("test-gw"))

        data = png_bytes(22, 18, seed=105)
        part = MediaPart("image", data, "messages.0.content.0", digest_of(tiny_spec, data))
        with paused(encoder, redis_server.url):
            a = asyncio.create_task(media(2).encode("req-a", [part], replies.subscribe("req-a")))
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(jobs_queued, redis.Redis.from_url(redis_server.url)) <= queued:
                assert time.monotonic() < deadline, "A never queued its job"
                await asyncio.sleep(0.05)  # until A holds the lease and queued the job
            b = asyncio.create_task(media(60).encode("req-b", [part], replies.subscribe("req-b")))
            with pytest.raises(Timeout) as timed_out:
                await asyncio.wait_for(a, 10)
            assert timed_out.value.code == "encode_timeout"
            await asyncio.sleep(0.5)  # past the job's deadline
        refs = await asyncio.wait_for(b, 30)
        reader.cancel()
        await r.aclose()
        return refs

    r = redis.Redis.from_url(redis_server.url)
    queued = jobs_queued(r)
    refs = asyncio.run(scenario())
    assert refs[0].num_tokens == 16
    assert jobs_queued(r) == queued + 2  # A's, dropped, and B's own


def test_with_the_media_cache_off_every_request_encodes_its_own_media(tiers, tiny_model, redis_server):
    """``--no-media-cache``: the same picture twice is encoded twice (and gives the same answer); a uuid reference
    never resolves; a gateway with the cache on still hits what the first request encoded under its own key."""
    urls, _ = tiers
    data = png_bytes(37, 29, seed=104)
    calls = encoder_calls(redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    before = set(r.scan_iter(KEYS.prefix + ":t:*"))
    first = greedy(urls[2], tiny_model.name, image_part(data, uuid="sku-104"))
    again = greedy(urls[2], tiny_model.name, image_part(data))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    # Their tensors live only as long as a request may need them (encode and first-token timeouts, and a minute),
    # not the encoder's --tensor-ttl: nothing else can look them up (an hour of each one's tensors filled Redis).
    mine = set(r.scan_iter(KEYS.prefix + ":t:*")) - before
    assert len(mine) == 2 and all(0 < r.ttl(k) <= 60 + 120 + 60 for k in mine), {k: r.ttl(k) for k in mine}
    assert first.json()["choices"][0]["message"]["content"] == again.json()["choices"][0]["message"]["content"]
    assert encoder_calls(redis_server.url) == calls + 2
    bare = chat(urls[2], tiny_model.name, image_part(None, uuid="sku-104"))
    assert bare.status_code == 400 and bare.json()["error"]["code"] == "unknown_media_id"
    assert greedy(urls[0], tiny_model.name, image_part(data)).status_code == 200
    assert encoder_calls(redis_server.url) == calls + 3  # nothing the cache-off gateway wrote is found by others


def test_encoding_ends_by_its_timeout_when_redis_stops_answering(tiny_model, tiny_spec):
    """Redis (or the Cluster node holding a key) that accepts connections but does not answer: each round trip
    waited for the socket timeout and redis-py's retries, so one request took 45 s past a 30 s encode timeout (an
    outside tester's chaos run). The whole encoding now ends at the encode timeout and a few seconds: a 503."""
    from cache.client import SOCKET_TIMEOUT_S
    from cache.embedded import EmbeddedRedis
    from gateway.encoding import ENCODE_SLACK_S
    from gateway.errors import Unavailable, redis_failure

    with EmbeddedRedis(maxmemory="64mb") as server:
        async def scenario():
            r = connect_async(server.url, socket_timeout=2 * SOCKET_TIMEOUT_S)  # as the gateway's (app.py)
            replies = ReplyRouter(r, KEYS, "stuck-gw")
            media = MediaEncoder(r, GatewayConfig(model_dir=str(tiny_model), redis_url=server.url,
                                                  encode_timeout_s=1.0), tiny_spec, replies, KEYS.reply("stuck-gw"))
            data = png_bytes(20, 20, seed=106)
            part = MediaPart("image", data, "messages.0.content.0", digest_of(tiny_spec, data))
            await r.ping()
            server.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                with pytest.raises(Exception) as caught:
                    await media.encode("req-stuck", [part], replies.subscribe("req-stuck"))
                return time.monotonic() - t0, caught.value
            finally:
                server.proc.send_signal(signal.SIGCONT)
                await r.aclose()

        took, err = asyncio.run(scenario())
    # A 503 (the chat route answers redis-py's own timeout, raised by the cancellation, as one too)
    assert took < 1.0 + ENCODE_SLACK_S + 2, (took, err)
    assert (isinstance(err, Unavailable) and err.code == "redis_unavailable") or redis_failure(err), repr(err)
