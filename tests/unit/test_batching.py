"""Dynamic batching must not change results: for both runtimes (torch and onnx), encoding inputs one at a time and
as one stacked batch gives the same rows; shape_groups groups prepared inputs by shape and keeps their indices."""

from __future__ import annotations

import shutil

import pytest
import torch

from cache.codec import decode_tensor
from encoders.batching import shape_groups
from encoders.loader import RUNTIMES, load_preprocessor, load_runtime
from encoders.preprocess import Prepared
from tests.media import jpeg_bytes, png_bytes, wav_bytes

BATCH_ATOL = 1e-5  # batched vs unbatched rows, fp32 on the CPU (measured differences are ~1e-7 or exactly 0)

IMAGES = [png_bytes(40, 30, seed=0), jpeg_bytes(64, 48, seed=1), png_bytes(17, 300, seed=2),
          png_bytes(33, 33, seed=3, mode="RGBA"), png_bytes(200, 20, seed=4, mode="L")]
CLIPS = [wav_bytes(0.3, seed=10), wav_bytes(0.8, seed=11), wav_bytes(1.37, 8000, seed=12), wav_bytes(2.0, seed=13)]
MEDIA = {"image": IMAGES, "audio": CLIPS}


@pytest.fixture(scope="module")
def spec(tiny_model, tmp_path_factory):
    """A copy of the tiny checkpoint, so the ONNX export of this module does not write into the shared one."""
    from models.spec import ModelSpec

    copy = tmp_path_factory.mktemp("batching-model") / "demo-tiny"
    shutil.copytree(tiny_model, copy)
    return ModelSpec.from_dir(copy)


@pytest.fixture(scope="module")
def prepared(spec) -> dict[str, list[Prepared]]:
    return {m: [load_preprocessor(spec, m)(data) for data in MEDIA[m]] for m in MEDIA}


@pytest.fixture(scope="module", params=RUNTIMES)
def runtimes(request, spec):
    """runtime name -> {modality: runtime}; the onnx one exports each encoder once for this module."""
    return {m: load_runtime(spec, m, request.param, "cpu", threads=1) for m in MEDIA}


def test_preprocessed_media_share_one_shape_per_modality(prepared, spec):
    size = spec.config["vision_config"]["image_size"]
    assert {tuple(p.data.shape) for p in prepared["image"]} == {(3, size, size)}
    # Whisper-style: every clip, 0.3 s to 2 s, fills the same fixed window ...
    assert len({tuple(p.data.shape) for p in prepared["audio"]}) == 1
    # ... but keeps its own token count.
    assert len({p.num_tokens for p in prepared["audio"]}) == len(CLIPS)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_batched_equals_unbatched(runtimes, prepared, modality):
    runtime = runtimes[modality]
    items = prepared[modality]
    batch = torch.stack([p.data for p in items])
    together = runtime.run(batch)
    assert together.shape[0] == len(items)
    for i, p in enumerate(items):
        alone = runtime.run(p.data.unsqueeze(0))
        assert alone.shape == (1, *together.shape[1:])
        torch.testing.assert_close(together[i : i + 1], alone, atol=BATCH_ATOL, rtol=0)
    # Different inputs give different rows (so equality above is not a constant output).
    for i in range(1, len(items)):
        assert not torch.allclose(together[0], together[i], atol=1e-3)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_batch_order_does_not_matter(runtimes, prepared, modality):
    runtime = runtimes[modality]
    batch = torch.stack([p.data for p in prepared[modality]])
    perm = torch.tensor([2, 0, 3, 1] + list(range(4, batch.shape[0])))
    torch.testing.assert_close(runtime.run(batch[perm]), runtime.run(batch)[perm], atol=BATCH_ATOL, rtol=0)


# ---- shape_groups ---------------------------------------------------------------------------------------------


def test_shape_groups_groups_by_shape_and_keeps_indices():
    shapes = {0: (3, 4, 4), 1: (80, 10), 2: (3, 4, 4), 3: (80, 12), 4: (80, 10), 5: (3, 4, 4)}
    prepared = [(i, Prepared(torch.full(s, float(i)), num_tokens=i + 1)) for i, s in shapes.items()]
    groups = shape_groups(prepared)
    assert [idx for idx, _ in groups] == [[0, 2, 5], [1, 4], [3]]  # first-seen shape order, input order within
    for idx, batch in groups:
        assert batch.shape == (len(idx), *shapes[idx[0]])
        for row, i in enumerate(idx):
            assert torch.equal(batch[row], torch.full(shapes[i], float(i)))


def test_shape_groups_keeps_caller_indices_not_positions():
    # Indices are whatever the caller passed (e.g. stream positions), not 0..n-1.
    prepared = [(17, Prepared(torch.zeros(2, 3), 1)), (4, Prepared(torch.ones(2, 3), 1)),
                (9, Prepared(torch.zeros(5), 1))]
    groups = shape_groups(prepared)
    assert [idx for idx, _ in groups] == [[17, 4], [9]]
    assert torch.equal(groups[0][1][1], torch.ones(2, 3))
    assert shape_groups([]) == []


def test_mixed_job_through_shape_groups_equals_one_at_a_time(runtimes, prepared):
    # Images and clips interleaved in one read: each shape group is one forward pass, and scattering the rows back
    # by index gives what encoding each part alone gives.
    items = [p for pair in zip(prepared["image"], prepared["audio"]) for p in pair] + prepared["image"][4:]
    modality = ["image", "audio"] * 4 + ["image"]
    groups = shape_groups(list(enumerate(items)))
    assert sorted(len(idx) for idx, _ in groups) == [4, 5]
    out: dict[int, torch.Tensor] = {}
    for idx, batch in groups:
        rows = runtimes[modality[idx[0]]].run(batch)
        assert {modality[i] for i in idx} == {modality[idx[0]]}
        out.update({i: rows[k] for k, i in enumerate(idx)})
    assert sorted(out) == list(range(len(items)))
    for i, p in enumerate(items):
        alone = runtimes[modality[i]].run(p.data.unsqueeze(0))[0]
        torch.testing.assert_close(out[i], alone, atol=BATCH_ATOL, rtol=0)


def test_outputs_are_cast_and_checked_where_they_were_computed(spec):
    """run_isolating casts a batch to the wire dtype and checks it before the one copy to the host: an item whose
    rows overflow the wire dtype (fp16 past 65504) fails alone, naming the dtype; the others come back in it."""
    from encoders.runtime import run_isolating

    runtime = load_runtime(spec, "image")
    pre = load_preprocessor(spec, "image")
    _, batch = shape_groups([(i, pre(b)) for i, b in enumerate(IMAGES[:3])])[0]
    ref = runtime.run(batch)
    scale = torch.ones(len(batch), 1, 1)
    scale[1] = 1e6 / float(ref[1].abs().max())  # item 1's largest value becomes 1e6: finite in fp32, not in fp16

    class Scaled:  # the real runtime, item 1's output scaled past fp16's range
        name = "scaled"

        def run(self, x, lengths=None):
            return runtime.run(x) * scale[: len(x)]

    out = run_isolating(Scaled(), batch, None, torch.float16)
    assert isinstance(out[1], str) and "not finite" in out[1] and "float16" in out[1]
    for i in (0, 2):
        assert out[i].tensor.dtype == torch.float16 and out[i].tensor.device.type == "cpu"
        torch.testing.assert_close(out[i].tensor.float(), ref[i], atol=2e-3, rtol=1e-3)
        assert torch.equal(decode_tensor(out[i].data), out[i].tensor)  # the payload holds those very rows
    same = run_isolating(runtime, batch, None)  # no wire dtype: the compute dtype, as run() gives it
    assert all(torch.equal(a.tensor, b) for a, b in zip(same, ref))
    # Only an item's first ``counts`` rows are published and checked: rows past them (padding) may be anything.
    scale[1] = float("nan")
    rows = ref.shape[1]
    cut = run_isolating(Scaled(), batch, None, None, [rows, 0, rows - 3])
    assert cut[1].tensor.shape == (0, ref.shape[2]) and cut[2].tensor.shape == (rows - 3, ref.shape[2])
    assert torch.equal(decode_tensor(cut[2].data), ref[2][: rows - 3])
