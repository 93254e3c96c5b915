"""backbone/fusion.py: encoder rows spliced into the token embeddings at the placeholder positions."""

from __future__ import annotations

import pytest
import torch

from backbone.fusion import PlanError, fuse

H = 6
PH = {"image": 8, "audio": 9}


@pytest.fixture(scope="module")
def embed():
    torch.manual_seed(0)
    return torch.nn.Embedding(12, H)


def rows(n, seed, width=H, dtype=torch.float32):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).to(dtype) + 10 * (seed + 1)


@torch.inference_mode()
def test_rows_land_at_placeholders_in_order(embed):
    ids = torch.tensor([1, 8, 8, 2, 9, 9, 9, 5, 8, 3, 9])
    a, b, c, d = rows(2, 0), rows(3, 1), rows(1, 2), rows(1, 3)
    out = fuse(embed, ids, [("image", a), ("audio", b), ("image", c), ("audio", d)], PH)
    assert out.shape == (1, len(ids), H)
    assert torch.equal(out[0, [1, 2]], a)
    assert torch.equal(out[0, [8]], c)
    assert torch.equal(out[0, [4, 5, 6]], b)
    assert torch.equal(out[0, [10]], d)
    text = [0, 3, 7, 9]
    assert torch.equal(out[0, text], embed.weight[ids[text]])


@torch.inference_mode()
def test_order_within_a_modality_follows_the_media_list(embed):
    ids = torch.tensor([8, 0, 8])
    a, b = rows(1, 0), rows(1, 1)
    ab = fuse(embed, ids, [("image", a), ("image", b)], PH)
    ba = fuse(embed, ids, [("image", b), ("image", a)], PH)
    assert torch.equal(ab[0, 0], a[0]) and torch.equal(ab[0, 2], b[0])
    assert torch.equal(ba[0, 0], b[0]) and torch.equal(ba[0, 2], a[0])


@torch.inference_mode()
def test_generated_tokens_are_text_whatever_their_ids(embed):
    """A migrated request's prompt ends with tokens the model sampled; one may be a placeholder id, which the model
    read through the embedding table: it stays text, and is not counted against the encoder rows."""
    ids = torch.tensor([1, 8, 2, 8, 9, 3])
    a = rows(1, 0)
    out = fuse(embed, ids, [("image", a)], PH, generated=3)
    assert torch.equal(out[0, 1], a[0])
    assert torch.equal(out[0, 3:], embed.weight[ids[3:]])
    with pytest.raises(PlanError, match="image: 2 placeholder tokens but 1 encoder rows"):
        fuse(embed, ids, [("image", a)], PH)  # the same ids read as all prompt


@torch.inference_mode()
def test_text_only(embed):
    ids = torch.tensor([1, 2, 3])
    out = fuse(embed, ids, [], PH)
    assert torch.equal(out[0], embed.weight[ids])


@torch.inference_mode()
def test_rows_are_cast_to_the_embedding_dtype(embed):
    ids = torch.tensor([0, 9, 9])
    b = rows(2, 4, dtype=torch.float16)
    out = fuse(embed, ids, [("audio", b)], PH)
    assert out.dtype == embed.weight.dtype
    assert torch.equal(out[0, 1:], b.float())


@pytest.mark.parametrize("ids,media", [
    ([1, 8, 8, 2], [("image", (1,))]),  # fewer rows than placeholders
    ([1, 8, 2], [("image", (2,))]),  # more rows than placeholders
    ([1, 8, 2], []),  # placeholders, no media
    ([1, 2, 3], [("audio", (2,))]),  # media, no placeholders
    ([8, 9], [("image", (1,)), ("image", (1,))]),  # right total, wrong modality
])
def test_count_mismatch_raises(embed, ids, media):
    with pytest.raises(PlanError):
        with torch.inference_mode():
            fuse(embed, torch.tensor(ids), [(m, rows(n[0], k)) for k, (m, n) in enumerate(media)], PH)


def test_width_mismatch_raises(embed):
    with pytest.raises(PlanError, match="width"):
        with torch.inference_mode():
            fuse(embed, torch.tensor([1, 8, 8]), [("image", rows(2, 0, width=H + 1))], PH)


def test_width_mismatch_in_one_of_several_parts_raises(embed):
    media = [("image", rows(1, 0)), ("image", rows(1, 1, width=H - 2))]
    with pytest.raises(PlanError, match="width"):
        with torch.inference_mode():
            fuse(embed, torch.tensor([8, 1, 8]), media, PH)


def test_plan_error_is_a_value_error():
    assert issubclass(PlanError, ValueError)


def test_rows_with_a_batch_axis_raise(embed):
    # [1, n, H] (an encoder output not yet unbatched) must be refused, not spliced or crash.
    with pytest.raises(PlanError):
        with torch.inference_mode():
            fuse(embed, torch.tensor([1, 8, 2]), [("image", rows(2, 0).unsqueeze(0)[:, :1])], PH)
