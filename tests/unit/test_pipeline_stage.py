"""backbone/pipeline.py: the last shard answers FAILED (-1) for exactly the rows that failed, on this shard or upstream,
and real tokens for every other row. The stage runs its real layers; only the pipe's final send is captured (this
path cannot be reached from outside: shard 0 refuses the inputs that could poison a later shard)."""

from __future__ import annotations

import time

import pytest
import torch

from backbone import pipeline
from backbone.loader import load_shard
from backbone.model import Segment
from backbone.pipeline import FAILED, NO_TOKEN, StageWorker, StepTable, block_tables


@pytest.fixture(scope="module")
def halves(tiny_spec):
    text = tiny_spec.config["text_config"]
    n = text["num_hidden_layers"]
    shards = [load_shard(tiny_spec.path, text, layers)[0] for layers in (range(0, n // 2), range(n // 2, n))]
    for shard in shards:
        shard.allocate_pool(64)
    return shards


@pytest.fixture
def sent(monkeypatch):
    out: list[torch.Tensor] = []
    class Done:
        def wait(self):
            pass

    def isend(tensor, dst):
        out.append(tensor.clone())
        return Done()

    monkeypatch.setattr(pipeline.dist, "isend", isend)
    return out


def tables_for(ids_per_seq: list[list[int]]) -> list[list[int]]:
    """Disjoint block tables (as shard 0 would hand out) covering each prompt and 4 more tokens."""
    out, nxt = [], 0
    for ids in ids_per_seq:
        n = -(-(len(ids) + 4) // 16)
        out.append(list(range(nxt, nxt + n)))
        nxt += n
    return out


def first_step(first, ids_per_seq: list[list[int]], failed: list[int], sample=True) -> tuple[StepTable, torch.Tensor]:
    """What shard 0 would send for these sequences' prefill: the table and the hidden states after its layers."""
    tables = tables_for(ids_per_seq)
    segments = [Segment(t, 0, len(ids)) for t, ids in zip(tables, ids_per_seq)]
    hidden = first.forward(first.embed(torch.tensor([t for ids in ids_per_seq for t in ids])), segments)
    ints = torch.tensor([[sid, 0, len(ids), 7, sid in failed, 0, int(sample)]
                         for sid, ids in enumerate(ids_per_seq)], dtype=torch.long)
    floats = torch.tensor([[0.0, 1.0]] * len(ids_per_seq), dtype=torch.float64)
    return StepTable(ints, floats, block_tables(segments)), hidden


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


def test_rows_not_to_sample_come_back_without_a_token(halves, sent):
    """A prefill chunk that does not reach its prompt's end: the last shard runs it but samples nothing."""
    first, last = halves
    table, hidden = first_step(first, PROMPTS, failed=[], sample=False)
    table.ints[0, 6] = 1
    StageWorker(last, rank=1, world=2)._step(table, hidden)
    got = sent.pop().tolist()
    assert got[0] >= 0 and got[1:] == [NO_TOKEN, NO_TOKEN]


def test_a_row_that_fails_on_this_shard_alone_comes_back_failed(halves, sent):
    first, last = halves
    table, hidden = first_step(first, PROMPTS, failed=[])
    stage = StageWorker(last, rank=1, world=2)
    stage._step(table, hidden)
    sent.pop()
    # Next step: decode one token each; sequence 2's block table on this step points past the pool.
    ints = torch.tensor([[sid, len(ids), 1, 7, 0, 1, 1] for sid, ids in enumerate(PROMPTS)], dtype=torch.long)
    tables = table.tables.clone()
    tables[2] = last.pool.num_blocks + 3
    stage._step(StepTable(ints, table.floats, tables), torch.randn(3, last.cfg.hidden_size))
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


def test_a_shard_is_live_while_it_waits_and_not_once_a_step_outlasts_the_stall_timeout(halves, monkeypatch):
    """A pipeline shard past 0 served ``/live`` with no check at all (always 200), so an orchestrator's liveness
    probe could never catch a stuck one. Waiting for the next step is live however long the replica idles; a step in
    hand that does not end within the stall timeout (here: the rest of it never arrives) is not."""
    import threading
    import time

    from backbone.pipeline import OP_STEP

    _, last = halves
    stage = StageWorker(last, rank=1, world=2)
    header_sent, rest_sent, calls = threading.Event(), threading.Event(), []

    def recv(tensor, src):
        calls.append(tensor.shape)
        if len(calls) == 1:  # the replica idles: no header yet
            header_sent.wait(10)
            tensor.copy_(torch.tensor([OP_STEP, 1, 1, 1]))  # op, rows, tokens, table width
        elif len(calls) == 2:  # a step begun whose table never comes
            rest_sent.wait(10)
            raise RuntimeError("the pipe closed")

    monkeypatch.setattr(pipeline.dist, "recv", recv)
    runner = threading.Thread(target=lambda: pytest.raises(RuntimeError, stage.run), daemon=True)
    runner.start()
    time.sleep(0.3)
    assert stage.live(0.1)  # idle for longer than the stall timeout: still live
    header_sent.set()
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:  # the step begun: waiting for its table
        time.sleep(0.01)
    time.sleep(0.2)  # longer than the stall timeout below
    assert len(calls) == 2 and not stage.live(0.1) and stage.live(30)
    rest_sent.set()
    runner.join(10)


def test_shard_zero_finds_a_silent_shard_and_again_one_that_beats():
    from backbone.pipeline import Peers

    peers = Peers(world=3, silent_s=10.0)
    peers.observe([1, 1], now=100.0)
    peers.observe([5, 5], now=104.0)
    assert peers.ok()
    peers.observe([9, 5], now=110.0)  # shard 2's count has not moved since 104: 6 s
    assert peers.ok()
    peers.observe([13, 5], now=114.5)  # 10.5 s: frozen or gone
    assert not peers.ok() and peers.silent == 2
    peers.observe([17, 6], now=115.0)  # it beats again (SIGCONT)
    assert peers.ok() and peers.silent is None


def test_the_shards_beat_through_the_replicas_store_and_shard_zero_follows_them():
    """watch_drain on a real TCPStore: the other shard's thread beats, shard 0's thread reads the counts; while the
    beating shard is frozen (its thread makes no call), shard 0 finds it silent, and again beating once it thaws."""
    import threading

    import torch.distributed as dist

    from backbone.pipeline import DrainLink, Peers, watch_drain
    from cache.embedded import free_port

    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, None, is_master=True, wait_for_workers=False)
    url = f"tcp://127.0.0.1:{port}"
    thawed = threading.Event()
    thawed.set()

    class Freezable(DrainLink):
        def beat(self, rank: int) -> None:
            thawed.wait()  # SIGSTOP: nothing runs
            super().beat(rank)

    stop0, stop1 = threading.Event(), threading.Event()
    peers = Peers(world=2, silent_s=1.0)
    watch_drain(lambda: DrainLink(url), stop0, every_s=0.1, rank=0, peers=peers)
    watch_drain(lambda: Freezable(url), stop1, every_s=0.1, rank=1)
    try:
        time.sleep(0.6)
        assert peers.ok() and int(master.add("tributary/beat/1", 0)) >= 3
        thawed.clear()
        deadline = time.monotonic() + 5
        while peers.ok() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert peers.silent == 1
        thawed.set()  # SIGCONT
        deadline = time.monotonic() + 5
        while not peers.ok() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert peers.ok()
        stop1.set()  # told to stop: shard 1 asks shard 0 to drain the replica
        assert stop0.wait(timeout=5)
    finally:
        thawed.set()
        stop0.set()
        stop1.set()
