"""models/demo.py, models/spec.py, models/checkpoint.py: a deterministic demo checkpoint and its fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import trimodal
from models.checkpoint import FINGERPRINT_FILE, fingerprint, read_tensors, weight_files
from models.demo import AUDIO_TOKEN, IMAGE_TOKEN, write_demo_model
from models.spec import ModelError, ModelSpec, parse_encoder_dtypes


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """The tiny model built a second time, same size and seed, somewhere else."""
    return write_demo_model(tmp_path_factory.mktemp("again") / "demo-tiny", "tiny", seed=0)


@pytest.fixture
def copy(tiny_model, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_model, dst)
    return dst


def test_same_seed_gives_identical_tensors(tiny_model, rebuilt):
    a, b = load_file(str(tiny_model / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys()
    assert len(a) > 20
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    # And byte for byte: the file, the tokenizer and the configs.
    for f in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (tiny_model / f).read_bytes() == (rebuilt / f).read_bytes(), f


def test_same_seed_gives_the_same_fingerprint(tiny_spec, rebuilt):
    assert ModelSpec.from_dir(rebuilt).fingerprint == tiny_spec.fingerprint


def test_weights_are_not_trivial(tiny_model):
    tensors = load_file(str(tiny_model / "model.safetensors"))
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"vision_tower", "multi_modal_projector", "audio_tower", "audio_projector", "language_model"}
    w = tensors["language_model.model.embed_tokens.weight"]
    assert w.std() > 0 and torch.isfinite(w).all()


def test_spec_reads_the_checkpoint(tiny_spec, tiny_model):
    tok = tiny_spec.load_tokenizer()
    assert tiny_spec.name == "demo-tiny"
    assert tiny_spec.path == tiny_model.resolve()
    assert tok.convert_ids_to_tokens(tiny_spec.placeholder_ids["image"]) == IMAGE_TOKEN
    assert tok.convert_ids_to_tokens(tiny_spec.placeholder_ids["audio"]) == AUDIO_TOKEN
    assert tiny_spec.eos_token_ids == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tiny_spec.max_context == 1024
    assert set(tiny_spec.preprocess) == {"image", "audio"}
    assert len(tok) == tiny_spec.config["text_config"]["vocab_size"]


def test_fingerprint_is_stable(tiny_spec, tiny_model):
    assert len(tiny_spec.fingerprint) == 64
    assert fingerprint(tiny_model) == tiny_spec.fingerprint
    assert ModelSpec.from_dir(tiny_model).fingerprint == tiny_spec.fingerprint


def test_fingerprint_without_its_cache_file_is_the_same(tiny_spec, copy):
    (copy / FINGERPRINT_FILE).unlink(missing_ok=True)
    assert fingerprint(copy) == tiny_spec.fingerprint
    assert (copy / FINGERPRINT_FILE).exists()  # computed once, kept beside the checkpoint
    assert json.loads((copy / FINGERPRINT_FILE).read_text())["sha256"] == tiny_spec.fingerprint


@pytest.mark.parametrize("cache", ["", "{\"sha2", "[]", "{\"files\": 1}"])
def test_a_fingerprint_cache_half_written_by_another_process_is_hashed_again(tiny_spec, copy, cache):
    """Every tier's process hashes a new checkpoint at once: one read another's cache file as it was being written
    (empty), raised JSONDecodeError, and ``up`` stopped at start-up. An unreadable cache is hashed again, and the
    cache is written aside and renamed into place; a copy being written is no file of the checkpoint."""
    (copy / FINGERPRINT_FILE).write_text(cache)
    (copy / f"{FINGERPRINT_FILE}.4242.tmp").write_text("another process's, half written")
    assert fingerprint(copy) == tiny_spec.fingerprint
    assert json.loads((copy / FINGERPRINT_FILE).read_text())["sha256"] == tiny_spec.fingerprint


def test_fingerprint_changes_when_a_weight_changes(tiny_spec, copy):
    assert fingerprint(copy) == tiny_spec.fingerprint
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor's data, same size
    path.write_bytes(bytes(data))
    changed = fingerprint(copy)
    assert changed != tiny_spec.fingerprint
    assert ModelSpec.from_dir(copy).encoder_id("image") != tiny_spec.encoder_id("image")


def test_fingerprint_changes_when_a_config_changes(tiny_spec, copy):
    cfg = json.loads((copy / "preprocessor_config.json").read_text())
    cfg["image"]["resample"] = 2  # PIL bilinear
    (copy / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    assert fingerprint(copy) != tiny_spec.fingerprint


def test_fingerprint_changes_when_a_file_is_added(tiny_spec, copy):
    (copy / "extra.txt").write_text("x")
    assert fingerprint(copy) != tiny_spec.fingerprint


def test_encoder_ids_differ_per_precision(tiny_spec):
    """Compute and wire dtype are part of an encoder's identity: encodings of another precision never share a cache
    entry."""
    ids = {tiny_spec.with_encoder_dtypes(c, w).encoder_id("image")
           for c in ("float32", "bfloat16", "float16") for w in ("float32", "bfloat16", "float16")}
    assert len(ids) == 9
    assert tiny_spec.encoder_id("image") == tiny_spec.with_encoder_dtypes("float32").encoder_id("image")
    bf16 = tiny_spec.with_encoder_dtypes("bfloat16")
    assert bf16.encoder_dtype("audio") == ("bfloat16", "bfloat16")  # the wire dtype defaults to the compute dtype
    mixed = tiny_spec.with_encoder_dtypes(parse_encoder_dtypes("image=bfloat16"))  # audio unnamed: float32
    assert mixed.encoder_dtype("image") == ("bfloat16", "bfloat16")
    assert mixed.encoder_id("audio") == tiny_spec.encoder_id("audio")
    for bad in ("int8", "image=int8", "video=bfloat16"):
        with pytest.raises(ValueError):
            tiny_spec.with_encoder_dtypes(parse_encoder_dtypes(bad))


def test_encoder_ids_differ_per_modality(tiny_spec):
    img, aud = tiny_spec.encoder_id("image"), tiny_spec.encoder_id("audio")
    assert img != aud
    assert img.startswith(tiny_spec.fingerprint[:16]) and aud.startswith(tiny_spec.fingerprint[:16])


def test_not_a_checkpoint_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        ModelSpec.from_dir(tmp_path)


def test_other_model_type_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"  # a real family not served (llava and qwen2_audio are: tests/unit/test_families.py)
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="qwen2_vl"):
        ModelSpec.from_dir(copy)


def test_unknown_size_refused(tmp_path):
    with pytest.raises(ValueError, match="huge"):
        write_demo_model(tmp_path / "x", "huge")


def test_read_tensors_by_prefix(tiny_model):
    lm = read_tensors(tiny_model, "language_model.", torch.float16)
    assert "model.embed_tokens.weight" in lm
    assert all(t.dtype == torch.float16 for t in lm.values())
    assert not any(k.startswith("language_model.") for k in lm)
    with safe_open(str(weight_files(tiny_model)[0]), framework="pt") as f:
        total = len(list(f.keys()))
    assert len(lm) < total
    with pytest.raises(KeyError):
        read_tensors(tiny_model, "no_such_prefix.")


def test_encoders_output_the_counted_rows(tiny_spec):
    cfg = tiny_spec.config
    H = cfg["text_config"]["hidden_size"]
    img = trimodal.load_image_encoder(tiny_spec.path, cfg)
    size = cfg["vision_config"]["image_size"]
    with torch.inference_mode():
        out = img(torch.zeros(1, 3, size, size))
    assert out.shape == (1, trimodal.image_output_length(cfg), H)
    aud = trimodal.load_audio_encoder(tiny_spec.path, cfg)
    frames = 2 * cfg["audio_config"]["max_source_positions"]
    with torch.inference_mode():
        out = aud(torch.zeros(1, cfg["audio_config"]["num_mel_bins"], frames))
    assert out.shape == (1, trimodal.audio_output_length(frames), H)


def test_audio_output_length_values():
    # conv stride 2 then pool stride 2, as Qwen2-Audio: 100 frames (1 s) -> 25, 200 -> 50, 50 -> 12.
    assert [trimodal.audio_output_length(n) for n in (50, 100, 200, 3000)] == [12, 25, 50, 750]
