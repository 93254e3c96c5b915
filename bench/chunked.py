"""Chunked prefill: how long running streams stall when long prompts arrive, chunked vs unchunked.

    .venv/bin/python bench/chunked.py [--streams 3] [--arrivals 3] [--prompt 1200] [--budget 256]

In process, on the backbone engine the worker runs (paged KV, one attention call per layer, the scheduler), on the
`small` demo model on the CPU (fp32): ``--streams`` sequences decode; after 10 quiet steps ``--arrivals`` prompts
of ``--prompt`` tokens arrive together. Every engine step gives each running stream one token (decodes are scheduled
first), so a stream's inter-token latency is the step's wall time. Printed per mode: the quiet ITL p50, then while
the prompts are prefilled the longest stall (the worst ITL), ITL p99 and how many steps the prefill took;
unchunked is ``--max-batched-tokens`` large enough for every prompt at once, chunked is ``--budget``. The ratio of
the longest stalls is the figure (target <= 0.5).

``arrival_itl`` is shared with bench/gpu.py (its 16-stream, 8 LLaVA-prompt row).
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arrival_itl(engine, streams: list[list[int]], arrivals: list[tuple[list[int], list]], quiet_steps: int = 10,
                after_steps: int = 5) -> dict:
    """Decode ``streams``, then let ``arrivals`` (token ids, media rows) arrive; step until each arrival has its
    first token plus ``after_steps``. Returns quiet ITL p50, and for the arrival window the worst ITL, ITL p99 and
    the steps until every arrival had its first token (ms)."""
    from router.messages import SamplingParams

    device = engine.model.device
    budget = quiet_steps + 10_000
    running = []
    for i, ids in enumerate(streams):
        seq = engine.new_sequence(f"s{i}", len(ids), SamplingParams(max_tokens=budget, temperature=0.0,
                                                                    ignore_eos=True))
        engine.prefill(seq, ids, [])
        running.append(seq)

    def timed_step(seqs) -> float:
        _sync(device)
        t = time.perf_counter()
        engine.step(seqs)
        _sync(device)
        return (time.perf_counter() - t) * 1e3

    quiet = [timed_step(running) for _ in range(quiet_steps)]
    new = []
    for i, (ids, media) in enumerate(arrivals):
        seq = engine.new_sequence(f"a{i}", len(ids), SamplingParams(max_tokens=after_steps + 1, temperature=0.0,
                                                                    ignore_eos=True))
        engine.start(seq, ids, media)
        new.append(seq)
    window, prefill_steps = [], 0
    while any(s.finish is None for s in new):
        before = [len(s.output) for s in running]
        window.append(timed_step(running + new))
        assert [len(s.output) for s in running] == [b + 1 for b in before], "a running stream did not advance"
        if any(not s.output for s in new):
            prefill_steps += 1
    for seq in running + new:
        engine.release(seq)
    window.sort()
    return {"quiet_p50_ms": statistics.median(quiet), "worst_ms": window[-1],
            "p99_ms": window[min(len(window) - 1, int(0.99 * len(window)))],
            "p50_ms": statistics.median(window), "prefill_steps": prefill_steps + 1}


def small_demo_args(ap: argparse.ArgumentParser) -> None:
    """The arguments of the in-process engine benches on the `small` demo model (this one, bench/prefill_order.py)."""
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"))


def small_demo(args):
    """(spec, prompt) for ``small_demo_args``' arguments: the `small` demo model (written on first use), torch's
    threads set; ``prompt(n)``: n random token ids after BOS, seeded (the same prompts every run)."""
    from models.demo import write_demo_model
    from models.spec import ModelSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model_dir / "model.safetensors").exists():
        write_demo_model(args.model_dir, "small")
    spec = ModelSpec.from_dir(args.model_dir)
    vocab = spec.config["text_config"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    return spec, lambda n: [1] + torch.randint(5, vocab, (n - 1,), generator=gen).tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--arrivals", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=1200)
    ap.add_argument("--budget", type=int, default=256, help="chunked mode's --max-batched-tokens")
    small_demo_args(ap)
    args = ap.parse_args()
    from backbone.engine import load_engine

    spec, prompt = small_demo(args)
    streams = [prompt(32) for _ in range(args.streams)]
    arrivals = [(prompt(args.prompt), []) for _ in range(args.arrivals)]
    rows = {}
    unchunked = args.arrivals * args.prompt + args.streams
    for name, budget in (("unchunked", unchunked), ("chunked", args.budget)):
        engine = load_engine(spec, max_batched_tokens=budget, max_running=args.streams + args.arrivals,
                             prefix_cache=False)
        arrival_itl(engine, streams, arrivals[:1], quiet_steps=3, after_steps=1)  # warm the allocator
        rows[name] = arrival_itl(engine, streams, arrivals)
    print(f"small demo model, CPU fp32, torch threads {torch.get_num_threads()}: {args.streams} streams decoding, "
          f"{args.arrivals} prompts of {args.prompt} tokens arrive together")
    print(f"{'mode':<11}{'budget':>8}{'quiet ITL p50':>15}{'worst stall':>13}{'ITL p99':>10}{'ITL p50':>10}"
          f"{'prefill steps':>15}   (ms)")
    for name, budget in (("unchunked", unchunked), ("chunked", args.budget)):
        r = rows[name]
        print(f"{name:<11}{budget:>8}{r['quiet_p50_ms']:>15.1f}{r['worst_ms']:>13.1f}{r['p99_ms']:>10.1f}"
              f"{r['p50_ms']:>10.1f}{r['prefill_steps']:>15}")
    print(f"worst stall chunked / unchunked: {rows['chunked']['worst_ms'] / rows['unchunked']['worst_ms']:.2f}x "
          f"(target <= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
