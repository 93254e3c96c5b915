"""tributary up's CPU budget: the processes' threads add up to the cores (or to one each when there are more
processes than cores), and each child is started with its share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tributary.cluster import THREAD_VARS, Cluster, CpuBudget


@pytest.mark.parametrize("cores,encoders,backbone,want", [
    (2, 2, 1, (1, 1)),  # 3 compute processes on 2 cores: one thread each, shared
    (4, 2, 1, (1, 2)),
    (8, 2, 1, (2, 4)),
    (16, 2, 2, (2, 6)),  # two shards
    (16, 1, 1, (5, 11)),  # LLaVA: an image tier only
    (3, 2, 1, (1, 1)),
])
def test_the_split(cores, encoders, backbone, want):
    b = CpuBudget.split(cores, encoders, backbone)
    assert (b.encoder, b.backbone) == want
    total = b.encoder * encoders + b.backbone * backbone
    assert total <= cores or (b.oversubscribed and total == encoders + backbone)
    assert b.oversubscribed == (encoders + backbone > cores)
    assert f"{cores} cores" in b.describe()


def test_children_get_their_share_as_flags_and_thread_pools(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cluster = Cluster(Path("/m"), "redis://r", shards=1)
    argv = {}
    for group in cluster.groups():
        for child in group.make():
            argv[child.name] = (child.argv, child.env)
    enc_argv, enc_env = argv["encoder:image"]
    assert enc_argv[enc_argv.index("--threads") + 1] == "2"
    assert enc_argv[enc_argv.index("--preprocess-threads") + 1] == "2"
    assert all(enc_env[v] == "2" for v in THREAD_VARS)
    bb_argv, bb_env = argv["backbone"]
    assert bb_argv[bb_argv.index("--threads") + 1] == "4" and bb_env["OMP_NUM_THREADS"] == "4"
    assert argv["gateway"][1]["OMP_NUM_THREADS"] == "1" and "--threads" not in argv["gateway"][0]
    assert all(env["TRIBUTARY_REDIS_URL"] == "redis://r" and "redis://r" not in argv_
               for argv_, env in argv.values())  # the URL by environment, never on a command line
    off = Cluster(Path("/m"), "redis://r", cpu_budget=False)
    for group in off.groups():
        for child in group.make():
            assert "--threads" not in child.argv and "OMP_NUM_THREADS" not in child.env
