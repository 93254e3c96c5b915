"""End to end: the official `openai` SDK against a real local cluster (gateway, encoders, backbone, Redis)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis
from openai import OpenAI

from tests.media import b64, data_url, jpeg_bytes, png_bytes, wav_bytes

pytestmark = pytest.mark.slow

TINY_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches
TINY_AUDIO_TOKENS_1S = 25  # 100 mel frames -> conv stride 2 -> pool stride 2


@pytest.fixture(scope="module")
def client(cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def trimodal_messages(seed: int = 0, text: str = "What do you see and hear?") -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(48, 36, seed=seed))}},
            {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(1.0, seed=seed)), "format": "wav"}},
        ]},
    ]


def test_models_lists_the_served_model(client, cluster):
    assert [m.id for m in client.models.list().data] == [cluster.model]


def test_non_streamed_trimodal(client, cluster, tiny_spec):
    r = client.chat.completions.create(model=cluster.model, messages=trimodal_messages(1), max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    tok = tiny_spec.load_tokenizer()
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": [{"type": "text", "text": "What do you see and hear?"}, {"type": "image"},
                                      {"type": "audio"}]}], add_generation_prompt=True, tokenize=False)
    text_tokens = len(tok(rendered, add_special_tokens=False)["input_ids"]) - 2  # minus the two placeholders
    assert r.usage.prompt_tokens == text_tokens + TINY_IMAGE_TOKENS + TINY_AUDIO_TOKENS_1S
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.audio_tokens == TINY_AUDIO_TOKENS_1S  # the audio encoder's share
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    # The deployment's fingerprint: the checkpoint's, the encoders' and the backbone's precisions (fp32 here); the
    # same on every answer, and another for a bf16 backbone or bf16 encoders.
    assert r.system_fingerprint == tiny_spec.system_fingerprint_with("float32") and r.system_fingerprint[:3] == "fp_"
    assert tiny_spec.system_fingerprint_with("bfloat16") != r.system_fingerprint != tiny_spec.system_fingerprint
    assert tiny_spec.with_encoder_dtypes("bfloat16").system_fingerprint != tiny_spec.system_fingerprint


def test_streamed_equals_non_streamed_at_temperature_0(client, cluster):
    kwargs = dict(model=cluster.model, messages=trimodal_messages(2), max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.audio_tokens == whole.usage.prompt_tokens_details.audio_tokens > 0
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}
    # Every chunk carries "usage", null but on the last, as OpenAI's do (an outside tester's raw-JSON client read
    # chunk["usage"] and met a KeyError); without include_usage, none does.
    for include in (True, False):
        body = {k: v for k, v in kwargs.items() if k != "extra_body"} | {
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": include}}
        with httpx.stream("POST", f"{cluster.base_url}/v1/chat/completions", timeout=120, json=body) as r:
            assert r.status_code == 200, r.read()
            raw = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert [("usage" in c, c.get("usage") is not None) for c in raw] == (
            [(True, False)] * (len(raw) - 1) + [(True, True)] if include else [(False, False)] * len(raw)), raw


def test_seed_reproducible_at_temperature_1(client, cluster):
    def run(seed):
        return client.chat.completions.create(model=cluster.model, messages=trimodal_messages(3), max_tokens=16,
                                              temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
                                              ).choices[0].message.content

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_jpeg_and_text_only(client, cluster):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(jpeg_bytes(64, 64, seed=4), "image/jpeg")}}]}]
    assert client.chat.completions.create(model=cluster.model, messages=msgs, max_tokens=4).usage.completion_tokens
    r = client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_stop_string_cuts_the_answer(client, cluster):
    base = client.chat.completions.create(model=cluster.model, messages=trimodal_messages(5), max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = next((base[i:i + 2] for i in range(3, len(base) - 2) if base[i:i + 2].strip() and
                 "\ufffd" not in base[i:i + 2]), None)
    if stop is None:
        pytest.skip("the random model produced no usable stop string")
    cut = client.chat.completions.create(model=cluster.model, messages=trimodal_messages(5), max_tokens=24,
                                         temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == base[: base.index(stop)]


def test_second_identical_image_is_a_cache_hit(client, cluster):
    msgs = trimodal_messages(6)
    client.chat.completions.create(model=cluster.model, messages=msgs, max_tokens=2)
    before = {m: cluster.stats(f"encoder:{m}") for m in ("image", "audio")}
    client.chat.completions.create(model=cluster.model, messages=msgs, max_tokens=2)
    for modality, stats in before.items():
        after = cluster.stats(f"encoder:{modality}")
        assert after.get("encoder_calls", 0) == stats.get("encoder_calls", 0)  # nothing encoded again
        assert after.get("cache_hits", 0) == stats.get("cache_hits", 0) + 1


def test_a_prompt_sent_again_takes_its_prefix_from_the_backbones_cache_and_answers_the_same(client, cluster):
    """The backbone's prefix cache: the same trimodal prompt again takes its full KV blocks (16 positions each) from
    the cache, all but its last position at most, and reports them as OpenAI's cached tokens; the answer at
    temperature 0 is the same. A conversation's next turn shares its first turn's blocks."""
    msgs = trimodal_messages(41, text="a question nobody asked before " + "word " * 30)
    import uuid

    msgs[0]["content"] = f"{uuid.uuid4().hex} You are terse."  # new from its first block: no other test's prompt
    # shares it (the others' system prompts share their first 16 tokens)
    ask = lambda m: client.chat.completions.create(model=cluster.model, messages=m, max_tokens=6,  # noqa: E731
                                                   temperature=0, extra_body={"ignore_eos": True})
    first, again = ask(msgs), ask(msgs)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (first.usage.prompt_tokens - 1) // 16 * 16 > 0, again.usage
    assert again.choices[0].message.content == first.choices[0].message.content
    turn = ask([*msgs, {"role": "assistant", "content": "noted"}, {"role": "user", "content": "and then?"}])
    assert turn.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16 - 16


def test_a_burst_reaches_the_encoder_as_batched_forward_passes(client, cluster):
    before = cluster.stats("encoder:image")

    def ask(seed: int) -> int:
        msgs = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(40, 40, seed=1000 + seed))}}]}]
        return client.chat.completions.create(model=cluster.model, messages=msgs, max_tokens=1).usage.prompt_tokens

    with ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(ask, range(8)))) == 1
    after = cluster.stats("encoder:image")
    items = after["encoder_calls"] - before.get("encoder_calls", 0)
    passes = after["forward_passes"] - before.get("forward_passes", 0)
    assert items == 8
    assert passes < items, f"8 images took {passes} forward passes: no batching"


def test_client_disconnect_cancels_generation(client, cluster):
    before = cluster.stats("backbone").get("cancelled", 0)
    stream = client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": "go"}],
                                            max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    r = client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": "next"}],
                                       max_tokens=2)  # the cluster still serves
    assert r.choices[0].message.content is not None
    deadline = time.monotonic() + 10
    while cluster.stats("backbone").get("cancelled", 0) == before and time.monotonic() < deadline:
        time.sleep(0.1)  # the backbone notices within one decode step; poll its counter
    assert cluster.stats("backbone").get("cancelled", 0) == before + 1


BAD = [
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("empty messages", {"messages": []}, "messages"),
    ("wrong part type", {"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
     "messages.0.content.0"),
    ("undecodable image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"definitely not a png")}}]}]}, "messages.0.content.0"),
    ("undecodable audio", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(b"RIFF....WAVEnope"), "format": "wav"}}]}]},
     "messages.0.content.0"),
    ("remote image url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]}, "messages.0.content.0"),
    ("n > 1", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ("tools", {"messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("response_format", {"messages": [{"role": "user", "content": "hi"}],
                         "response_format": {"type": "json_object"}}, "response_format"),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_the_problem(cluster, name, body, param):
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions", json={"model": cluster.model, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert (err["param"] or "").startswith(param.split(".")[0])
    assert param in (err["param"] or "") or param in err["message"]


def test_malformed_json_and_unknown_model(cluster, client):
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    health = httpx.get(f"{cluster.base_url}/health", timeout=10).json()
    assert health["status"] == "ok"  # nothing above took a tier down


def test_unknown_routes_and_methods_are_openai_shaped_errors(cluster):
    body = {"model": cluster.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions/", json=body, timeout=30)
    assert r.status_code == 404, r.text  # not a 307 the SDK would not follow
    assert "did you mean /v1/chat/completions?" in r.json()["error"]["message"]
    r = httpx.get(f"{cluster.base_url}/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"].startswith("method GET")
    assert r.headers["allow"] == "POST"
    r = httpx.post(f"{cluster.base_url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Every response carries an x-request-id, as OpenAI's do (an outside tester found none off the chat route).
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/nope"), ("GET", "/health"),
                         ("DELETE", "/v1/models"), ("GET", "/nowhere")):
        r = httpx.request(method, cluster.base_url + path, timeout=30)
        assert len(r.headers.get("x-request-id", "")) == 32, (method, path, r.headers)


def test_the_sdks_multi_turn_pattern_works(client, cluster):
    """The OpenAI docs' pattern: append the answer's message (``refusal: null`` and all) and ask again. It was a
    400 (unknown parameter 'messages.1.refusal')."""
    messages = [{"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=3)
    messages.append(first.choices[0].message)
    messages.append({"role": "user", "content": "and then?"})
    second = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=3)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    dumped = [first.choices[0].message.model_dump(), {"role": "user", "content": "again"}]
    client.chat.completions.create(model=cluster.model, messages=[messages[0], *dumped], max_tokens=1)


def test_a_compressed_body_is_a_415_not_read_as_text(cluster):
    import gzip

    raw = json.dumps({"model": cluster.model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for encoding, data in (("gzip", gzip.compress(raw)), ("br", raw)):
        r = httpx.post(f"{cluster.base_url}/v1/chat/completions", content=data, timeout=30,
                       headers={"content-type": "application/json", "content-encoding": encoding})
        assert r.status_code == 415, r.text
        assert r.json()["error"]["code"] == "unsupported_encoding" and encoding in r.json()["error"]["message"]


def test_clients_still_sending_their_bodies_hold_no_in_flight_slot(client, cluster):
    """More slow senders than --max-inflight (256): each has sent its headers and one byte of its body. They hold
    no slot, so a request that arrives whole is served meanwhile."""
    import socket

    host, port = cluster.base_url.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(300):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
            slow.append(s)
        time.sleep(1.0)
        assert httpx.get(f"{cluster.base_url}/health", timeout=10).json()["inflight"] == 0
        out = client.chat.completions.create(model=cluster.model, max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].finish_reason in ("stop", "length")
    finally:
        for s in slow:
            s.close()


def test_the_sdk_retrieves_the_served_model(client, cluster):
    assert client.models.retrieve(cluster.model).id == cluster.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_body_cut_by_the_client_is_no_server_error(cluster):
    """A chunked body the HTTP parser refuses mid-way: uvicorn answers its own 400, and the gateway sees a client
    that left, not an unhandled error."""
    import socket

    host, port = cluster.base_url.removeprefix("http://").split(":")
    seen = len(cluster.log_path.read_bytes())
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mo\"\r\nZZZ\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    time.sleep(0.5)
    assert b"unhandled error" not in cluster.log_path.read_bytes()[seen:]
    assert httpx.get(f"{cluster.base_url}/health", timeout=10).json()["status"] == "ok"


def test_request_id_is_the_servers_and_the_clients_is_echoed_and_logged(cluster):
    r = httpx.post(f"{cluster.base_url}/v1/chat/completions", timeout=60, headers={"x-request-id": "e2e-trace-1"},
                   json={"model": cluster.model, "messages": trimodal_messages(9), "max_tokens": 2})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid != "e2e-trace-1" and len(rid) == 32  # server-generated: routes every tier
    assert r.headers["x-client-request-id"] == "e2e-trace-1"
    assert r.json()["id"] == f"chatcmpl-{rid}"
    wanted, deadline = {"gateway", "encoder:image", "encoder:audio", "backbone"}, time.monotonic() + 15
    while True:  # the tiers' lines reach the log through up's relay threads, maybe after the answer
        tiers, client_logged = set(), False
        for line in cluster.log_path.read_text().splitlines():
            if line.startswith("{") and rid in line:
                record = json.loads(line)
                tiers.add(record["tier"])
                client_logged |= record.get("client_request_id") == "e2e-trace-1"
        if (wanted <= tiers and client_logged) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert wanted <= tiers
    assert client_logged  # the gateway logs the client's id beside the server's


def test_concurrent_requests_with_one_client_id_each_get_their_own_answer(client, cluster):
    prompts = [f"tell me about rivers number {i}" for i in range(4)]

    def ask(text: str, rid: str | None = None) -> str:
        headers = {"X-Request-Id": rid} if rid else None
        return client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": text}],
                                              max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
                                              extra_headers=headers).choices[0].message.content

    alone = [ask(p) for p in prompts]
    assert len(set(alone)) > 1  # the prompts give different answers, so a mix-up would show
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: ask(p, "retry-1"), prompts))
    assert together == alone


def raw_post(cluster, body: bytes) -> httpx.Response:
    return httpx.post(f"{cluster.base_url}/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "application/json"})


@pytest.mark.parametrize("body,words", [
    (b"[" * 200_000 + b"]" * 200_000, "nested"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": ' + b'{"a":' * 50 + b"1"
     + b"}" * 51, "nested"),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}', "surrogate"),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "stop": "\\udfff"}', "surrogate"),
    (b'{"model": "MODEL\\ud800", "messages": [{"role": "user", "content": "x"}]}', "surrogate"),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "JSON"),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}', "seed"),
    (b"\xff\xfe{}", "JSON"),
])
def test_malformed_bodies_are_400s(cluster, body, words):
    r = raw_post(cluster, body.replace(b"MODEL", cluster.model.encode()))
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def pids(cluster) -> set[int]:
    return set(cluster.children())


def nan_wav() -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    wave = (np.random.default_rng(1).standard_normal(8000) * 0.1).astype("float32")
    wave[10:20] = np.nan
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_non_finite_audio_fails_alone_among_concurrent_requests(client, cluster):
    before = pids(cluster)

    def ask(i: int):
        data = nan_wav() if i == 0 else wav_bytes(0.4 + 0.05 * i, seed=200 + i)
        msgs = [{"role": "user", "content": [{"type": "text", "text": "listen"},
                                              {"type": "input_audio", "input_audio": {"data": b64(data),
                                                                                      "format": "wav"}}]}]
        try:
            return client.chat.completions.create(model=cluster.model, messages=msgs, max_tokens=4,
                                                  extra_body={"ignore_eos": True})
        except openai.APIStatusError as exc:
            return exc

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(ask, range(9)))
    bad = results[0]
    assert isinstance(bad, openai.BadRequestError), bad
    assert bad.body["code"] == "invalid_media" and "non-finite" in bad.body["message"]
    assert bad.body["param"] == "messages.0.content.1"
    assert all(r.usage.completion_tokens == 4 for r in results[1:]), results[1:]
    assert pids(cluster) == before  # no worker died or was restarted


def test_sampling_extremes_run_beside_ordinary_requests(client, cluster):
    before = pids(cluster)
    base = dict(model=cluster.model, messages=[{"role": "user", "content": "extremes"}], max_tokens=6)
    cases = [dict(temperature=1e-30, seed=2**64 - 1), dict(temperature=2, top_p=1e-300, seed=-(2**63)),
             dict(temperature=0), dict(temperature=2, top_p=1), dict(temperature=1.5, seed=0)] + \
        [dict(temperature=0.7, seed=i) for i in range(4)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda kw: client.chat.completions.create(
            **base, **kw, extra_body={"ignore_eos": True}), cases))
    assert all(r.usage.completion_tokens == 6 for r in results)
    greedy = results[2].choices[0].message.content
    assert results[0].choices[0].message.content == greedy  # a temperature that underflows is greedy
    assert results[1].choices[0].message.content == greedy  # top_p below float32's range keeps the argmax
    assert pids(cluster) == before


def test_too_many_media_parts_are_a_400_before_anything_is_queued(cluster):
    r = redis.Redis.from_url(cluster.redis_url)
    queued = jobs_added(r, cluster.prefix)
    parts = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(20, 20, seed=300 + i))}} for i in range(9)]
    resp = httpx.post(f"{cluster.base_url}/v1/chat/completions", timeout=30, json={
        "model": cluster.model, "messages": [{"role": "user", "content": parts}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_media_parts"
    assert jobs_added(r, cluster.prefix) == queued


def test_the_context_is_checked_before_any_media_is_encoded(cluster, tiny_spec):
    r = redis.Redis.from_url(cluster.redis_url)
    queued, calls = jobs_added(r, cluster.prefix), cluster.stats("encoder:image").get("encoder_calls", 0)
    tok = tiny_spec.load_tokenizer()
    long_text = " a" * ((tiny_spec.max_context - 30) // 2)  # two tokens each
    alone = len(tok(tok.apply_chat_template([{"role": "user", "content": long_text}], add_generation_prompt=True,
                                            tokenize=False), add_special_tokens=False)["input_ids"])
    assert alone + 8 <= tiny_spec.max_context < alone + 8 + 16  # fits alone; not with an image's 16 tokens
    msgs = [{"role": "user", "content": [{"type": "text", "text": long_text},
                                         {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=301))}}]}]
    resp = httpx.post(f"{cluster.base_url}/v1/chat/completions", timeout=30,
                      json={"model": cluster.model, "messages": msgs, "max_tokens": 8})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
    assert jobs_added(r, cluster.prefix) == queued
    assert cluster.stats("encoder:image").get("encoder_calls", 0) == calls


def test_ready_and_health(cluster):
    ready = httpx.get(f"{cluster.base_url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["missing"] == []
    health = httpx.get(f"{cluster.base_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["redis"] == "ok"
    assert health["instance"] == ready.json()["instance"] != ""


def test_metrics_report_the_request_the_tokens_and_every_tiers_queue(client, cluster):
    """``GET /metrics`` (Prometheus text): a trimodal request shows in the gateway's latency histograms, token
    counters, finish reasons and cache counters; this (only) gateway holds the metrics lease and exports each
    tier's queue, and the cluster's stats hashes (what the other tests read) as tributary_tier_stat."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.chat.completions.create(model=cluster.model, messages=trimodal_messages(41), max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5

    def find(samples, name: str, **labels) -> list[float]:
        return [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    deadline = time.monotonic() + 15
    while True:  # the queue metrics come from a snapshot refreshed every 2 s: wait for one taken after the request
        resp = httpx.get(f"{cluster.base_url}/metrics", timeout=10)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        samples = [s for fam in text_string_to_metric_families(resp.text) for s in fam.samples]
        if find(samples, "tributary_tier_stat", tier="backbone", stat="tokens") or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # polling the scrape endpoint for the next snapshot

    def value(name: str, **labels) -> float:
        found = find(samples, name, **labels)
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value("tributary_time_to_first_token_seconds_count") >= 1
    assert value("tributary_e2e_request_latency_seconds_count") >= 1
    assert value("tributary_inter_token_latency_seconds_count") >= 1  # 5 tokens: at least two events
    assert value("tributary_generation_tokens_total") >= 5 and value("tributary_prompt_tokens_total") > 0
    assert value("tributary_request_success_total", finished_reason="length") >= 1
    for modality in ("image", "audio"):
        assert (value("tributary_encoder_cache_hits_total", modality=modality)
                + value("tributary_encoder_cache_misses_total", modality=modality)) >= 1
    tiers = {"encoder:image", "encoder:audio", "backbone"}
    assert value("tributary_cluster_metrics_leader") == 1
    for name in ("tributary_queue_length", "tributary_queue_pending", "tributary_queue_lag",
                 "tributary_tier_live_workers"):
        assert {s.labels["tier"] for s in samples if s.name == name} == tiers, name
    assert value("tributary_tier_live_workers", tier="backbone") >= 1
    assert value("tributary_tier_stat", tier="backbone", stat="tokens") >= 5
    assert value("tributary_tier_stat", tier="encoder:image", stat="forward_passes") >= 1


def jobs_added(r, prefix: str) -> int:
    """Entries ever added to the image job stream (acked jobs are deleted, so not its length; Redis 7+)."""
    try:
        return int(r.xinfo_stream(f"{prefix}:jobs:image")["entries-added"])
    except redis.ResponseError:  # no such stream yet
        return 0


def test_remote_image_and_audio_urls_are_fetched_and_answer_as_their_bytes(client, cluster, tmp_path):
    """With --allowed-media-domains (here the tests' own loopback server, which needs the UNSAFE test-only setting
    the cluster fixture gives), an http image URL and an audio_url give the answer their bytes give as data: URLs;
    a host not allowed is a 400 naming the part."""
    import http.server
    import threading

    png, wav = png_bytes(33, 29, seed=81), wav_bytes(0.4, seed=81)
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "a.wav").write_bytes(wav)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        def ask(image_url: str, audio_url: str) -> str:
            return client.chat.completions.create(model=cluster.model, temperature=0.0, max_tokens=6, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "audio_url", "audio_url": {"url": audio_url}}]}],
            ).choices[0].message.content

        remote = ask(f"{base}/a.png", f"{base}/a.wav")
        assert remote == ask(data_url(png), f"data:audio/wav;base64,{b64(wav)}")
        with pytest.raises(openai.BadRequestError) as info:
            ask(f"http://localhost:{httpd.server_address[1]}/a.png", f"{base}/a.wav")
        assert info.value.body["code"] == "remote_media_refused" and info.value.body["param"] == (
            "messages.0.content.0")
    finally:
        httpd.shutdown()


def test_a_request_that_fails_before_its_first_token_is_counted(client, cluster):
    """Media an encoder refuses fails the request while it waits for its encodings, before it can generate: it
    still ends in the metrics (finished_reason="error", and its latency), so an encoder tier failing every request
    shows on the dashboard as errors rather than as silence."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(f"{cluster.base_url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    error = ("tributary_request_success_total", (("finished_reason", "error"),))
    ended = ("tributary_e2e_request_latency_seconds_count", ())
    before = scrape()
    msgs = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(nan_wav()),
                                                                                  "format": "wav"}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=cluster.model, messages=msgs, max_tokens=4)
    assert info.value.body["code"] == "invalid_media"
    after = scrape()
    assert after[error] == before.get(error, 0) + 1
    assert after[ended] == before.get(ended, 0) + 1
