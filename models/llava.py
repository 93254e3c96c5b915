"""The LLaVA family: Hugging Face ``LlavaForConditionalGeneration`` checkpoints (image + text in, text out).

Weights, as transformers 5 saves them (and the hub's llava-hf checkpoints, whose vision tower adds ``vision_model.``):

    vision_tower.*            the vision model (CLIPVisionModel for LLaVA-1.5), no ``vision_model.`` prefix
    multi_modal_projector.*   linear_1 -> act -> linear_2
    language_model.model.*    the Llama / Mistral / Qwen2 decoder (read by backbone/loader.py)
    language_model.lm_head.*

The image encoder computes what ``LlavaModel.get_image_features`` computes: the vision tower's
``hidden_states[vision_feature_layer]`` (or those of several layers, concatenated), without the CLS row for the
"default" select strategy ("full" keeps it), through the projector. It is built from transformers' own modules
(``AutoModel.from_config(vision_config)``, ``LlavaMultiModalProjector``), so the arithmetic is the reference's. The
tower's layers after the deepest one read are dropped at load (their output was discarded).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoint import read_tensors
from models.family import ModelError, cut_vision_tower, load_state, plain_json, processor_section

MODEL_TYPE = "llava"
TAKES_LENGTHS: frozenset[str] = frozenset()

# Image processors whose arithmetic encoders/preprocess.ImagePreprocessor reproduces (resize shortest edge or to a
# fixed size, centre crop, rescale, normalize).
IMAGE_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorFast", "LlavaImageProcessor", "LlavaImageProcessorFast")


def _hf_config(config: dict):
    from transformers import LlavaConfig

    return LlavaConfig.from_dict(config)


def read_config(model_dir: Path, raw: dict) -> dict:
    """config.json as transformers reads it: every default filled in (hub configs often list only what differs from
    Llama's and CLIP's defaults), so that every tier sees the sizes the reference model is built with."""
    return plain_json(_hf_config(raw).to_dict())


def placeholder_ids(config: dict) -> dict[str, int]:
    return {"image": int(config.get("image_token_id", config.get("image_token_index", 32000)))}


def preprocess(model_dir: Path, config: dict) -> dict[str, dict]:
    """The image processor's kwargs with the processor class's defaults filled in (as transformers applies them)."""
    from transformers import CLIPImageProcessor
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    cfg = processor_section(model_dir, "image_processor", "image_processor_type")
    kind = cfg.get("image_processor_type", "CLIPImageProcessor")
    if kind not in IMAGE_PROCESSORS:
        raise ModelError(f"image processor {kind} is not supported (supported: {', '.join(IMAGE_PROCESSORS)})")
    cls = LlavaImageProcessor if kind.startswith("Llava") else CLIPImageProcessor
    full = cls.from_dict(cfg).to_dict()
    if full.get("do_pad"):
        raise ModelError("LlavaImageProcessor with do_pad=True (pad to a square first) is not supported yet")
    return {"image": plain_json(full)}


def image_tokens(config: dict) -> int:
    """Rows one image becomes: one per patch, plus the CLS row under the "full" strategy (as LlavaProcessor counts
    them with num_additional_image_tokens=1)."""
    vc = config["vision_config"]
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    return patches + (1 if config.get("vision_feature_select_strategy", "default") == "full" else 0)


class ImageEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image embeddings [B, N, H_text] (N = image_tokens(config))."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        hf = _hf_config(config)
        if hf.vision_feature_select_strategy not in ("default", "full"):
            raise ModelError(f"vision_feature_select_strategy {hf.vision_feature_select_strategy!r} is not supported")
        self.feature_layer = hf.vision_feature_layer
        self.strategy = hf.vision_feature_select_strategy
        self.vision_tower = AutoModel.from_config(hf.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(hf)

    def cut(self) -> None:
        """Drop the tower's layers after the deepest one read (once the weights are in)."""
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        self.feature_layer = cut_vision_tower(self.vision_tower, layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        feats = [out.hidden_states[i] for i in layers]  # each [B, 1 + N, Dv]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]  # drop CLS
        return self.multi_modal_projector(torch.cat(feats, dim=-1))


def load_image_encoder(model_dir: Path, config: dict, dtype: torch.dtype = torch.float32) -> ImageEncoder:
    module = ImageEncoder(config)
    tower = read_tensors(model_dir, "vision_tower.", dtype)
    own = module.vision_tower.state_dict()
    if not any(k in own for k in tower) and all(k.startswith("vision_model.") for k in tower):
        tower = {k[len("vision_model."):]: v for k, v in tower.items()}  # transformers 4 / hub layout
    state = {f"vision_tower.{k}": v for k, v in tower.items()}
    state |= {f"multi_modal_projector.{k}": v for k, v in read_tensors(model_dir, "multi_modal_projector.",
                                                                        dtype).items()}
    load_state(module, state, f"{model_dir} image encoder")
    module.cut()
    return module.to(dtype).eval()


def load_encoder(model_dir: Path, config: dict, modality: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    if modality != "image":
        raise ModelError(f"LLaVA has no {modality} encoder (it takes images only)")
    return load_image_encoder(model_dir, config, dtype)

