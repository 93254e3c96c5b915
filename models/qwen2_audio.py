"""The Qwen2-Audio family: Hugging Face ``Qwen2AudioForConditionalGeneration`` checkpoints (audio + text in).

Weights, as transformers 5 saves them (the hub's Qwen/Qwen2-Audio-7B* use the same names):

    audio_tower.*             Qwen2AudioEncoder (Whisper-style: conv x2, layers, avg-pool stride 2, layer norm)
    multi_modal_projector.*   linear
    language_model.model.*    the Qwen2 decoder (read by backbone/loader.py)
    language_model.lm_head.*

The audio encoder computes what ``Qwen2AudioModel.forward`` computes for its audio features: the mel features of a
clip padded to the extractor's window, an attention mask that hides the padded frames (built from each clip's real
length with transformers' own ``create_bidirectional_mask``, as the reference does from ``feature_attention_mask``),
the tower, the projector. Every row is returned; the worker keeps the first ``audio_tokens(frames)`` of each clip,
the rows the reference splices into the prompt. Because the output depends on each clip's mask, the module takes the
lengths as a second input: ``forward(input_features [B, mels, T], lengths [B])``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoint import read_tensors
from models.family import ModelError, load_state, plain_json, processor_section

MODEL_TYPE = "qwen2_audio"
TAKES_LENGTHS = frozenset({"audio"})  # the encoder's output depends on each clip's padding mask


def _hf_config(config: dict):
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig.from_dict(config)


def read_config(model_dir: Path, raw: dict) -> dict:
    """config.json as transformers reads it, every default filled in (see models/llava.py)."""
    return plain_json(_hf_config(raw).to_dict())


def placeholder_ids(config: dict) -> dict[str, int]:
    return {"audio": int(config.get("audio_token_id", config.get("audio_token_index", 151646)))}


def preprocess(model_dir: Path, config: dict) -> dict[str, dict]:
    """The WhisperFeatureExtractor's kwargs with its defaults filled in."""
    from transformers import WhisperFeatureExtractor

    cfg = processor_section(model_dir, "feature_extractor", "feature_extractor_type")
    kind = cfg.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
        raise ModelError(f"feature extractor {kind} is not supported (supported: WhisperFeatureExtractor)")
    full = WhisperFeatureExtractor.from_dict(cfg).to_dict()
    if full.get("dither"):
        raise ModelError("a WhisperFeatureExtractor with dither != 0 (random noise) is not supported")
    window = int(config["audio_config"]["max_source_positions"]) * 2  # conv2 has stride 2
    if full["nb_max_frames"] != window:
        raise ModelError(f"the feature extractor pads to {full['nb_max_frames']} mel frames but the audio tower "
                         f"takes {window}")
    return {"audio": plain_json(full)}


def output_length(mel_frames: int) -> int:
    """Rows a clip of ``mel_frames`` real mel frames keeps, as Qwen2AudioProcessor counts its <|AUDIO|> tokens and
    Qwen2AudioEncoder._get_feat_extract_output_lengths computes them (conv stride 2, then avg-pool stride 2)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def audio_tokens(config: dict):
    return output_length


class AudioEncoder(nn.Module):
    """input_features [B, mels, 2 * max_source_positions], lengths [B] (real mel frames) ->
    audio embeddings [B, max_source_positions / 2, H_text] (rows past output_length(lengths[b]) are padding)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.qwen2_audio.modeling_qwen2_audio import (
            Qwen2AudioMultiModalProjector,
        )

        hf = _hf_config(config)
        self.audio_tower = AutoModel.from_config(hf.audio_config)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(hf)

    def forward(self, input_features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        # As Qwen2AudioModel.forward: the mask is over the frames after conv2 (stride 2); padded ones are hidden.
        feat_lengths, _ = self.audio_tower._get_feat_extract_output_lengths(lengths.to(torch.long))
        batch, _, max_mel = input_features.shape
        max_len = (max_mel - 2) // 2 + 1
        positions = torch.arange(max_len, dtype=feat_lengths.dtype, device=feat_lengths.device)
        mask_2d = (positions[None, :] < feat_lengths[:, None]).to(torch.long)  # [B, max_len]
        dummy = torch.zeros((batch, max_len, 1), dtype=self.multi_modal_projector.linear.weight.dtype,
                            device=input_features.device)
        mask = create_bidirectional_mask(config=self.audio_tower.config, inputs_embeds=dummy,
                                         attention_mask=mask_2d.to(input_features.device))
        hidden = self.audio_tower(input_features, attention_mask=mask).last_hidden_state  # [B, max_len / 2, Da]
        return self.multi_modal_projector(hidden)


def load_audio_encoder(model_dir: Path, config: dict, dtype: torch.dtype = torch.float32) -> AudioEncoder:
    module = AudioEncoder(config)
    state = {f"{p}.{k}": v for p in ("audio_tower", "multi_modal_projector")
             for k, v in read_tensors(model_dir, p + ".", dtype).items()}
    load_state(module, state, f"{model_dir} audio encoder")
    return module.to(dtype).eval()


def load_encoder(model_dir: Path, config: dict, modality: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    if modality != "audio":
        raise ModelError(f"Qwen2-Audio has no {modality} encoder (it takes audio only)")
    return load_audio_encoder(model_dir, config, dtype)

