"""Tiny Hugging Face checkpoints built offline: ``LlavaForConditionalGeneration`` and
``Qwen2AudioForConditionalGeneration`` from configs with seeded random weights, saved with transformers' own
``save_pretrained`` (model, processor, tokenizer, chat template), exactly the files a hub checkpoint has. No network.

The tokenizer is a byte-level BPE trained on the demo's word list (``tokenizers``), with each family's special tokens
(LLaVA: ``<s>`` ``</s>`` ``<image>``, a post-processor that prepends ``<s>`` as Llama's does; Qwen2-Audio: ChatML's
plus ``<|AUDIO|>`` ``<|audio_bos|>`` ``<|audio_eos|>``) and a chat template modeled on the real one (llava-1.5-hf's;
Qwen2-Audio-7B-Instruct's).

Weights are re-drawn after construction (fan-in scaled, a peaky lm_head, random biases and norm gains) so that the
untrained model's greedy choices are clear-cut (top-1 / top-2 logit gaps mostly >> 1e-2) and every tensor matters.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import torch

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Two configs per family: sizes, grouped-query ratios, layer counts, rope types (default, llama3, linear), image
# sizes / mel bins and windows, feature layers and select strategies all differ. "legacy_files" writes the processor
# config the way hub checkpoints keep it (flat preprocessor_config.json + chat_template.json) instead of transformers
# 5's processor_config.json.
CONFIGS: dict[str, dict] = {
    "llava-a": dict(
        family="llava", seed=11, vocab=420,
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=2),
        vision_feature_layer=-2, strategy="default", legacy_files=False,
    ),
    "llava-b": dict(
        family="llava", seed=12, vocab=460,
        text=dict(model_type="llama", hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=640,
                  # Llama 3's rope scaling, with an original context short enough that all three bands occur
                  rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
        vision=dict(image_size=28, patch_size=7, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=3),
        vision_feature_layer=[-2, -1], strategy="full", legacy_files=True,
    ),
    "qwen2-audio-a": dict(
        family="qwen2_audio", seed=21, vocab=420,
        text=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=80,
                   max_source_positions=100),  # a 2 s window
        legacy_files=False,
    ),
    "qwen2-audio-b": dict(
        family="qwen2_audio", seed=22, vocab=460,
        text=dict(model_type="qwen2", hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=640,
                  rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
        audio=dict(d_model=48, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=96, num_mel_bins=128,
                   max_source_positions=150),  # a 3 s window
        legacy_files=True,
    ),
}

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def build_tokenizer(family: str, vocab_size: int, seed: int):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from models.demo import _corpus

    specials = LLAVA_SPECIALS if family == "llava" else QWEN_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full byte alphabet: every token is printable ASCII, so two different greedy outputs almost never decode
    # to the same text (random byte tokens would all decode to U+FFFD) and the e2e tests can compare text.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(seed, lines=1500), trainer)
    if family == "llava":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                              "audio_eos_token": "<|audio_eos|>"})


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with unit-scale activations: W ~ N(0, 1/fan_in), embeddings ~ N(0, 1), lm_head 6x peakier,
    biases ~ N(0, 0.05), norm gains ~ 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name or "layrnorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_((0.5 if "class_embedding" in name else 0.05) * torch.randn(p.shape, generator=g))
            elif "embed" in name and "patch" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                scale = 6.0 if name.endswith("lm_head.weight") else 1.0
                p.copy_(scale / math.sqrt(fan_in) * torch.randn(p.shape, generator=g))


def write_checkpoint(out: Path, name: str) -> Path:
    """Write CONFIGS[name] to ``out`` (created) with transformers' save_pretrained; returns ``out``."""
    spec = CONFIGS[name]
    family, seed = spec["family"], spec["seed"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    tok = build_tokenizer(family, spec["vocab"], seed)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    text = dict(spec["text"], vocab_size=len(tok), eos_token_id=eos, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    if family == "llava":
        from transformers import (
            CLIPImageProcessor,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        vision = dict(spec["vision"], model_type="clip_vision_model", projection_dim=spec["vision"]["hidden_size"])
        config = LlavaConfig(vision_config=vision, text_config=text,
                             image_token_id=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=spec["vision_feature_layer"],
                             vision_feature_select_strategy=spec["strategy"],
                             image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)
        model = LlavaForConditionalGeneration(config)
        size = vision["image_size"]
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            tokenizer=tok, patch_size=vision["patch_size"], vision_feature_select_strategy=spec["strategy"],
            num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
        section = "image_processor"
    else:
        from transformers import (
            Qwen2AudioConfig,
            Qwen2AudioForConditionalGeneration,
            Qwen2AudioProcessor,
            WhisperFeatureExtractor,
        )

        audio = dict(spec["audio"], model_type="qwen2_audio_encoder")
        config = Qwen2AudioConfig(audio_config=audio, text_config=text,
                                  audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
        model = Qwen2AudioForConditionalGeneration(config)
        window_s = audio["max_source_positions"] * 2 * 160 // 16000
        extractor = WhisperFeatureExtractor(feature_size=audio["num_mel_bins"], sampling_rate=16000, hop_length=160,
                                            chunk_length=window_s, n_fft=400, padding_value=0.0,
                                            return_attention_mask=True)
        processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tok,
                                        chat_template=QWEN2_AUDIO_TEMPLATE)
        section = "feature_extractor"
    _redraw(model, seed + 1)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    if spec["legacy_files"]:
        _to_legacy_layout(out, section)
    return out


def _to_legacy_layout(out: Path, section: str) -> None:
    """Rewrite the processor files as hub checkpoints keep them: the sub-processor's kwargs in a flat
    preprocessor_config.json, the processor's own kwargs in processor_config.json, the template in
    chat_template.json."""
    nested = json.loads((out / "processor_config.json").read_text())
    flat = dict(nested.pop(section), processor_class=nested["processor_class"])
    (out / "preprocessor_config.json").write_text(json.dumps(flat, indent=2))
    (out / "processor_config.json").write_text(json.dumps(nested, indent=2))
    template = out / "chat_template.jinja"
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()


class Checkpoints:
    """Builds each named checkpoint at most once, on first use (a session fixture holds one)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.built: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.built:
            target = self.root / name
            if target.exists():
                shutil.rmtree(target)
            self.built[name] = write_checkpoint(target, name)
        return self.built[name]


# ---- the reference side: transformers' own processor and model on the same checkpoint ---------------------------

def family_of(name: str) -> str:
    return CONFIGS[name]["family"]


def modality_of(name: str) -> str:
    return "image" if family_of(name) == "llava" else "audio"


def load_reference(path: Path):
    """(model, processor): transformers' own classes from the checkpoint, fp32, eval, EOS off (our requests set
    ignore_eos, so both sides produce exactly max_tokens tokens)."""
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        Qwen2AudioForConditionalGeneration,
    )

    config = json.loads((Path(path) / "config.json").read_text())
    cls = LlavaForConditionalGeneration if config["model_type"] == "llava" else Qwen2AudioForConditionalGeneration
    model = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoProcessor.from_pretrained(str(path))


def decode_media(modality: str, data: bytes):
    """The client's bytes as a transformers user hands them to the processor: a Pillow image, or the WAV's float32
    samples (mono, at the extractor's 16 kHz; the test clips are written that way)."""
    import io

    if modality == "image":
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    return wave


def conversation(modality: str, media: list[bytes], question: str, system: str | None = None,
                 history: list[tuple[str, str]] = ()) -> tuple[list[dict], list[dict]]:
    """The same conversation twice: OpenAI messages (what a client sends us) and Hugging Face messages (what the
    reference processor's chat template gets). Media go first in the last user turn, then the question."""
    from tests.media import b64, data_url

    def oai_part(data: bytes) -> dict:
        if modality == "image":
            return {"type": "image_url", "image_url": {"url": data_url(data)}}
        return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}

    hf_part = {"type": "image"} if modality == "image" else {"type": "audio", "audio_url": "clip.wav"}
    oai, hf = [], []
    if system is not None:
        oai.append({"role": "system", "content": [{"type": "text", "text": system}]})
        hf.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for user, assistant in history:
        for role, text in (("user", user), ("assistant", assistant)):
            oai.append({"role": role, "content": [{"type": "text", "text": text}]})
            hf.append({"role": role, "content": [{"type": "text", "text": text}]})
    oai.append({"role": "user", "content": [*(oai_part(m) for m in media), {"type": "text", "text": question}]})
    hf.append({"role": "user", "content": [*(dict(hf_part) for _ in media), {"type": "text", "text": question}]})
    return oai, hf


def reference_inputs(processor, modality: str, hf_messages: list[dict], media: list[bytes]):
    """``processor(text=apply_chat_template(...), images=/audio=...)``: the reference's input_ids and features."""
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    decoded = [decode_media(modality, m) for m in media]
    if modality == "image":
        return processor(text=text, images=decoded or None, return_tensors="pt")
    return processor(text=text, audio=decoded or None, sampling_rate=16000, return_tensors="pt")


@torch.no_grad()
def reference_generate(model, inputs, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy ``model.generate`` (do_sample=False): (new token ids, the top-1 / top-2 logit gap of each step). A gap
    below ~1e-2 means float noise (batching, summation order) could flip a token: pick another input."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return new, gaps
