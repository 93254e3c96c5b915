"""models/real_shapes.py: real-shape LLaVA checkpoints in the hub's layout, read by transformers and by our loaders.

The big sizes are checked by shape alone (a meta-device model: no memory), against the published parameter counts;
``llava-tiny`` has the same structure (tied embeddings, llama3 rope, GQA, CLIP tower) and is written, then loaded by
``LlavaForConditionalGeneration.from_pretrained`` and by every Tributary loader, whose outputs must agree.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.real_shapes import SIZES, build_config, build_tokenizer, parameter_count, tensor_shapes, write_llava
from models.spec import ModelSpec


@pytest.fixture(scope="module")
def llava_tiny(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("real") / "llava-tiny", "llava-tiny", seed=0, dtype=torch.float32)


@pytest.mark.parametrize("size, params, text_params", [
    ("llava-1b", 1_545_617_408, 1_235_814_400),  # Llama-3.2-1B's published count (tied embeddings)
    ("llava-1.5-7b", 7_063_427_072, 6_738_939_904),  # llava-1.5-7b-hf's published count
])
def test_real_sizes_have_the_published_shapes(size, params, text_params):
    tok = build_tokenizer(SIZES[size]["text"]["vocab_size"], 0)
    config = build_config(size, tok)
    assert len(tok) == config["text_config"]["vocab_size"]
    shapes = tensor_shapes(config)
    assert parameter_count(config) == params
    assert sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("language_model.")) == text_params
    assert shapes["vision_tower.embeddings.position_embedding.weight"] == (577, 1024)  # ViT-L/14 at 336: 24x24+1


def test_the_checkpoint_is_complete_and_reused(llava_tiny):
    index = json.loads((llava_tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensor_shapes(json.loads((llava_tiny / "config.json").read_text())))
    before = {p.name: p.stat().st_mtime_ns for p in llava_tiny.glob("*.safetensors")}
    write_llava(llava_tiny, "llava-tiny", seed=0, dtype=torch.float32)  # same stamp: nothing is redrawn
    assert before == {p.name: p.stat().st_mtime_ns for p in llava_tiny.glob("*.safetensors")}


def test_every_id_decodes_to_text(llava_tiny):
    spec = ModelSpec.from_dir(llava_tiny)
    tok = spec.load_tokenizer()
    assert len(tok) == spec.config["text_config"]["vocab_size"]
    text = tok.decode(list(range(len(tok))), skip_special_tokens=True)
    assert "\ufffd" not in text[2000:]  # past the byte alphabet, every piece is printable
    assert tok("hello there").input_ids[0] == tok.bos_token_id


def test_transformers_loads_it_and_our_backbone_and_encoder_agree(llava_tiny):
    from transformers import LlavaForConditionalGeneration

    from backbone.engine import load_engine
    from models.llava import load_image_encoder
    from router.messages import SamplingParams

    ref, info = LlavaForConditionalGeneration.from_pretrained(str(llava_tiny), dtype=torch.float32,
                                                              output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    ref.eval()
    spec = ModelSpec.from_dir(llava_tiny)
    assert spec.placeholder_ids == {"image": spec.load_tokenizer().convert_tokens_to_ids("<image>")}
    engine = load_engine(spec)
    ids = [1, 300, 301, 302, 17, 900, 5]
    seq = engine.new_sequence("r", len(ids), SamplingParams(max_tokens=1, temperature=0.0))
    hidden = engine.prompt_hidden(seq, ids, [])
    ours = engine.model.logits(hidden)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)

    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    encoder = load_image_encoder(spec.path, spec.config)
    with torch.no_grad():
        want = ref.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")
        want = torch.stack(list(want.pooler_output if hasattr(want, "pooler_output") else want))
        assert torch.allclose(encoder(pixels), want.reshape(encoder(pixels).shape), atol=1e-5)


def test_the_cli_writes_it(tmp_path):
    from tributary.cli import main

    assert main(["demo-model", "--out", str(tmp_path / "m"), "--size", "llava-tiny", "--dtype", "float16"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["demo_size"] == "llava-tiny"
    from safetensors import safe_open

    files = list((tmp_path / "m").glob("model-*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
