"""backbone/engine.py: the engine's greedy tokens are the reference model's, with and without media rows."""

from __future__ import annotations

import pytest
import torch

from backbone.engine import Engine
from backbone.fusion import PlanError, fuse
from backbone.loader import load_shard
from models import trimodal
from router.messages import FinishReason, SamplingParams

PROMPTS = [
    "<|im_start|>user\nThe river flows into sea under bright sky<|im_end|>\n<|im_start|>assistant\n",
    "small birds sing near old stone bridge and people walk",
    "Hi",
]
MEDIA_PROMPT = ("<|im_start|>user\nlook<|image|><|image|><|image|><|image|> and listen<|audio|><|audio|><|audio|>"
                " then<|image|><|image|><|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def lm(tiny_spec):
    torch.manual_seed(0)
    return trimodal.load_language_model(tiny_spec.path, tiny_spec.config)


@pytest.fixture(scope="module")
def tok(tiny_spec):
    return tiny_spec.load_tokenizer()


@pytest.fixture(scope="module")
def shard(tiny_spec):
    """The engine's own model: every layer, read from the same checkpoint by backbone.loader, with a KV pool."""
    model = load_shard(tiny_spec.path, tiny_spec.config["text_config"])[0]
    model.allocate_pool(512)
    return model


@pytest.fixture(scope="module")
def engine(shard, tiny_spec):
    return Engine(shard, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(max_tokens=12, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(engine, ids, params, media=()):
    seq = engine.new_sequence("r", len(ids), params)
    engine.prefill(seq, ids, list(media))
    while seq.finish is None:
        engine.step([seq])
    return seq


def hf_generate(lm, n, **inputs):
    with torch.inference_mode():
        out = lm.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out


def manual_greedy(lm, embeds: torch.Tensor, n: int) -> list[int]:
    """No KV cache: re-run the whole sequence for every token."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm(inputs_embeds=embeds).logits[0, -1]
            tok = int(torch.argmax(logits))
            out.append(tok)
            embeds = torch.cat([embeds, lm.model.embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out


def media_rows(seed=0, width=64):
    g = torch.Generator().manual_seed(seed)
    return [("image", torch.randn(4, width, generator=g)), ("audio", torch.randn(3, width, generator=g)),
            ("image", torch.randn(2, width, generator=g))]


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_matches_transformers_generate(engine, lm, tok, text):
    ids = ids_of(tok, text)
    seq = run(engine, ids, greedy(12))
    ref = hf_generate(lm, 12, input_ids=torch.tensor([ids]))[0, len(ids):].tolist()
    assert len(ref) == 12  # nothing stopped the reference early
    assert seq.output == ref
    assert seq.finish == FinishReason.LENGTH


def test_greedy_matches_a_forward_without_cache(engine, lm, tok):
    ids = ids_of(tok, PROMPTS[0])
    seq = run(engine, ids, greedy(12))
    with torch.inference_mode():
        embeds = lm.model.embed_tokens(torch.tensor([ids]))
    assert seq.output == manual_greedy(lm, embeds, 12)


def test_media_rows_spliced_match_generate_from_embeds(engine, lm, tok, tiny_spec):
    ids = ids_of(tok, MEDIA_PROMPT)
    media = media_rows()
    seq = run(engine, ids, greedy(12), media)
    with torch.inference_mode():
        fused = fuse(lm.model.embed_tokens, torch.tensor(ids), media, tiny_spec.placeholder_ids).clone()
        plain = lm.model.embed_tokens(torch.tensor([ids]))
    ref = hf_generate(lm, 12, inputs_embeds=fused)[0].tolist()[-12:]
    assert seq.output == ref
    assert seq.output == manual_greedy(lm, fused, 12)
    # The rows matter: without them (placeholder embeddings only) the answer is different.
    assert manual_greedy(lm, plain, 12) != seq.output


def test_different_media_rows_give_a_different_answer(engine, tok):
    ids = ids_of(tok, MEDIA_PROMPT)
    a = run(engine, ids, greedy(12), media_rows(seed=0)).output
    b = run(engine, ids, greedy(12), media_rows(seed=1)).output
    assert a != b


def test_media_plan_mismatch_raises_plan_error(engine, tok):
    ids = ids_of(tok, MEDIA_PROMPT)
    seq = engine.new_sequence("r", len(ids), greedy(4))
    with pytest.raises(PlanError):
        engine.prefill(seq, ids, media_rows()[:2])  # the last image part is missing
    with pytest.raises(PlanError):
        engine.prefill(seq, ids, media_rows(width=32))


def test_max_tokens_gives_length(engine, tok):
    ids = ids_of(tok, PROMPTS[1])
    for n in (1, 2, 5):
        seq = run(engine, ids, greedy(n))
        assert len(seq.output) == n
        assert seq.finish == FinishReason.LENGTH


def test_context_limit_gives_length(shard, tok, tiny_spec):
    ids = ids_of(tok, PROMPTS[1])
    small = Engine(shard, tiny_spec.placeholder_ids, eos_ids=[], max_context=len(ids) + 5)
    seq = run(small, ids, greedy(100))
    assert seq.max_tokens == 5
    assert len(seq.output) == 5
    assert seq.finish == FinishReason.LENGTH
    assert seq.prompt_len + len(seq.output) == small.max_context


def _prompt_with_a_new_token(engine, tok) -> tuple[list[int], list[int], int]:
    """A prompt whose greedy output has a token that first appears at index >= 1 (a random model may repeat one
    token forever), the output, and that index."""
    for text in PROMPTS + [MEDIA_PROMPT.replace("<|image|>", "").replace("<|audio|>", "")]:
        ids = ids_of(tok, text)
        ref = run(engine, ids, greedy(12)).output
        k = next((k for k in range(1, len(ref)) if ref[k] not in ref[:k]), None)
        if k is not None:
            return ids, ref, k
    raise AssertionError("no prompt gives a usable stop token")


def test_stop_token_id_gives_stop(engine, tok):
    ids, ref, k = _prompt_with_a_new_token(engine, tok)
    seq = run(engine, ids, greedy(12, stop_token_ids=[ref[k]]))
    assert seq.finish == FinishReason.STOP
    assert seq.output == ref[: k + 1]  # the stop token is produced, then nothing more


def test_eos_stops_unless_ignored(engine, shard, tok, tiny_spec):
    ids, ref, k = _prompt_with_a_new_token(engine, tok)
    with_eos = Engine(shard, tiny_spec.placeholder_ids, eos_ids=[ref[k]], max_context=tiny_spec.max_context)
    stopped = run(with_eos, ids, SamplingParams(max_tokens=12, temperature=0.0))
    assert stopped.finish == FinishReason.STOP and stopped.output == ref[: k + 1]
    ignored = run(with_eos, ids, greedy(12))
    assert ignored.finish == FinishReason.LENGTH and ignored.output == ref


def test_batch_of_sequences_steps_independently(engine, tok):
    prompts = [ids_of(tok, p) for p in PROMPTS]
    alone = [run(engine, ids, greedy(6 + i)).output for i, ids in enumerate(prompts)]
    seqs = []
    for i, ids in enumerate(prompts):
        seq = engine.new_sequence(f"r{i}", len(ids), greedy(6 + i))
        engine.prefill(seq, ids, [])
        seqs.append(seq)
    for _ in range(20):  # more steps than any needs: finished sequences must not grow
        engine.step(seqs)
    assert [s.output for s in seqs] == alone
    assert all(s.finish == FinishReason.LENGTH for s in seqs)
    assert [len(s.output) for s in seqs] == [6, 7, 8]


def test_seeded_sampling_is_reproducible(engine, tok):
    ids = ids_of(tok, PROMPTS[0])
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    a = run(engine, ids, params).output
    b = run(engine, ids, params).output
    c = run(engine, ids, SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)).output
    assert a == b
    assert a != c


def test_pending_counts_new_tokens(engine, tok):
    ids = ids_of(tok, PROMPTS[2])
    seq = engine.new_sequence("r", len(ids), greedy(5))
    engine.prefill(seq, ids, [])
    assert seq.pending == 1 and len(seq.output) == 1
    engine.step([seq])
    engine.step([seq])
    assert seq.pending == 3 and len(seq.output) == 3


def _started(engine, tok, texts, n=8, media=None):
    seqs = []
    for i, text in enumerate(texts):
        ids = ids_of(tok, text)
        seq = engine.new_sequence(f"r{i}", len(ids), greedy(n))
        engine.prefill(seq, ids, list(media[i]) if media and media[i] else [])
        seqs.append(seq)
    return seqs


def test_a_sequence_whose_forward_fails_fails_alone(engine, tok):
    """Fault injected on one sequence's rows (its block table points past the pool): the batched forward raises, the
    step is re-run one sequence at a time, and only that one fails; the others' tokens are exactly those of running
    alone."""
    alone = [run(engine, ids_of(tok, p), greedy(8)).output for p in PROMPTS]
    seqs = _started(engine, tok, PROMPTS)
    bad = seqs[1]
    own = list(bad.blocks)
    bad.blocks[:] = [engine.pool.num_blocks + 7] * len(own)  # every slot of it is out of range
    for _ in range(10):
        engine.step(seqs)
    assert bad.finish == FinishReason.ERROR and "forward" in bad.error and len(bad.output) == 1
    for i in (0, 2):
        assert seqs[i].finish == FinishReason.LENGTH and seqs[i].output == alone[i]
    engine.pool.release(own)  # the injected table was dropped with the sequence; its real blocks go back


def test_non_finite_logits_fail_their_sequence_alone(engine, tok):
    ids = ids_of(tok, MEDIA_PROMPT)
    poisoned = [(mod, torch.full_like(rows, float("inf")) if k == 1 else rows)
                for k, (mod, rows) in enumerate(media_rows())]
    alone = run(engine, ids_of(tok, PROMPTS[0]), greedy(6)).output
    good = engine.new_sequence("good", len(ids_of(tok, PROMPTS[0])), greedy(6))
    bad = engine.new_sequence("bad", len(ids), greedy(6))
    engine.step([], [(good, engine.start(good, ids_of(tok, PROMPTS[0]), [])), (bad, engine.start(bad, ids, poisoned))])
    while good.finish is None:
        engine.step([good, bad])
    assert bad.finish == FinishReason.ERROR and "non-finite" in bad.error and bad.output == []
    assert good.finish == FinishReason.LENGTH and good.output == alone


def test_a_non_finite_request_never_reaches_the_others_of_its_step_nor_the_later_owners_of_its_blocks(tiny_spec):
    """Its K/V stayed NaN in its blocks: a shorter request in its step read them through its table's padding
    columns (block 0), and a later one through the stale slots of a reused block, each masked but 0 x NaN = NaN;
    both failed "non-finite" (an outside auditor's)."""
    def fresh():
        model = load_shard(tiny_spec.path, tiny_spec.config["text_config"])[0]
        model.allocate_pool(64)
        return Engine(model, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context,
                      max_batched_tokens=16)

    def alone(ids):
        e = fresh()
        return run(e, ids, greedy(8)).output

    image = tiny_spec.placeholder_ids["image"]
    short, long = [138, 40, 231, 77, 294], [(17 * i) % 400 + 10 for i in range(40)]
    nan_ids = [5] * 6 + [image] * 4 + [6] * 30
    nan_rows = [("image", torch.full((4, tiny_spec.config["text_config"]["hidden_size"]), float("nan")))]
    e = fresh()
    bad = e.new_sequence("bad", len(nan_ids), greedy(8))
    e.start(bad, nan_ids, nan_rows, keys=["k"])
    e.step([bad])  # its first chunk: it holds block 0
    b = e.new_sequence("b", len(short), greedy(8))
    e.start(b, short, [])
    while bad.finish is None or b.finish is None:
        e.step([s for s in (bad, b) if s.finish is None])
    assert bad.finish == FinishReason.ERROR and "non-finite" in bad.error
    assert b.finish == FinishReason.LENGTH and b.output == alone(short), b.error
    e.release(bad)
    later_long = e.new_sequence("c", len(long), greedy(8))
    e.start(later_long, long, [])
    e.step([later_long])  # takes the failed request's blocks back
    later = e.new_sequence("d", len(short), greedy(8))
    e.start(later, short, [])
    while later.finish is None or later_long.finish is None:
        e.step([s for s in (later, later_long) if s.finish is None])
    assert later.output == alone(short) and later_long.output == alone(long), (later.error, later_long.error)


@pytest.mark.parametrize("params,match", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=4, temperature=float("nan")), "temperature"),
    (SamplingParams(max_tokens=4, temperature=-1.0), "temperature"),
    (SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
    (SamplingParams(max_tokens=4, top_p=1.5), "top_p"),
    (SamplingParams(max_tokens=4, seed=2**64), "64 bits"),
])
def test_sampling_parameters_out_of_range_are_a_plan_error(engine, params, match):
    with pytest.raises(PlanError, match=match):
        engine.new_sequence("r", 3, params)


def test_a_prompt_that_fills_the_context_is_a_plan_error(engine, tiny_spec):
    """The gateway checks the length; a plan may come from anywhere: a longer prompt was computed past the model's
    positions and answered one token (an outside auditor's)."""
    for n in (tiny_spec.max_context, tiny_spec.max_context + 300):
        with pytest.raises(PlanError, match="no room in the model's context"):
            engine.new_sequence("long", n, greedy(4))
    assert engine.new_sequence("fits", tiny_spec.max_context - 1, greedy(4)).max_tokens == 1


@pytest.mark.parametrize("ids", [[], [1, -1, 2], [1, 10**6]])
def test_token_ids_outside_the_vocabulary_are_a_plan_error(engine, ids):
    seq = engine.new_sequence("r", max(len(ids), 1), greedy(2))
    with pytest.raises(PlanError, match="vocabulary"):
        engine.start(seq, ids, [])
    assert seq.blocks == [] and seq.prompt_embeds is None  # nothing allocated


def test_extreme_sampling_parameters_run(engine, tok):
    ids = ids_of(tok, PROMPTS[0])
    greedy_out = run(engine, ids, greedy(6)).output
    for params in (SamplingParams(max_tokens=6, temperature=1e-30, seed=2**64 - 1, ignore_eos=True),
                   SamplingParams(max_tokens=6, temperature=2.0, top_p=1e-300, seed=-(2**63), ignore_eos=True)):
        seq = run(engine, ids, params)
        assert seq.finish == FinishReason.LENGTH and seq.output == greedy_out  # both are greedy in effect


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_a_continuation_plan_goes_on_exactly_where_the_original_was_cut(engine, tok, temperature, cut):
    """Request migration at the engine: a sequence whose prompt is the original prompt + the first ``cut`` tokens,
    ``resumed=cut``, ``max_tokens`` what is left, produces the original's remaining tokens (greedy, and sampled: the
    sampler resumes at draw ``cut``) and reports usage as the original would."""
    ids = ids_of(tok, "the continuation of a story")
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=4242, ignore_eos=True)
    whole = run(engine, ids, params)
    rest = SamplingParams(max_tokens=12 - cut, temperature=temperature, seed=4242, ignore_eos=True)
    seq = engine.new_sequence("r", len(ids) + cut, rest, resumed=cut)
    engine.prefill(seq, ids + whole.output[:cut], [])
    while seq.finish is None:
        engine.step([seq])
    assert seq.output == whole.output[cut:]
    assert seq.finish == whole.finish == FinishReason.LENGTH
    assert (seq.prompt_tokens, seq.completion_tokens) == (len(ids), 12)


def test_a_resumed_count_outside_the_prompt_is_a_plan_error(engine):
    with pytest.raises(PlanError, match="resumed"):
        engine.new_sequence("r", 4, greedy(), resumed=4)


def test_bf16_on_cpu_runs_the_same_code_and_agrees_with_fp32_where_the_margin_is_clear(tiny_spec, tok):
    """--dtype bfloat16 (what a GPU runs by default) through the same loader, cache and engine on the CPU. Along
    fp32's greedy path, wherever fp32's top-2 logit margin is more than twice bf16's largest logit deviation at that
    step, bf16 picks the same token, and its own greedy run (with its cache) equals fp32's up to the first step
    that is not clear (past a near-tie the two may fairly part ways)."""
    from backbone.engine import load_engine

    engines = {dt: load_engine(tiny_spec, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    assert engines[torch.bfloat16].pool.k.dtype == torch.bfloat16

    def last_logits(engine, ids):  # a forward without reuse over the whole sequence so far
        seq = engine.new_sequence("m", len(ids), greedy(1))
        hidden = engine.prompt_hidden(seq, ids, [])
        engine.release(seq)
        return engine.model.logits(hidden[-1:])[0]

    compared = 0
    for text in ["the cat sat on", "a story about", "hello there", "one two three four", "what is the", "in the"]:
        ids = ids_of(tok, text)
        ref = run(engines[torch.float32], ids, greedy(8)).output
        got = run(engines[torch.bfloat16], ids, greedy(8)).output
        for k in range(8):
            l32 = last_logits(engines[torch.float32], ids + ref[:k])
            l16 = last_logits(engines[torch.bfloat16], ids + ref[:k])
            top2 = l32.topk(2).values
            if float(top2[0] - top2[1]) <= 2 * float((l16 - l32).abs().max()):
                break
            assert int(l16.argmax()) == int(l32.argmax()) == ref[k], (text, k)
            assert got[k] == ref[k], (text, k)
            compared += 1
    assert compared >= 5, f"only {compared} clear-margin steps: the check would prove nothing"


def test_placement_flags_resolve_or_say_what_is_wrong():
    from backbone.worker import resolve_placement

    if not torch.cuda.is_available():
        assert resolve_placement("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_placement("cuda:0", "auto")
    assert resolve_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="--device"):
        resolve_placement("tpu", "auto")
    with pytest.raises(ValueError, match="--dtype"):
        resolve_placement("cpu", "int8")


def test_fused_projections_compute_what_the_separate_ones_do():
    """q/k/v fuse into one projection (a bias where only some parts had one is zero for the others) and gate/up
    into another: the split outputs are the separate matmuls' (up to float rounding)."""
    from backbone.model import fuse_layer

    g = torch.Generator().manual_seed(3)
    w = {f"self_attn.{p}_proj.weight": torch.randn(n, 32, generator=g) for p, n in (("q", 32), ("k", 16), ("v", 16))}
    w |= {"self_attn.q_proj.bias": torch.randn(32, generator=g), "mlp.gate_proj.weight": torch.randn(48, 32,
          generator=g), "mlp.up_proj.weight": torch.randn(48, 32, generator=g), "mlp.down_proj.weight": torch.zeros(1)}
    separate = dict(w)
    fused = fuse_layer(w)
    assert set(fused) == {"qkv.weight", "qkv.bias", "gate_up.weight", "mlp.down_proj.weight"}
    x = torch.randn(5, 32, generator=g)
    q, k, v = torch.nn.functional.linear(x, fused["qkv.weight"], fused["qkv.bias"]).split([32, 16, 16], -1)
    torch.testing.assert_close(q, torch.nn.functional.linear(x, separate["self_attn.q_proj.weight"],
                                                             separate["self_attn.q_proj.bias"]))
    torch.testing.assert_close(k, x @ separate["self_attn.k_proj.weight"].T)
    torch.testing.assert_close(v, x @ separate["self_attn.v_proj.weight"].T)
    gate, up = torch.nn.functional.linear(x, fused["gate_up.weight"]).chunk(2, -1)
    torch.testing.assert_close(gate, x @ separate["mlp.gate_proj.weight"].T)
    torch.testing.assert_close(up, x @ separate["mlp.up_proj.weight"].T)


def test_a_shard_with_fused_layers_gives_the_logits_of_the_unfused_one(tiny_spec, tok):
    """What a GPU shard runs (fused q/k/v and gate/up; CPUs keep the checkpoint's tensors), here on the CPU."""
    from backbone.engine import load_engine
    from backbone.model import fuse_layer

    plain, fused = load_engine(tiny_spec), load_engine(tiny_spec)
    fused.model.layers = [fuse_layer(dict(w)) for w in fused.model.layers]
    assert "qkv.weight" in fused.model.layers[0] and "qkv.weight" not in plain.model.layers[0]
    ids = ids_of(tok, PROMPTS[0])
    a = plain.model.logits(plain.prompt_hidden(plain.new_sequence("a", len(ids), greedy(1)), ids, []))
    b = fused.model.logits(fused.prompt_hidden(fused.new_sequence("b", len(ids), greedy(1)), ids, []))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_pool_smaller_than_the_context_is_said_at_start(caplog):
    """Said by a single-shard backbone's load and by a pipeline's shard 0 (which had no such line)."""
    import logging
    from types import SimpleNamespace

    from backbone.engine import warn_small_pool

    def model(blocks):
        return SimpleNamespace(pool=SimpleNamespace(num_blocks=blocks, block_size=16))

    with caplog.at_level(logging.WARNING, logger="backbone.engine"):
        warn_small_pool(model(64), 1024)  # 1024 tokens: one full context fits
        assert not caplog.records
        warn_small_pool(model(38), 1024)
    assert [r.pool_tokens for r in caplog.records] == [608]
