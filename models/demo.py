"""``tributary demo-model``: a small trimodal checkpoint built offline from configs with seeded random weights.

Its output is random text: it exists to exercise every tier through the same loaders real checkpoints use. Nothing is
downloaded; the tokenizer is a byte-level BPE trained on a built-in word list.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import trimodal

IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, AUDIO_TOKEN]

# A ChatML template; content may be a string or a list of parts (text / image / audio), as OpenAI messages are.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'audio' %}<|audio|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    "tiny": {
        "vocab": 512,
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024),
        "vision": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2),
        "audio": dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                      max_source_positions=100),  # a 2 s window
    },
    "small": {
        "vocab": 4096,
        "text": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=4096),
        "vision": dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=6),
        "audio": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                      max_source_positions=500),  # a 10 s window
    },
}

_WORDS = (
    "the a river flows into sea under bright sky while small birds sing near old stone bridge and people walk "
    "along quiet road with dogs cats horses in green field after rain comes light wind from mountain over forest "
    "where children play games until evening when stars appear above city lights glow warm houses stand close "
    "together by water music plays softly inside room full of books maps pictures of distant places ships sail "
    "toward islands beyond horizon morning brings fresh bread coffee news letters friends meet talk laugh share "
    "stories about journeys dreams hopes work rest seasons change trees grow tall leaves fall snow covers hills"
).split()


def _corpus(seed: int, lines: int = 6000) -> list[str]:
    rng = random.Random(seed)
    # Real words plus pronounceable made-up ones, so BPE has enough distinct pieces to reach a few thousand tokens.
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "st", "er", "an", "on"]
    words = _WORDS + ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    out = []
    for _ in range(lines):
        words_ = [rng.choice(words) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words_).capitalize() + rng.choice([".", "!", "?", ","]))
    return out


def build_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(size: str, tokenizer) -> dict:
    spec = SIZES[size]
    vocab = len(tokenizer)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    text = dict(spec["text"], vocab_size=vocab, tie_word_embeddings=False, rms_norm_eps=1e-5,
                bos_token_id=None, eos_token_id=eos, pad_token_id=eos[1])
    vision = dict(spec["vision"], num_channels=3, projection_dim=spec["vision"]["hidden_size"])
    audio = dict(spec["audio"], num_mel_bins=80, vocab_size=vocab, decoder_layers=1, pad_token_id=eos[1],
                 bos_token_id=eos[1], eos_token_id=eos[1], decoder_start_token_id=eos[1],
                 decoder_attention_heads=spec["audio"]["encoder_attention_heads"],
                 decoder_ffn_dim=spec["audio"]["encoder_ffn_dim"])
    return {
        "model_type": trimodal.MODEL_TYPE,
        "architectures": ["TributaryTrimodalForConditionalGeneration"],
        "demo_size": size,
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "vision_feature_layer": -2,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "audio_token_id": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    }


def preprocessor_config(config: dict) -> dict:
    """Per modality, the kwargs of the transformers processor the checkpoint was "trained" with:
    ``CLIPImageProcessor`` for images, ``WhisperFeatureExtractor`` for audio."""
    vc, ac = config["vision_config"], config["audio_config"]
    hop, rate = 160, 16000
    return {
        "image": {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True, "size": {"shortest_edge": vc["image_size"]}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": vc["image_size"], "width": vc["image_size"]},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],  # CLIP's
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
        "audio": {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": ac["num_mel_bins"], "sampling_rate": rate, "hop_length": hop, "n_fft": 400,
            "chunk_length": ac["max_source_positions"] * 2 * hop // rate, "padding_value": 0.0,
        },
    }


def write_demo_model(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write the checkpoint to ``out`` (created) and return it; deterministic for a given size and seed."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {sorted(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(SIZES[size]["vocab"], seed)
    config = build_config(size, tokenizer)

    state: dict[str, torch.Tensor] = {}
    # Encoder modules name their parameters by the checkpoint's prefixes (vision_tower.*, audio_projector.*, ...).
    for i, build in enumerate([trimodal.ImageEncoder, trimodal.AudioEncoder]):
        torch.manual_seed(seed + i)
        state.update(build(config).state_dict())
    torch.manual_seed(seed + 2)
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(**config["text_config"]))
    state.update({f"language_model.{k}": v for k, v in lm.state_dict().items()})

    tmp = out / "model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["text_config"]["eos_token_id"], "do_sample": False}, indent=2)
    )
    tmp.rename(out / "model.safetensors")  # last: a directory with weights is a complete checkpoint
    return out
