"""What a model family tells every tier: its modalities, placeholders, processor configs, token counts, encoders.

One ``Family`` per implementing module (``models/trimodal.py``, ``models/llava.py``, ``models/qwen2_audio.py``), picked
by the ``model_type`` of the checkpoint's ``config.json`` (``models.spec.family_for``). The helpers below read the files
a Hugging Face checkpoint keeps its processor in, in both layouts transformers writes: the legacy flat
``preprocessor_config.json`` and transformers 5's ``processor_config.json`` with one entry per sub-processor."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path


class ModelError(ValueError):
    """The directory is not a checkpoint this build can serve."""


@dataclass(frozen=True)
class Family:
    """A family's identity and modalities (cheap: no torch, no transformers), and the module that implements it.

    The module (``impl``) defines, at module level:

    * ``read_config(model_dir, raw) -> dict``: config.json as every tier reads it (``config["text_config"]`` is the
      language model's);
    * ``placeholder_ids(config) -> {modality: token id}``;
    * ``preprocess(model_dir, config) -> {modality: processor kwargs}`` (``CLIPImageProcessor`` /
      ``WhisperFeatureExtractor`` kwargs, what encoders/preprocess.py applies);
    * ``image_tokens(config) -> int`` (rows one image becomes) if it takes images, ``audio_tokens(config) ->
      (real mel frames -> rows)`` if it takes audio;
    * ``load_encoder(model_dir, config, modality, dtype) -> nn.Module``: the encoder + projector, read from its own
      safetensors prefixes only;
    * ``TAKES_LENGTHS``: the modalities whose encoder also takes each input's real length (``forward(x, lengths)``:
      its output depends on a padding mask, as Qwen2-Audio's does).
    """

    model_type: str
    modalities: tuple[str, ...]  # the media a request may carry; any other is a 400 at the gateway
    module: str  # e.g. "models.llava"

    @property
    def impl(self):
        return importlib.import_module(self.module)

    @property
    def takes_lengths(self) -> frozenset[str]:
        return frozenset(getattr(self.impl, "TAKES_LENGTHS", ()))


# ---- reading a Hugging Face checkpoint's side files -------------------------------------------------------------

def plain_json(obj) -> dict:
    """A transformers config or processor dict as plain JSON values (enums, dtypes and the like become strings), the
    form every tier reads it in."""
    return json.loads(json.dumps(obj, default=str))


def read_json(path: Path) -> dict | None:
    """The JSON file at ``path`` (None if there is none); a file that is not JSON is a ModelError naming it."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def processor_section(model_dir: Path, key: str, type_key: str) -> dict:
    """The kwargs of one sub-processor (``key``: ``image_processor`` or ``feature_extractor``).

    ``preprocessor_config.json`` (flat: what the hub's LLaVA / Qwen2-Audio checkpoints hold, and what a sub-processor
    saved alone writes) wins; else ``processor_config.json``'s ``key`` entry (what transformers 5 writes for a
    whole processor)."""
    flat = read_json(model_dir / "preprocessor_config.json")
    if flat is not None and type_key in flat:
        return flat
    nested = read_json(model_dir / "processor_config.json") or {}
    if isinstance(nested.get(key), dict):
        return nested[key]
    raise ModelError(f"{model_dir} has no {key} config (preprocessor_config.json with {type_key}, or "
                     f"processor_config.json with {key!r})")


def eos_token_ids(model_dir: Path, config: dict) -> list[int]:
    """generation_config.json's eos_token_id, else the text config's, else the top-level config's."""
    for source in (read_json(model_dir / "generation_config.json") or {}, config.get("text_config") or {}, config):
        eos = source.get("eos_token_id")
        if eos is not None and eos != []:
            return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
    return []


def chat_template(model_dir: Path) -> str | None:
    """The processor's chat template when the checkpoint keeps it apart from the tokenizer (``chat_template.jinja``
    is shared by both in transformers 5; older checkpoints keep the processor's in ``chat_template.json``)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    legacy = read_json(model_dir / "chat_template.json")
    if legacy and isinstance(legacy.get("chat_template"), str):
        return legacy["chat_template"]
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast; sentencepiece; byte-level BPE


def check_prompt_files(model_dir: Path) -> None:
    """ModelError unless the checkpoint has what the gateway builds prompts with: a tokenizer and a chat template
    (``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``'s). Without a template the cluster
    started and answered every request 500 (an outside tester's); without a tokenizer file, transformers asked to
    install sentencepiece or tiktoken."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the checkpoint's tokenizer "
                         "files beside its weights")
    config = read_json(model_dir / "tokenizer_config.json") or {}
    template = chat_template(model_dir) or config.get("chat_template")  # a str, or a list of named ones
    if not (template.strip() if isinstance(template, str) else template):  # an empty file too: every prompt empty
        raise ModelError(f"{model_dir}: no chat template (chat_template.jinja, chat_template.json, or chat_template "
                         "in tokenizer_config.json): a base model without one cannot serve chat completions; add the "
                         "template of the instruction-tuned model it comes from")


def load_state(module, tensors: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the checkpoint part."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ModelError(f"{what}: checkpoint tensors do not fit the module (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def cut_vision_tower(tower, layers: list[int]) -> list[int]:
    """Drop a vision tower's encoder layers after the deepest one whose hidden states are read. LLaVA reads
    ``hidden_states[vision_feature_layer]``, -2 by default, so the last layer's work was thrown away. Returns the
    read indices as absolute ``hidden_states`` positions (0: the embeddings' output), valid on the cut tower. A tower
    whose layers it cannot find is left whole."""
    from torch import nn

    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    blocks = getattr(encoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        return list(layers)
    total = len(blocks)
    absolute = [i if i >= 0 else total + 1 + i for i in layers]
    if any(not 0 <= i <= total for i in absolute):
        raise ModelError(f"vision_feature_layer {layers} is outside the tower's {total} layers")
    del blocks[max(absolute):]
    return absolute

