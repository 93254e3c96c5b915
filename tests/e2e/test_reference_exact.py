"""End to end against transformers itself: a real cluster (`tributary up`) serving a Hugging Face checkpoint
(``LlavaForConditionalGeneration``, ``Qwen2AudioForConditionalGeneration``; tiny, seeded, built by
tests/hf_checkpoints.py with transformers' save_pretrained) answers greedy requests, sent with the official `openai`
SDK carrying raw PNG bytes (data: URL) / raw WAV bytes, exactly as transformers' own

    model.generate(**processor(text=processor.apply_chat_template(messages), images=/audio=...),
                   max_new_tokens=N, do_sample=False)

does on the same checkpoint and the same bytes decoded the same way (Pillow; soundfile float32; audio features by
models/audio.py, within 2e-4 of the extractor's, which the logit margin below absorbs): the completion's
text equals the tokenizer's decode of the reference's new ids, ``usage.prompt_tokens`` equals the length of the
processor's ``input_ids`` and ``usage.completion_tokens`` equals N (ignore_eos). fp32 everywhere.

Encoder runtime: torch (``--encoder-runtime torch``, CPU). The ONNX export of both families is checked against torch
in tests/unit/test_families.py.

The backbone batches concurrent requests into one forward, so float results differ from the reference's by summation
order (~1e-6): only inputs whose greedy top-1 / top-2 logit gap is >= 1e-2 at every step in the reference run are
used (picked programmatically while the cluster starts), so such noise cannot flip a token.

Pipeline shards: the clusters run with ``--shards S`` for each S in ``SHARDS`` (one family's cluster beside the
other's, started together; the references are computed while they start).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai import OpenAI

from models.spec import ModelSpec
from tests.e2e.conftest import local_cluster
from tests.hf_checkpoints import (
    conversation,
    load_reference,
    modality_of,
    reference_generate,
    reference_inputs,
)
from tests.media import b64, data_url, png_bytes, wav_bytes

pytestmark = pytest.mark.slow

# Backbone pipeline shards per cluster (`tributary up --shards N`): add 2 and 3 here. Each entry starts one more
# cluster per family; the references are computed once. The served checkpoints have 4 (LLaVA) and 3 (Qwen2-Audio)
# decoder layers, so up to 3 shards fit both. Checked here (2 cores): SHARDS = [2] and [3] pass too, each entry
# adding ~45 s.
SHARDS = [1, 2, 3]
# One checkpoint per family (tests/hf_checkpoints.CONFIGS; the unit tests cover both configs of each family in
# process): LLaVA with transformers 5's file layout and the "default" strategy, as llava-1.5; Qwen2-Audio with the
# hub's legacy layout (preprocessor_config.json, chat_template.json), 128 mel bins, GQA 6:3.
SERVED = {"llava": "llava-a", "qwen2_audio": "qwen2-audio-b"}
MIN_GAP = 1e-2
CONCURRENT = 8


@dataclass
class Case:
    messages: list[dict]  # OpenAI messages, media as raw bytes (base64)
    max_tokens: int
    text: str  # tokenizer.decode(reference new ids, skip_special_tokens=True): what our content must be
    prompt_tokens: int  # len(processor(...)["input_ids"][0])


@dataclass
class Served:
    cluster: object
    client: OpenAI
    modality: str
    model: str
    cases: list[Case]  # cases[0]: single requests; cases[1:]: the concurrent burst


def candidates(modality: str):
    """Requests of different lengths: 1-2 media of different sizes / durations, questions of different lengths,
    some with a system turn or an earlier exchange. Endless; the caller keeps the clear-cut ones."""
    questions = ["What is this?", "Describe it in a few words, please.", "hm",
                 "Tell me everything you can about what you were given, in detail, and then summarize it."]
    seed = 0
    while True:
        count = 1 + seed % 2
        if modality == "image":
            media = [png_bytes(24 + 7 * ((seed + i) % 9), 20 + 11 * ((seed + 2 * i) % 7), seed=500 + 10 * seed + i)
                     for i in range(count)]
        else:
            media = [wav_bytes(0.25 + 0.45 * ((seed + i) % 8), seed=500 + 10 * seed + i) for i in range(count)]
        kw = {}
        if seed % 3 == 1:
            kw["system"] = "You answer briefly."
        if seed % 4 == 2:
            kw["history"] = [("hello", "hi there")]
        yield seed, media, questions[seed % len(questions)], kw
        seed += 1


def pick_cases(path, modality: str, wanted: int) -> list[Case]:
    model, processor = load_reference(path)
    tokenizer = ModelSpec.from_dir(path).load_tokenizer()  # the gateway's tokenizer (it detokenizes our answer)
    cases: list[Case] = []
    for seed, media, question, kw in candidates(modality):
        if len(cases) == wanted:
            return cases
        assert seed < 10 * wanted, "too few inputs with clear-cut greedy choices"
        oai, hf = conversation(modality, media, question, **kw)
        inputs = reference_inputs(processor, modality, hf, media)
        max_tokens = 6 + seed % 7  # 6..12: the burst's sequences leave the batch at different steps
        ids, gaps = reference_generate(model, inputs, max_tokens)
        if min(gaps) < MIN_GAP:
            continue
        cases.append(Case(oai, max_tokens, tokenizer.decode(ids, skip_special_tokens=True),
                          int(inputs["input_ids"].shape[1])))
    return cases


@pytest.fixture(scope="module")
def references(hf_checkpoint):
    """Per family: the clear-cut cases and their reference answers (computed once, whatever the shard count)."""
    return {}


@pytest.fixture(scope="module", params=SHARDS, ids=[f"{s}shard" for s in SHARDS])
def clusters(request, hf_checkpoint, references, redis_server, tmp_path_factory) -> dict[str, Served]:
    """One cluster per family, each on its own key prefix of the session's Redis, started together."""
    shards = request.param
    extra = ["--encoder-runtime", "torch", "--encoder-max-wait-ms", "20"]
    if shards != 1:
        extra += ["--shards", str(shards)]
    with contextlib.ExitStack() as stack:
        started = {family: stack.enter_context(local_cluster(
            hf_checkpoint(name), redis_server.url, tmp_path_factory.mktemp(f"ref-{family}-{shards}"), *extra,
            prefix=f"ref-{family}-{shards}")) for family, name in SERVED.items()}
        for family, name in SERVED.items():  # while the tiers start
            if family not in references:
                references[family] = pick_cases(hf_checkpoint(name), modality_of(name), 1 + CONCURRENT)
        served = {}
        for family, cluster in started.items():
            cluster.wait_ready()
            client = OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
            served[family] = Served(cluster, client, modality_of(SERVED[family]), cluster.model, references[family])
        yield served


@pytest.fixture(params=list(SERVED))
def served(request, clusters) -> Served:
    return clusters[request.param]


def ask(served: Served, case: Case, **kw):
    return served.client.chat.completions.create(model=served.model, messages=case.messages,
                                                 max_tokens=case.max_tokens, temperature=0,
                                                 extra_body={"ignore_eos": True}, **kw)


def test_health_needs_only_the_family_encoder(served):
    workers = httpx.get(f"{served.cluster.base_url}/health", timeout=10).json()["workers"]
    assert {k for k in workers if k.startswith("encoder:")} == {f"encoder:{served.modality}"}


def test_greedy_answer_equals_transformers_generate(served):
    case = served.cases[0]
    r = ask(served, case)
    assert r.choices[0].message.content == case.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == case.prompt_tokens
    assert r.usage.completion_tokens == case.max_tokens


def test_streamed_answer_equals_transformers_generate(served):
    case = served.cases[0]
    chunks = list(ask(served, case, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == case.text
    assert chunks[-1].usage.prompt_tokens == case.prompt_tokens
    assert chunks[-1].usage.completion_tokens == case.max_tokens


def test_concurrent_requests_each_equal_their_reference(served):
    """Eight requests of different prompt lengths, media and max_tokens at once: encoded in batches (Qwen2-Audio:
    clips of different real lengths in one forward, each with its own mask) and decoded in one batched forward."""
    burst = served.cases[1:]
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(lambda c: ask(served, c), burst))
    for i, (case, r) in enumerate(zip(burst, answers)):
        assert r.choices[0].message.content == case.text, f"request {i}"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (case.prompt_tokens, case.max_tokens), i
    assert len({c.prompt_tokens for c in burst}) > 3  # the burst really mixes lengths


def test_a_modality_the_model_lacks_is_a_400_naming_the_part(served):
    wrong = ({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(0.3)), "format": "wav"}}
             if served.modality == "image" else
             {"type": "image_url", "image_url": {"url": data_url(png_bytes(16, 16))}})
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(
            model=served.model, max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "text", "text": "and this?"}, wrong]}])
    err = info.value.body
    assert err["param"] == "messages.0.content.1" and err["code"] == "unsupported_modality"
    assert ("audio" if served.modality == "image" else "image") in err["message"]
