"""One request's fault fails that request alone, in real worker processes on a real Redis: a batch holding poisoned
work completes every other request, and the worker keeps its PID.

Every batch is queued in one MULTI/EXEC, so the worker, blocked on its read, receives all of it in one read and
runs it as one batch (one forward pass for the encoder; one prefill step for the backbone).
"""

from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
import redis
import torch

from cache.codec import encode_tensor
from cache.keys import BACKBONE_GROUP, ENCODER_GROUP, Keys
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import hold_lease, start_tier
from tests.integration.test_pipeline_shards import reference
from tests.media import wav_bytes

KEYS = Keys()


def read_replies(r, stream: str, want: set[str], key, timeout: float = 60) -> dict:
    """Messages on ``stream`` until every id in ``want`` has a final one (``key(msg)`` -> (id, final))."""
    out: dict[str, list] = {}
    last, deadline = "0-0", time.monotonic() + timeout
    while want and time.monotonic() < deadline:
        for _, entries in r.xread({stream: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                msg = m.decode(fields_payload(fields), m.ReplyMessage)
                ident, final = key(msg)
                out.setdefault(ident, []).append(msg)
                if final:
                    want.discard(ident)
    assert not want, f"no final reply for {sorted(want)}"
    return out


# ---- encoder ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audio_worker(tiny_model, redis_server):
    proc = start_tier(["encoder", "--modality", "audio", "--model", str(tiny_model), "--max-batch", "16",
                       "--max-wait-ms", "50"], redis_server.url, "encoder:audio")
    yield proc
    if proc.poll() is None:
        proc.kill()


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples.astype("float32"), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def poisoned_clips() -> dict[str, bytes]:
    wave = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype("float32")
    nan, huge = wave.copy(), wave.copy()
    nan[100:200] = np.nan
    huge[:] = 3e38  # finite samples whose power overflows float32: the log-mel features are infinite
    return {"nan": float_wav(nan), "overflow": float_wav(huge)}


def test_non_finite_media_fails_alone_in_a_batch_of_good_ones(audio_worker, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    stats = KEYS.stats("encoder:audio")
    passes_before = int(r.hget(stats, "forward_passes") or 0)
    busy_before = float(r.hget(stats, "busy_seconds") or 0)
    clips = {**poisoned_clips(), **{f"good{i}": wav_bytes(0.5 + 0.1 * i, seed=i) for i in range(8)}}
    jobs, reply_to = {}, f"reply:iso-enc-{uuid.uuid4().hex[:6]}"
    hold_lease(r, reply_to)
    pipe = r.pipeline(transaction=True)  # MULTI: the blocked worker gets all ten in one read
    for name, data in clips.items():
        digest = uuid.uuid4().hex
        job = m.EncodeJob(request_id=name, job_id=name, modality=m.Modality.AUDIO,
                          encoder_id=tiny_spec.encoder_id("audio"), digest=digest, blob_key=KEYS.blob(digest),
                          reply_to=reply_to, deadline=time.time() + 60)
        pipe.set(job.blob_key, data, ex=60)
        pipe.xadd(KEYS.jobs("audio"), payload_fields(m.encode(job)))
        jobs[name] = job
    pipe.execute()
    got = read_replies(r, reply_to, set(clips), lambda msg: (msg.job_id, True))
    for name in ("nan", "overflow"):
        failed = got[name][-1]
        assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.BAD_MEDIA
        assert "non-finite" in failed.error
    for i in range(8):
        done = got[f"good{i}"][-1]
        assert isinstance(done, m.EncodeDone), done
        assert r.hget(done.tensor_key, "data") is not None
    assert int(r.hget(stats, "forward_passes")) == passes_before + 1  # the eight good ones: one forward pass
    assert int(r.hget(stats, "last_batch_size")) == 8
    assert float(r.hget(stats, "busy_seconds")) > busy_before  # the seconds it held the batch (the autoscaler's)
    assert r.xpending(KEYS.jobs("audio"), ENCODER_GROUP)["pending"] == 0
    assert audio_worker.poll() is None  # same process, still serving


# ---- backbone -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone(tiny_model, redis_server):
    proc = start_tier(["backbone", "--model", str(tiny_model)], redis_server.url, "backbone")
    yield proc
    if proc.poll() is None:
        proc.kill()


PROMPTS = [[1, 286, 274, 203, 56], [1, 20, 21, 22, 203], [1, 30, 31, 203, 1, 288, 87], [1, 40, 41]]


def test_a_poisoned_plan_and_extreme_sampling_fail_or_run_alone(backbone, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    reply_to, n = f"reply:iso-bb-{uuid.uuid4().hex[:6]}", 12
    width = tiny_spec.config["text_config"]["hidden_size"]
    image_id = tiny_spec.placeholder_ids["image"]
    rows = torch.randn(16, width)
    rows[3, 5] = float("nan")  # a corrupt cache entry (as a rogue writer or a broken encoder would leave)
    poisoned_key = KEYS.tensor(tiny_spec.encoder_id("image"), "poisoned-" + uuid.uuid4().hex)
    r.hset(poisoned_key, mapping={"data": encode_tensor(rows), "n": 16})
    r.expire(poisoned_key, 600)

    def sampling(**kw) -> m.SamplingParams:
        return m.SamplingParams(max_tokens=n, ignore_eos=True, **{"temperature": 0.0, **kw})

    plans = {f"good{i}": (ids, sampling()) for i, ids in enumerate(PROMPTS)}
    plans |= {
        "tiny-temperature": (PROMPTS[0], sampling(temperature=1e-30, seed=2**64 - 1)),
        "tiny-top-p": (PROMPTS[1], sampling(temperature=2.0, top_p=1e-300, seed=-(2**63))),
        "top-p-zero": (PROMPTS[2], sampling(temperature=1.0, top_p=0.0)),
        "nan-temperature": (PROMPTS[2], sampling(temperature=float("nan"))),
        "outside-vocab": ([1, 2, 10**6], sampling()),
        "poisoned-media": ([1, 40] + [image_id] * 16 + [203], sampling()),
    }
    hold_lease(r, reply_to)
    pipe = r.pipeline(transaction=True)  # MULTI: one read, one batch
    for rid, (ids, params) in plans.items():
        media = [m.MediaRef(modality=m.Modality.IMAGE, tensor_key=poisoned_key, num_tokens=16)] \
            if rid == "poisoned-media" else []
        plan = m.PromptPlan(request_id=rid, reply_to=reply_to, token_ids=ids, media=media, sampling=params,
                            deadline=time.time() + 60)
        pipe.xadd(KEYS.gen(), payload_fields(m.encode(plan)))
    pipe.execute()
    got = read_replies(r, reply_to, set(plans), lambda ev: (ev.request_id, ev.finish is not None))

    def tokens(rid):
        return [t for ev in got[rid] for t in ev.token_ids]

    for i, ids in enumerate(PROMPTS):
        assert got[f"good{i}"][-1].finish == m.FinishReason.LENGTH
        assert tokens(f"good{i}") == reference(tiny_spec, ids, n)
    # A temperature that underflows is greedy; a top_p below float32's range keeps the likeliest token.
    assert tokens("tiny-temperature") == tokens("good0")
    assert tokens("tiny-top-p") == tokens("good1")
    for rid, code, words in [("top-p-zero", m.ErrorCode.BAD_PLAN, "top_p"),
                             ("nan-temperature", m.ErrorCode.BAD_PLAN, "temperature"),
                             ("outside-vocab", m.ErrorCode.BAD_PLAN, "vocabulary"),
                             ("poisoned-media", m.ErrorCode.MEDIA_EXPIRED, "not finite")]:
        last = got[rid][-1]
        assert (last.finish, last.code) == (m.FinishReason.ERROR, code) and words in last.error, last
    assert not r.exists(poisoned_key)  # dropped: its gateway encodes the media again (none would write NaN)
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0
    assert backbone.poll() is None  # same process, still serving
