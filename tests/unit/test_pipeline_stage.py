"""backbone/pipeline.py: the last shard answers FAILED (-1) for exactly the rows that failed, on this shard or upstream,
and real tokens for every other row. The stage runs its real layers; only the pipe's final send is captured (this
path cannot be reached from outside: shard 0 refuses the inputs that could poison a later shard)."""

from __future__ import annotations

import pytest
import torch

from backbone import pipeline
from backbone.loader import load_shard
from backbone.pipeline import FAILED, StageWorker, StepTable


@pytest.fixture(scope="module")
def halves(tiny_spec):
    text = tiny_spec.config["text_config"]
    n = text["num_hidden_layers"]
    return (load_shard(tiny_spec.path, text, range(0, n // 2))[0], load_shard(tiny_spec.path, text, range(n // 2, n))[0])


@pytest.fixture
def sent(monkeypatch):
    out: list[torch.Tensor] = []
    monkeypatch.setattr(pipeline.dist, "send", lambda tensor, dst: out.append(tensor.clone()))
    return out


def first_step(first, ids_per_seq: list[list[int]], failed: list[int]) -> tuple[StepTable, torch.Tensor]:
    """What shard 0 would send for these sequences' prefill: the table and the hidden states after its layers."""
    caches = [first.new_cache(len(ids) + 4) for ids in ids_per_seq]
    from backbone.model import Segment

    segments = [Segment(c, 0, len(ids)) for c, ids in zip(caches, ids_per_seq)]
    hidden = first.forward(first.embed(torch.tensor([t for ids in ids_per_seq for t in ids])), segments)
    ints = torch.tensor([[sid, 0, len(ids), len(ids) + 4, 7, sid in failed, 0]
                         for sid, ids in enumerate(ids_per_seq)], dtype=torch.long)
    floats = torch.tensor([[0.0, 1.0]] * len(ids_per_seq), dtype=torch.float64)
    return StepTable(ints, floats, torch.empty(0, dtype=torch.long)), hidden


PROMPTS = [[1, 20, 21, 22], [1, 30, 31], [1, 40, 41, 42, 43]]


def test_rows_flagged_upstream_come_back_failed_and_the_others_sample(halves, sent):
    first, last = halves
    stage = StageWorker(last, rank=1, world=2)
    table, hidden = first_step(first, PROMPTS, failed=[])
    stage._step(table, hidden)
    clean = sent.pop()
    assert (clean >= 0).all()
    stage2 = StageWorker(last, rank=1, world=2)
    table, hidden = first_step(first, PROMPTS, failed=[1])
    stage2._step(table, hidden)
    got = sent.pop()
    assert got.tolist() == [clean[0].item(), FAILED, clean[2].item()]


def test_a_row_that_fails_on_this_shard_alone_comes_back_failed(halves, sent):
    first, last = halves
    table, hidden = first_step(first, PROMPTS, failed=[])
    stage = StageWorker(last, rank=1, world=2)
    stage._step(table, hidden)  # the prefill step creates the caches
    sent.pop()
    # Next step: decode one token each; sequence 2's cache on this shard is too small to take it.
    stage.caches[2].k[0] = stage.caches[2].k[0][:, :1]
    ints = torch.tensor([[sid, len(ids), 1, len(ids) + 4, 7, 0, 1] for sid, ids in enumerate(PROMPTS)],
                        dtype=torch.long)
    step = StepTable(ints, table.floats, torch.empty(0, dtype=torch.long))
    stage._step(step, torch.randn(3, last.cfg.hidden_size))
    got = sent.pop()
    assert got[2].item() == FAILED and (got[:2] >= 0).all()


def test_hidden_states_go_over_nccl_only_between_shards_on_their_own_gpus():
    from backbone.pipeline import device_identity, hop_backend

    gpu = lambda n: (1, n, -n)  # noqa: E731  (kind, uuid high, uuid low)
    assert hop_backend([gpu(1), gpu(2), gpu(3)], nccl_available=True) == "nccl"
    assert hop_backend([gpu(1), gpu(2)], nccl_available=False) == "gloo"  # a torch built without NCCL
    assert hop_backend([gpu(1), gpu(1)], nccl_available=True) == "gloo"  # two shards on one GPU
    assert hop_backend([gpu(1), (0, 0, 0)], nccl_available=True) == "gloo"  # a shard on a CPU
    assert hop_backend([gpu(1), (2, 0, 0)], nccl_available=True) == "gloo"  # a GPU without a UUID
    assert device_identity(torch.device("cpu")) == [0, 0, 0]
    if torch.cuda.is_available():
        kind, high, low = device_identity(torch.device("cuda"))
        assert kind == 1 and (high, low) != (0, 0)
