"""The demo's trimodal family: a CLIP-style vision tower, a Whisper-style audio encoder, a Llama language model.

Weights live in one safetensors namespace, LLaVA / Qwen2-Audio style:

    vision_tower.*           CLIPVisionModel
    multi_modal_projector.*  linear_1 -> GELU -> linear_2 (LLaVA's projector)
    audio_tower.*            WhisperEncoder
    audio_projector.*        avg-pool(stride 2) -> linear (Qwen2-Audio's pooling)
    language_model.*         LlamaForCausalLM

Each loader reads only its own prefix from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from models.checkpoint import read_tensors
from models.family import cut_vision_tower

MODEL_TYPE = "tributary_trimodal"


class LlavaProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ImageEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image embeddings [B, (S/patch)^2, H_text]."""

    def __init__(self, config: dict):
        super().__init__()
        vc = CLIPVisionConfig(**config["vision_config"])
        self.feature_layer = int(config.get("vision_feature_layer", -2))
        self.vision_tower = CLIPVisionModel(vc)
        self.multi_modal_projector = LlavaProjector(vc.hidden_size, config["text_config"]["hidden_size"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer][:, 1:]  # [B, N, Dv]: drop CLS ("default" strategy)
        return self.multi_modal_projector(feats)


class AudioProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pool = nn.AvgPool1d(2, stride=2)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x.transpose(1, 2)).transpose(1, 2)  # [B, T/2, Da]
        return self.linear(x)


class AudioEncoder(nn.Module):
    """input_features [B, mels, 2*max_source_positions] -> audio embeddings [B, max_source_positions/2, H_text]."""

    def __init__(self, config: dict):
        super().__init__()
        ac = WhisperConfig(**config["audio_config"])
        self.audio_tower = WhisperEncoder(ac)
        self.audio_projector = AudioProjector(ac.d_model, config["text_config"]["hidden_size"])

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        hidden = self.audio_tower(input_features).last_hidden_state  # [B, T/2, Da]
        return self.audio_projector(hidden)


def audio_output_length(mel_frames: int) -> int:
    """Embeddings a clip of ``mel_frames`` real mel frames keeps (conv stride 2, then pool stride 2), as Qwen2-Audio."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def image_output_length(config: dict) -> int:
    vc = config["vision_config"]
    return (vc["image_size"] // vc["patch_size"]) ** 2


def _load(module: nn.Module, model_dir: Path, prefixes: list[str], dtype: torch.dtype) -> nn.Module:
    state: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        state.update({f"{prefix}.{k}": v for k, v in read_tensors(model_dir, prefix + ".", dtype).items()})
    module.load_state_dict(state, strict=True)
    return module.to(dtype).eval()


def load_image_encoder(model_dir: Path, config: dict, dtype: torch.dtype = torch.float32) -> ImageEncoder:
    module = _load(ImageEncoder(config), model_dir, ["vision_tower", "multi_modal_projector"], dtype)
    module.feature_layer = cut_vision_tower(module.vision_tower, [module.feature_layer])[0]  # later layers unread
    return module


def load_audio_encoder(model_dir: Path, config: dict, dtype: torch.dtype = torch.float32) -> AudioEncoder:
    return _load(AudioEncoder(config), model_dir, ["audio_tower", "audio_projector"], dtype)


def load_language_model(model_dir: Path, config: dict, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    lm = LlamaForCausalLM(LlamaConfig(**config["text_config"]))
    state = read_tensors(model_dir, "language_model.", dtype)
    lm.load_state_dict(state, strict=True)
    return lm.to(dtype).eval()


# ---- the family interface (models/family.py) ---------------------------------------------------------------

TAKES_LENGTHS: frozenset[str] = frozenset()


def read_config(model_dir: Path, raw: dict) -> dict:
    return raw


def placeholder_ids(config: dict) -> dict[str, int]:
    return {"image": config["image_token_id"], "audio": config["audio_token_id"]}


def preprocess(model_dir: Path, config: dict) -> dict[str, dict]:
    return json.loads((model_dir / "preprocessor_config.json").read_text())  # {"image": {...}, "audio": {...}}


def image_tokens(config: dict) -> int:
    return image_output_length(config)


def audio_tokens(config: dict):
    return audio_output_length


def load_encoder(model_dir: Path, config: dict, modality: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    loaders = {"image": load_image_encoder, "audio": load_audio_encoder}
    if modality not in loaders:
        raise ValueError(f"unknown modality {modality!r}")
    return loaders[modality](model_dir, config, dtype)
