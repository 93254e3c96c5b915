"""Prefix cache: time to first token of prompts that share a long beginning (a system prompt, a conversation's
earlier turns), with the backbone's prefix cache against without it.

    .venv/bin/python bench/prefix_cache.py [--shared 1024] [--own 64] [--requests 8] [--rounds 3]

In process, on the backbone engine the worker runs, on the `small` demo model on the CPU (fp32): ``--requests``
prompts, one after another, each ``--shared`` tokens every one of them begins with, then ``--own`` tokens of its
own. Two engines over the same model, one with the prefix cache and one without, take the same prompts in
alternating rounds (a round: ``--requests`` prompts, each with tokens of its own, each run to its first token
alone). The first prompt computes the beginning; every later one takes it from the cache. Prints the median time
to first token of each side and their ratio (target well under 1: a cached prompt computes only its own tokens),
and the prompt positions taken from the cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chunked import _sync, small_demo, small_demo_args  # noqa: E402


def time_to_first_token(engine, ids: list[int]) -> tuple[float, int]:
    """(ms until the prompt holds its first token, positions its prompt took from the cache)."""
    from router.messages import SamplingParams

    seq = engine.new_sequence("p", len(ids), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    engine.start(seq, ids, [])
    while not seq.output and seq.finish is None:
        engine.step([seq])
        engine.settle()
    _sync(engine.model.device)
    ms = (time.perf_counter() - t0) * 1e3
    engine.release(seq)
    return ms, seq.cached


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=int, default=1024, help="tokens every prompt begins with")
    ap.add_argument("--own", type=int, default=64, help="tokens of each prompt's own after them")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=2048, help="--max-batched-tokens (a prompt in one step)")
    small_demo_args(ap)
    args = ap.parse_args()
    from backbone.engine import Engine, load_engine

    spec, prompt = small_demo(args)
    shared = prompt(args.shared)
    cold = load_engine(spec, max_batched_tokens=args.budget, prefix_cache=False)
    # The same model and its pool's size: a second pool of its own, so neither side sees the other's blocks.
    from backbone.loader import load_shard

    model, _ = load_shard(spec.path, spec.config["text_config"])
    model.allocate_pool(cold.pool.num_blocks)
    warm = Engine(model, spec.placeholder_ids, spec.eos_token_ids, spec.max_context, max_batched_tokens=args.budget)
    time_to_first_token(cold, prompt(args.own))  # the allocator warmed on both, with prompts no other shares
    time_to_first_token(warm, prompt(args.own))
    ms: dict[str, list[float]] = {"without": [], "with": []}
    cached: list[int] = []
    for _ in range(args.rounds):
        for ids in [shared + prompt(args.own) for _ in range(args.requests)]:  # each its own tokens after the beginning
            ms["without"].append(time_to_first_token(cold, ids)[0])
            t, c = time_to_first_token(warm, ids)
            ms["with"].append(t)
            cached.append(c)
    print(f"small demo model, CPU fp32, torch threads {torch.get_num_threads()}: {args.requests} prompts of "
          f"{args.shared} shared + {args.own} own tokens, {args.rounds} rounds, each to its first token alone")
    print(f"{'prefix cache':<14}{'median TTFT ms':>16}{'max ms':>10}{'prompt positions taken from the cache':>40}")
    print(f"{'without':<14}{statistics.median(ms['without']):>16.1f}{max(ms['without']):>10.1f}{0:>40}")
    print(f"{'with':<14}{statistics.median(ms['with']):>16.1f}{max(ms['with']):>10.1f}"
          f"{f'{statistics.median(cached):.0f} (median; first prompt {cached[0]})':>40}")
    ratio = statistics.median(ms["with"]) / statistics.median(ms["without"])
    print(f"TTFT with / without the prefix cache: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
