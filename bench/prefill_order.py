"""Prefill order: a short prompt's time to first token when it arrives behind long ones, shortest remaining prefill
first (the scheduler's order) against oldest first.

    .venv/bin/python bench/prefill_order.py [--long 3] [--prompt 1200] [--short 32] [--budget 256]

In process, on the backbone engine the worker runs, on the `small` demo model on the CPU (fp32): ``--long`` prompts
of ``--prompt`` tokens arrive together; one step later a prompt of ``--short`` tokens arrives. Each mode steps the
engine until every prompt has its first token and prints, per prompt, the steps and milliseconds from its arrival
to its first token. Oldest first is the same engine with the aging guard at 0 steps (every prompt counts as aged,
and the aged go oldest first). The figures are the ratios of the two modes in one run: the short prompt's TTFT
(target well under 1), and the long prompts' mean TTFT (what the short one costs them: about 1).
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


def first_tokens(engine, longs: list[list[int]], short: list[int]) -> dict[str, tuple[int, float]]:
    """Per prompt ("long0".., "short"): (steps, ms) from its arrival until it holds its first token."""
    from router.messages import SamplingParams

    device = engine.model.device
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seqs: dict[str, object] = {}
    arrived: dict[str, tuple[int, float]] = {}
    first: dict[str, tuple[int, float]] = {}

    def arrive(name: str, ids: list[int], step: int) -> None:
        seq = engine.new_sequence(name, len(ids), params)
        engine.start(seq, ids, [])
        seqs[name] = seq
        arrived[name] = (step, time.perf_counter())

    for i, ids in enumerate(longs):
        arrive(f"long{i}", ids, 0)
    step = 0
    while len(first) < len(longs) + 1:
        if step == 1:
            arrive("short", short, step)
        engine.step([s for n, s in seqs.items() if n not in first])
        engine.settle()  # this step's tokens applied now: the first token is counted at the step that made it
        _sync(device)
        step += 1
        now = time.perf_counter()
        for name, seq in seqs.items():
            if name not in first and seq.output:
                first[name] = (step - arrived[name][0], (now - arrived[name][1]) * 1e3)
    for seq in seqs.values():
        engine.release(seq)
    return first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=1200)
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--budget", type=int, default=256, help="--max-batched-tokens")
    small_demo_args(ap)
    args = ap.parse_args()
    from backbone.engine import load_engine

    spec, prompt = small_demo(args)
    longs = [prompt(args.prompt) for _ in range(args.long)]
    short = prompt(args.short)
    engine = load_engine(spec, max_batched_tokens=args.budget, max_running=args.long + 1, prefix_cache=False)
    first_tokens(engine, longs[:1], short)  # warm the allocator
    rows = {}
    for mode, aging in (("oldest first", 0), ("shortest first", engine.aging_steps)):
        engine.aging_steps = aging  # 0: every prompt counts as aged (the aged go oldest first)
        rows[mode] = first_tokens(engine, longs, short)
    print(f"small demo model, CPU fp32, torch threads {torch.get_num_threads()}, --max-batched-tokens "
          f"{args.budget}: {args.long} prompts of {args.prompt} tokens, then one of {args.short} a step later")
    print(f"{'mode':<16}{'short: steps':>14}{'ms':>9}{'long mean: steps':>18}{'ms':>9}{'long max ms':>13}")
    for mode, r in rows.items():
        long_steps = statistics.mean(r[f"long{i}"][0] for i in range(args.long))
        long_ms = [r[f"long{i}"][1] for i in range(args.long)]
        print(f"{mode:<16}{r['short'][0]:>14}{r['short'][1]:>9.1f}{long_steps:>18.1f}{statistics.mean(long_ms):>9.1f}"
              f"{max(long_ms):>13.1f}")
    old, new = rows["oldest first"], rows["shortest first"]
    mean_ms = {m: statistics.mean(r[f"long{i}"][1] for i in range(args.long)) for m, r in rows.items()}
    print(f"short prompt TTFT shortest/oldest first: {new['short'][1] / old['short'][1]:.2f}x "
          f"({new['short'][0]} vs {old['short'][0]} steps); long prompts' mean TTFT: "
          f"{mean_ms['shortest first'] / mean_ms['oldest first']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
