"""Hugging Face LLaVA and Qwen2-Audio checkpoints served through the same code paths as the demo, checked against
transformers' own processor and model on the same tiny checkpoint (tests/hf_checkpoints.py: two configs per family
that differ in sizes, GQA ratio, layers, image size / mel bins / window, feature layer and select strategy, and in
the processor file layout).

* ModelSpec dispatches on model_type: modalities, placeholder ids, processor kwargs, eos ids, filled-in config.
* Encoders: our modules (models/llava.py, models/qwen2_audio.py, loaded through encoders/loader.py from their own
  safetensors prefixes only) equal the reference's media features: LLaVA's ``get_image_features`` and the rows
  LlavaModel / Qwen2AudioModel splice into ``inputs_embeds`` (captured at the language model's input), atol 1e-5
  (measured: 0.0 on the CPU in fp32; batched vs alone ~1e-6).
* Preprocessing equals the processor's (bitwise) and the token counts equal the processor's placeholder counts.
* The gateway's prompt ids (PromptBuilder + expand_placeholders) equal the processor's input_ids.
* The whole path in process (preprocess -> torch runtime -> expand -> backbone engine) equals ``model.generate``
  greedy, token for token; and a modality the family lacks is refused (gateway 400 naming the part, loaders).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoders.loader import load_preprocessor, load_runtime, load_torch_module
from gateway.errors import InvalidRequest
from gateway.prompt import PromptBuilder, expand_placeholders
from gateway.schemas import parse_chat_request
from models.spec import ModelError, ModelSpec
from tests.hf_checkpoints import (
    CONFIGS,
    conversation,
    decode_media,
    family_of,
    load_reference,
    modality_of,
    reference_generate,
    reference_inputs,
)
from tests.media import b64, data_url, png_bytes, wav_bytes

NAMES = list(CONFIGS)
ATOL = 1e-5
MIN_GAP = 1e-2


@pytest.fixture(scope="module", params=NAMES)
def case(request, hf_checkpoint):
    """(name, spec, tokenizer, reference model, reference processor) for one tiny checkpoint."""
    path = hf_checkpoint(request.param)
    spec = ModelSpec.from_dir(path)
    model, processor = load_reference(path)
    return request.param, spec, spec.load_tokenizer(), model, processor


def media_for(modality: str, seed: int, count: int = 2) -> list[bytes]:
    """Images of different sizes and aspect ratios; clips of different lengths, the last one longer than the
    window of either config (3 s), so it is cut to the window."""
    if modality == "image":
        sizes = [(40, 30), (64, 48), (23, 57), (90, 90)]
        return [png_bytes(*sizes[(seed + i) % 4], seed=seed * 10 + i) for i in range(count)]
    seconds = [0.35, 1.3, 0.8, 3.7]
    return [wav_bytes(seconds[(seed + i) % 4], seed=seed * 10 + i) for i in range(count)]


def request(spec, messages, **extra):
    return parse_chat_request(json.dumps({"model": spec.name, "messages": messages, **extra}).encode())


# ---- ModelSpec ---------------------------------------------------------------------------------------------------

def test_spec_dispatches_on_model_type(case):
    name, spec, tok, model, processor = case
    family, modality = family_of(name), modality_of(name)
    assert spec.family.model_type == family and spec.modalities == (modality,)
    token = "<image>" if family == "llava" else "<|AUDIO|>"
    assert spec.placeholder_ids == {modality: tok.convert_tokens_to_ids(token)}
    assert spec.placeholder_ids[modality] == (model.config.image_token_id if family == "llava"
                                              else model.config.audio_token_id)
    assert spec.eos_token_ids == [tok.eos_token_id]
    assert set(spec.preprocess) == {modality}
    text = spec.config["text_config"]  # defaults filled in, as transformers reads it
    assert text["hidden_size"] == model.config.text_config.hidden_size
    assert text["num_key_value_heads"] == model.config.text_config.num_key_value_heads
    assert spec.max_context == model.config.text_config.max_position_embeddings
    # The processor's kwargs, defaults included, whichever file layout the checkpoint uses.
    if family == "llava":
        ip = processor.image_processor
        assert spec.preprocess["image"]["crop_size"] == dict(ip.crop_size)
        assert spec.preprocess["image"]["do_center_crop"] is True
    else:
        fe = processor.feature_extractor
        assert spec.preprocess["audio"]["feature_size"] == fe.feature_size
        assert spec.preprocess["audio"]["nb_max_frames"] == fe.nb_max_frames


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ModelError, match="whisper.*supported: tributary_trimodal, llava, qwen2_audio"):
        ModelSpec.from_dir(tmp_path)


def test_loaders_refuse_a_modality_the_family_lacks(case):
    name, spec, *_ = case
    other = "audio" if modality_of(name) == "image" else "image"
    with pytest.raises(ModelError, match=f"no {other} input"):
        load_preprocessor(spec, other)
    with pytest.raises(ModelError, match=f"no {other} input"):
        load_torch_module(spec, other)


def test_encoder_reads_only_its_prefixes(case, monkeypatch):
    import models.checkpoint
    import models.llava
    import models.qwen2_audio

    name, spec, *_ = case
    seen = []
    real = models.checkpoint.read_tensors

    def spy(model_dir, prefix, dtype=None):
        seen.append(prefix)
        return real(model_dir, prefix, dtype)

    monkeypatch.setattr(models.llava, "read_tensors", spy)
    monkeypatch.setattr(models.qwen2_audio, "read_tensors", spy)
    load_torch_module(spec, modality_of(name))
    tower = "vision_tower." if modality_of(name) == "image" else "audio_tower."
    assert sorted(seen) == sorted([tower, "multi_modal_projector."])


# ---- encoders == the reference's media features ---------------------------------------------------------------

def _spliced_rows(model, inputs, placeholder: int) -> torch.Tensor:
    """The rows the reference model puts at its placeholder positions: its language model's inputs_embeds there."""
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return captured["embeds"][inputs["input_ids"] == placeholder]


@pytest.mark.parametrize("seed", [0, 1])
def test_encoder_equals_reference_features(case, seed):
    name, spec, _, model, processor = case
    modality = modality_of(name)
    media = media_for(modality, seed, count=3)
    pre = load_preprocessor(spec, modality)
    prepared = [pre(m) for m in media]
    module = load_torch_module(spec, modality)
    batch = torch.stack([p.data for p in prepared])
    _, hf = conversation(modality, media, "describe")
    inputs = reference_inputs(processor, modality, hf, media)
    with torch.no_grad():
        if modality == "image":
            torch.testing.assert_close(batch, inputs["pixel_values"], atol=0, rtol=0)  # bitwise
            ours = module(batch)  # [B, N, H]
            ref = torch.stack(list(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
            torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
        else:
            # Our features (models/audio.py) are the extractor's to float rounding, not bitwise (numpy's FFT, and
            # fixed blocks so that Realtime can stream them: test_audio_features.py); the module is held to the
            # reference on the reference's own features.
            torch.testing.assert_close(batch, inputs["input_features"], atol=2e-4, rtol=0)
            lengths = torch.tensor([p.length for p in prepared])
            assert lengths.tolist() == inputs["feature_attention_mask"].sum(-1).tolist()
            ours = module(inputs["input_features"], lengths)  # [B, window / 4, H]; rows past each count: padding
    # Token counts are the processor's placeholder counts; the kept rows are exactly what the reference splices in.
    placeholder = spec.placeholder_ids[modality]
    counts = [p.num_tokens for p in prepared]
    assert sum(counts) == int((inputs["input_ids"] == placeholder).sum())
    kept = torch.cat([ours[i, :n] for i, n in enumerate(counts)])
    torch.testing.assert_close(kept, _spliced_rows(model, inputs, placeholder), atol=ATOL, rtol=0)


def test_the_vision_tower_runs_no_layer_after_the_one_it_reads(case):
    """LLaVA reads hidden_states[vision_feature_layer] (-2 by default: the last layer's output was discarded): the
    layers after the deepest one read are dropped at load, and the features stay the reference's
    (test_encoder_equals_reference_features)."""
    name, spec, *_ = case
    if modality_of(name) != "image":
        pytest.skip("an audio checkpoint")
    module = load_torch_module(spec, "image")
    total = spec.config["vision_config"]["num_hidden_layers"]
    read = spec.config.get("vision_feature_layer", -2)
    read = [read] if isinstance(read, int) else read
    deepest = max(i if i >= 0 else total + 1 + i for i in read)
    tower = getattr(module.vision_tower, "vision_model", module.vision_tower)  # transformers 5 flattened it
    assert len(tower.encoder.layers) == deepest
    if read == [-2]:
        assert deepest == total - 1  # LLaVA-1.5's default: one layer fewer


def test_qwen2_audio_rows_depend_on_the_real_length_only(hf_checkpoint):
    """Batched clips of different lengths give each clip's rows alone; the padding mask matters (without it the
    rows change), so the lengths must reach the encoder."""
    spec = ModelSpec.from_dir(hf_checkpoint("qwen2-audio-a"))
    pre, module = load_preprocessor(spec, "audio"), load_torch_module(spec, "audio")
    prepared = [pre(wav_bytes(s, seed=i)) for i, s in enumerate([0.3, 1.1, 2.5])]
    batch, lengths = torch.stack([p.data for p in prepared]), torch.tensor([p.length for p in prepared])
    with torch.no_grad():
        together = module(batch, lengths)
        for i, p in enumerate(prepared):
            alone = module(batch[i : i + 1], lengths[i : i + 1])[0, : p.num_tokens]
            torch.testing.assert_close(together[i, : p.num_tokens], alone, atol=ATOL, rtol=0)
        unmasked = module(batch[:1], torch.tensor([batch.shape[-1]]))[0, : prepared[0].num_tokens]
    assert (unmasked - together[0, : prepared[0].num_tokens]).abs().max() > 1e-2


# ---- prompts: the gateway's ids == the processor's input_ids ----------------------------------------------------

PROMPT_SHAPES = [
    dict(count=1, question="What is this?"),
    dict(count=2, question="Compare them, briefly.", system="You are terse."),
    dict(count=1, question="And now?", history=[("hello there", "hi, how can I help")]),
    dict(count=0, question="just text", system="be kind"),
]


@pytest.mark.parametrize("shape", range(len(PROMPT_SHAPES)))
def test_prompt_ids_equal_the_processors(case, shape):
    name, spec, tok, _, processor = case
    modality = modality_of(name)
    kw = dict(PROMPT_SHAPES[shape])
    media = media_for(modality, shape, kw.pop("count"))
    oai, hf = conversation(modality, media, **kw)
    prompt = PromptBuilder(spec, tok, max_media_bytes=1 << 24).build(request(spec, oai))
    pre = load_preprocessor(spec, modality)
    ids = expand_placeholders(prompt.token_ids, spec.placeholder_ids, [pre(m).num_tokens for m in media])
    assert ids == reference_inputs(processor, modality, hf, media)["input_ids"][0].tolist()


def test_unsupported_modality_is_a_400_naming_the_part(case):
    name, spec, tok, *_ = case
    wrong = ({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(0.2)), "format": "wav"}}
             if modality_of(name) == "image" else {"type": "image_url", "image_url": {"url": data_url(png_bytes())}})
    builder = PromptBuilder(spec, tok, max_media_bytes=1 << 24)
    with pytest.raises(InvalidRequest) as info:
        builder.build(request(spec, [{"role": "user", "content": [{"type": "text", "text": "hi"}, wrong]}]))
    assert info.value.status == 400 and info.value.param == "messages.0.content.1"
    assert info.value.code == "unsupported_modality"
    assert ("audio" if modality_of(name) == "image" else "image") in info.value.message


# ---- the whole path in process == model.generate -----------------------------------------------------------------

def test_in_process_pipeline_equals_generate(case):
    """The tiers' code in one process: PromptBuilder, the worker's preprocessing and torch runtime (lengths passed
    as the worker passes them), expand_placeholders, the backbone engine (greedy, ignore_eos). Inputs whose greedy
    top-1/top-2 gap is under 1e-2 in the reference run are skipped (float noise could flip them)."""
    from backbone.engine import load_engine
    from router.messages import SamplingParams

    name, spec, tok, model, processor = case
    modality = modality_of(name)
    pre, runtime, engine = load_preprocessor(spec, modality), load_runtime(spec, modality), load_engine(spec)
    builder = PromptBuilder(spec, tok, max_media_bytes=1 << 24)
    checked = 0
    for seed in range(8):
        media = media_for(modality, seed, count=1 + seed % 2)
        oai, hf = conversation(modality, media, "what is it? " * (1 + seed % 3))
        inputs = reference_inputs(processor, modality, hf, media)
        want, gaps = reference_generate(model, inputs, 10)
        if min(gaps) < MIN_GAP:
            continue
        prompt = builder.build(request(spec, oai))
        prepared = [pre(m) for m in media]
        rows = []
        for p in prepared:
            out = runtime.run(p.data[None]) if p.length is None else runtime.run(p.data[None], torch.tensor([p.length]))
            rows.append((modality, out[0, : p.num_tokens]))
        ids = expand_placeholders(prompt.token_ids, spec.placeholder_ids, [p.num_tokens for p in prepared])
        assert ids == inputs["input_ids"][0].tolist()
        seq = engine.new_sequence(f"r{seed}", len(ids), SamplingParams(max_tokens=10, temperature=0.0,
                                                                      ignore_eos=True))
        engine.prefill(seq, ids, rows)
        while seq.finish is None:
            engine.step([seq])
        engine.release(seq)
        assert seq.output == want, (seed, tok.decode(seq.output), tok.decode(want))
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "too few inputs with clear-cut greedy choices"


# ---- ONNX ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llava-a", "qwen2-audio-a"])
def test_onnx_export_matches_torch(hf_checkpoint, tmp_path, name):
    """The export path works for both families (Qwen2-Audio's graph takes (x, lengths)); parity is checked by the
    export itself (max |onnx - torch| <= PARITY_TOLERANCE on batches of 1 and 3) and again here on real inputs."""
    import shutil

    from encoders.export import PARITY_TOLERANCE, export
    from encoders.onnx_runtime import OnnxRuntime

    src = hf_checkpoint(name)
    dst = tmp_path / name
    shutil.copytree(src, dst)  # the export writes beside the checkpoint: keep the session's copy clean
    spec = ModelSpec.from_dir(dst)
    modality = modality_of(name)
    target = dst / "onnx" / modality
    target.parent.mkdir(parents=True)
    result = export(spec, modality, target, progress=lambda line: None)
    assert result.max_abs_diff <= PARITY_TOLERANCE
    pre, module, ort = load_preprocessor(spec, modality), load_torch_module(spec, modality), OnnxRuntime(result.path)
    prepared = [pre(m) for m in media_for(modality, 3, count=3)]
    batch = torch.stack([p.data for p in prepared])
    lengths = None if prepared[0].length is None else torch.tensor([p.length for p in prepared])
    with torch.no_grad():
        ref = module(batch) if lengths is None else module(batch, lengths)
    got = ort.run(batch) if lengths is None else ort.run(batch, lengths)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_decode_media_matches_our_decoding():
    """The reference side of these tests decodes the bytes as our worker does (same pixels / samples)."""
    from encoders.preprocess import decode_image

    data = png_bytes(33, 21, seed=5)
    img = decode_media("image", data)
    assert torch.equal(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1), decode_image(data))


# ---- plumbing ------------------------------------------------------------------------------------------------

def test_batch_lengths_all_or_none():
    from encoders.batching import batch_lengths
    from encoders.preprocess import Prepared

    x = torch.zeros(2, 3)
    assert batch_lengths([Prepared(x, 1), Prepared(x, 2)]) is None
    assert batch_lengths([Prepared(x, 1, 5), Prepared(x, 2, 7)]).tolist() == [5, 7]
    with pytest.raises(ValueError, match="mixes"):
        batch_lengths([Prepared(x, 1, 5), Prepared(x, 2)])


def test_family_registry_is_cheap_to_import():
    """`tributary up` reads the family (which encoder tiers to start) without importing torch or transformers."""
    import subprocess
    import sys

    code = ("import sys, models.spec as s; assert s.FAMILIES['llava'].modalities == ('image',); "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", NAMES)
def test_local_cluster_starts_only_the_family_encoders(hf_checkpoint, name):
    from models.spec import read_family
    from tributary.cluster import Cluster

    modalities = read_family(hf_checkpoint(name)).modalities
    groups = Cluster(hf_checkpoint(name), "redis://unused", modalities=modalities).groups()
    assert [g.name for g in groups if g.name.startswith("encoder:")] == [f"encoder:{modality_of(name)}"]


def test_loading_the_demo_tokenizer_warns_of_nothing(tiny_spec):
    """transformers does not know the demo's model_type: without the language model's config handed over, every
    start logged "You are using a model of type `tributary_trimodal` to instantiate a model of type ``..."."""
    import logging

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        tokenizer = tiny_spec.load_tokenizer()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert tokenizer("hello").input_ids
    assert not [m for m in seen if "model of type" in m], seen


def test_string_contents_reach_the_template_as_their_text(case):
    """Hugging Face's LLaVA template walks content parts only (``message['content'] | selectattr('type', ...)``):
    a message whose content is a plain string, the most common form, rendered as nothing, so the model never saw
    the system prompt, the user's question or its own earlier answers. A string now reaches such a template as one
    text part: the same prompt as the parts form (which equals the processor's, above)."""
    name, spec, tok, *_ = case
    builder = PromptBuilder(spec, tok, max_media_bytes=1 << 24)
    strings = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"},
               {"role": "assistant", "content": "hi, how can I help"}, {"role": "user", "content": "just text"}]
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in strings]
    ids = builder.build(request(spec, strings)).token_ids
    assert ids == builder.build(request(spec, parts)).token_ids
    assert len(ids) > len(builder.build(request(spec, [{"role": "user", "content": "."}])).token_ids) + 10


@pytest.mark.parametrize("seed", range(3))
def test_a_conversations_token_estimate_is_close_and_never_short(case, seed):
    """``PromptBuilder.message_tokens`` (what Realtime truncation counts a conversation with) summed over random
    conversations (text with control-token spellings, media, every role) against the built prompt's length: never
    less, at most a token per message more."""
    import random

    from models.media import MediaInfo, probe_audio

    name, spec, tok, *_ = case
    modality, rng = modality_of(name), random.Random(seed)
    builder = PromptBuilder(spec, tok, max_media_bytes=1 << 24, limits={"image": 99, "audio": 99})
    words = ["hello", "world", "<|im_start|>", "</s>", "<s>", "ASSISTANT:", "naïve", "你好", "123", "\n", "  "]
    for _ in range(10):
        messages, estimate = [], builder.conversation_tokens("system" if seed else "user")
        if seed:  # with a system prompt, and without (Qwen's template adds its own then)
            messages.append({"role": "system", "content": "be brief"})
            estimate += builder.message_tokens("system", ["be brief"])
        for i in range(rng.randint(1, 6)):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
            role = "assistant" if i % 2 else "user"
            media = media_for(modality, rng.randrange(4), rng.randint(0, 2)) if role == "user" else []
            infos = [(modality, MediaInfo() if modality == "image" else probe_audio(m, 30)) for m in media]
            parts = [{"type": "image_url", "image_url": {"url": data_url(m)}} if modality == "image" else
                     {"type": "input_audio", "input_audio": {"data": b64(m), "format": "wav"}} for m in media]
            messages.append({"role": role, "content": [*parts, {"type": "text", "text": text}] if parts else text})
            estimate += builder.message_tokens(role, [text], infos)
        exact = builder.build(request(spec, messages)).expected_length
        assert exact <= estimate <= exact + len(messages), (messages, estimate, exact)
