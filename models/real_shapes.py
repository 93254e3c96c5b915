"""Real-shape LLaVA checkpoints with seeded random weights, built offline (``tributary demo-model --size``).

They have the exact tensor shapes, dtypes and Hugging Face layout of the models they are named after, so memory,
bandwidth and kernel shapes are the real ones, and transformers loads them as it loads the hub's checkpoints
(``LlavaForConditionalGeneration.from_pretrained``) while every Tributary tier reads them through its own loaders:

* ``llava-1b``: a Llama-3.2-1B text model (2048 wide, 16 layers, GQA 32/8, head 64, vocab 128256, llama3 rope,
  tied embeddings) with LLaVA-1.5's CLIP ViT-L/14-336 tower and MLP projector: 1.5 G parameters, 3.0 GB in bf16.
* ``llava-1.5-7b``: llava-1.5-7b-hf's shapes (a Vicuna-7B / Llama-2 text model, 4096 wide, 32 layers, MHA, vocab
  32064, and the same tower): 7.1 G parameters, 14.1 GB in bf16.
* ``llava-tiny``: the same structure (tied embeddings, llama3 rope, GQA, CLIP tower) at test size: what
  ``bench/gpu.sh --cpu-smoke`` and the tests run.

Weights are drawn where they will run (``device``: ``cuda`` draws a 7B model in a second) in ``dtype``, saved in
~2 GB safetensors shards with an index as ``save_pretrained`` writes them; a checkpoint is complete once its index
exists. The values depend on seed, device type and dtype. Large ones are written at the place they run, never
committed. Their output is random text; they exist to measure and to exercise the real code paths.

The tokenizer is byte-level BPE trained on the demo corpus and then extended with seeded merges of trained pieces to
exactly the model's vocabulary, so every id the model can sample decodes to printable text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.demo import _corpus

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# llava-1.5-hf's chat template (USER: <image>\n... ASSISTANT:).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

VIT_L_14_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA_3_2_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=8192))
VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0))

SIZES: dict[str, dict] = {
    "llava-tiny": dict(
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=256)),
        vision=dict(VIT_L_14_336, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=56, patch_size=14, projection_dim=32)),
    "llava-1b": dict(text=LLAMA_3_2_1B, vision=VIT_L_14_336),
    "llava-1.5-7b": dict(text=VICUNA_7B, vision=VIT_L_14_336),
}
SHARD_BYTES = 2 * 10**9


def build_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE of exactly ``vocab_size`` tokens (the 5 specials first, ``<s>`` prepended as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8192), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer)
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    # Extend to the model's vocabulary: seeded merges of two trained multi-character pieces (printable text).
    pieces = sorted(t for t in vocab if len(t) > 1 and t not in SPECIALS)
    rng = random.Random(seed)
    while len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = LLAVA_TEMPLATE
    return fast


def build_config(size: str, tokenizer) -> dict:
    from transformers import LlavaConfig

    spec = SIZES[size]
    text = dict(spec["text"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = spec["vision"]
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=text["tie_word_embeddings"]).to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    config["demo_size"] = size
    return config


def saved_name(name: str) -> str:
    """A LlavaForConditionalGeneration state-dict name as save_pretrained writes it (the hub's layout)."""
    for memory, saved in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                          ("model.multi_modal_projector.", "multi_modal_projector."),
                          ("lm_head.", "language_model.lm_head.")):
        if name.startswith(memory):
            return saved + name[len(memory):]
    raise ValueError(f"unexpected LLaVA tensor {name}")


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Saved name -> shape of every tensor a checkpoint of ``config`` holds (built on the meta device: no memory)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig.from_dict(config))
    tied = config["text_config"].get("tie_word_embeddings", False)
    return {saved_name(n): tuple(t.shape) for n, t in model.state_dict().items()
            if not (tied and n == "lm_head.weight")}


def _draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """transformers' initialisation: norms' gains 1, biases 0, every other tensor N(0, 0.02)."""
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)


def write_llava(out: Path, size: str, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the ``size`` checkpoint to ``out`` and return it. Reuses a complete one with the same size, seed, device
    type and dtype (so a bench rerun does not redraw 14 GB)."""
    out = Path(out)
    stamp = {"size": size, "seed": seed, "device": torch.device(device).type, "dtype": str(dtype)}
    index = out / "model.safetensors.index.json"
    if index.exists() and json.loads(index.read_text()).get("metadata", {}).get("tributary") == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in [index, *out.glob("model*.safetensors")]:
        old.unlink(missing_ok=True)
    tokenizer = build_tokenizer(SIZES[size]["text"]["vocab_size"], seed)
    config = build_config(size, tokenizer)
    shapes = tensor_shapes(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(shapes):  # fill ~SHARD_BYTES files in name order
        nbytes = itemsize * torch.Size(shapes[name]).numel()
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _draw(n, shapes[n], dtype, device, gen).cpu() for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(names, file)
    tokenizer.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(_image_processor(config["vision_config"]), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}, indent=2))
    index.write_text(json.dumps({"metadata": {"total_size": total, "tributary": stamp},
                                 "weight_map": weight_map}, indent=2))  # last: the checkpoint is complete
    return out


def _image_processor(vision: dict) -> dict:
    """llava-1.5-hf's CLIPImageProcessor at the tower's size."""
    size = vision["image_size"]
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def parameter_count(config: dict) -> int:
    return sum(torch.Size(s).numel() for s in tensor_shapes(config).values())
