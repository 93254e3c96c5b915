"""Encoder CUDA graphs' static-buffer path on the CPU (encoders/graphs.py): buckets, padding to them, the fixed input
shapes graphs are captured for, the lengths of an encoder that masks its padding, and a capture that fails or
deviates leaving the forward eager. The captured graphs themselves run in tests/unit/test_gpu_encoders.py."""

from __future__ import annotations

import logging

import pytest
import torch

from encoders.batching import batch_lengths, shape_groups
from encoders.graphs import MAX_GRAPH_BATCH, EncoderGraphs, encoder_buckets
from encoders.loader import load_preprocessor, load_runtime
from encoders.preprocess import ImagePreprocessor
from encoders.runtime import run_isolating
from models.spec import ModelSpec
from tests.media import png_bytes, wav_bytes


def test_buckets_are_powers_of_two_to_eight_then_multiples_of_eight():
    assert encoder_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert encoder_buckets(8) == [1, 2, 4, 8]
    assert encoder_buckets(5) == [1, 2, 4, 5]
    assert encoder_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert encoder_buckets(1) == [1]
    with pytest.raises(ValueError):
        encoder_buckets(0)


def test_graphs_stop_at_the_largest_graph_batch(tiny_spec):
    """A worker with a large --max-batch captures up to MAX_GRAPH_BATCH; larger batches run eagerly."""
    pre = load_preprocessor(tiny_spec, "image")
    graphs = EncoderGraphs(load_runtime(tiny_spec, "image"), pre.input_shape, 4 * MAX_GRAPH_BATCH, capture=False)
    assert graphs.max_batch == MAX_GRAPH_BATCH == graphs.buckets[-1]
    assert len(graphs.inputs) == MAX_GRAPH_BATCH


@pytest.mark.parametrize("modality,media", [("image", [png_bytes(50, 40), png_bytes(17, 90, seed=1)]),
                                            ("audio", [wav_bytes(0.3), wav_bytes(2.0, seed=1)])])
def test_the_input_shape_graphs_are_captured_for_is_every_items_shape(tiny_spec, modality, media):
    pre = load_preprocessor(tiny_spec, modality)
    assert pre.input_shape is not None
    assert all(tuple(pre(m).data.shape) == pre.input_shape for m in media)


def test_an_image_config_without_a_crop_has_no_fixed_shape():
    cfg = {"size": {"shortest_edge": 32}, "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert ImagePreprocessor(cfg, 4).input_shape is None
    fixed = dict(cfg, size={"height": 24, "width": 32})
    assert ImagePreprocessor(fixed, 4).input_shape == (3, 24, 32)


def _batch(pre, media):
    (_, batch), = shape_groups(list(enumerate(pre(m) for m in media)))
    return batch


def test_padded_batches_give_each_item_what_the_eager_forward_gives_it(tiny_spec):
    pre = load_preprocessor(tiny_spec, "image")
    runtime = load_runtime(tiny_spec, "image")
    four = _batch(pre, [png_bytes(50, 40, seed=s) for s in range(4)])
    three = _batch(pre, [png_bytes(30, 60, seed=s) for s in range(10, 13)])
    want4, want3 = runtime.run(four), runtime.run(three)
    took = runtime.capture(pre.input_shape, max_batch=8, capture=False)
    assert took == {"buckets": [], "seconds": 0.0, "memory_mib": 0.0} and runtime.graphs is not None
    assert runtime.graphs.buckets == [1, 2, 4, 8] and not runtime.graphs.graphs
    torch.testing.assert_close(runtime.run(four), want4, rtol=1e-5, atol=1e-5)
    # Three items in bucket 4: the fourth row still holds the batch before's last item; it changes nothing.
    got3 = runtime.run(three)
    assert got3.shape == want3.shape
    torch.testing.assert_close(got3, want3, rtol=1e-5, atol=1e-5)
    one = runtime.run(three[1:2])
    torch.testing.assert_close(one, want3[1:2], rtol=1e-5, atol=1e-5)
    # Through the worker's path: the payloads are the same.
    got = run_isolating(runtime, three, None, torch.float32)
    assert all(torch.equal(p.tensor, g) for p, g in zip(got, runtime.run(three)))


def test_batches_the_graphs_do_not_fit_run_eagerly(tiny_spec):
    pre = load_preprocessor(tiny_spec, "image")
    runtime = load_runtime(tiny_spec, "image")
    runtime.capture(pre.input_shape, max_batch=2, capture=False)
    calls = []
    body = runtime.graphs._body
    runtime.graphs._body = lambda b: calls.append(b) or body(b)
    batch = _batch(pre, [png_bytes(50, 40, seed=s) for s in range(3)])
    assert runtime.run(batch).shape[0] == 3 and calls == []  # beyond the largest bucket
    runtime.run(batch[:1])
    assert calls == [1]
    assert not runtime.graphs.fits(batch[:1, :, :8], None)  # another shape
    assert not runtime.graphs.fits(batch[:1], torch.tensor([3]))  # lengths for an encoder that takes none


def test_lengths_of_a_masking_encoder_travel_with_their_rows(hf_checkpoint):
    """Qwen2-Audio masks each clip's padding by its real length: in the static buffers each row gets its own length,
    and padding rows a valid one."""
    spec = ModelSpec.from_dir(hf_checkpoint("qwen2-audio-a"))
    pre = load_preprocessor(spec, "audio")
    assert pre.keep_length
    items = [pre(wav_bytes(s, seed=i)) for i, s in enumerate((0.4, 1.5, 0.9))]
    (_, batch), = shape_groups(list(enumerate(items)))
    lengths = batch_lengths(items)
    runtime = load_runtime(spec, "audio")
    want = runtime.run(batch, lengths)
    runtime.capture(pre.input_shape, max_batch=4, lengths=True, capture=False)
    assert runtime.graphs.lengths.tolist() == [pre.input_shape[-1]] * 4
    got = runtime.run(batch, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runtime.graphs.lengths[:3].tolist() == lengths.tolist()
    swapped = runtime.run(batch[[1, 0]], lengths[[1, 0]])
    torch.testing.assert_close(swapped, want[[1, 0]], rtol=1e-5, atol=1e-5)


def test_a_capture_that_fails_leaves_the_forward_eager(tiny_spec, caplog):
    pre = load_preprocessor(tiny_spec, "image")
    runtime = load_runtime(tiny_spec, "image")
    batch = _batch(pre, [png_bytes(50, 40, seed=s) for s in range(2)])
    want = runtime.run(batch)
    with caplog.at_level(logging.ERROR, logger="encoders.torch_runtime"):
        assert runtime.capture(pre.input_shape, 4, capture=True) is None  # no CUDA here: capturing raises
    assert runtime.graphs is None
    assert "runs eagerly" in caplog.text
    assert torch.equal(runtime.run(batch), want)


def test_the_self_check_refuses_graphs_that_compute_something_else(tiny_spec):
    """The check compares a replay with the eager forward on the same inputs: a forward that differs between two
    runs (here noise added to its output) is refused."""
    pre = load_preprocessor(tiny_spec, "image")
    runtime = load_runtime(tiny_spec, "image")
    graphs = EncoderGraphs(runtime, pre.input_shape, 2, capture=False)
    assert graphs.self_check() == 0.0
    runtime.module.register_forward_hook(lambda mod, args, out: out + torch.rand_like(out))
    with pytest.raises(RuntimeError, match="deviates"):
        graphs.self_check()
    assert torch.equal(graphs.inputs, torch.zeros_like(graphs.inputs))  # its random inputs were cleared
