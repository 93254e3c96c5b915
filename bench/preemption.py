"""Preemption policy under KV pressure: a preempted sequence parked until its whole length and a block per decode
fit, with no new sequence admitted ahead of it (the scheduler's policy), against recomputing it as soon as a block is
free with new sequences admitted whenever their prompt fits (the policy an outside tester found thrashing).

    .venv/bin/python bench/preemption.py [--requests 24] [--blocks 40] [--gap 3] [--size tiny]

In process, on the backbone engine the worker runs, on a demo model on the CPU (fp32), with a KV pool of ``--blocks``
blocks of 16 tokens: ``--requests`` requests (seeded prompts of 16-96 tokens, 32-160 greedy tokens each) arrive one
every ``--gap`` steps on average (the same seeded arrival steps for both policies), and are started in arrival order
as the worker starts them (a slot free, the prompt admissible). Each policy runs the same workload twice, alternately;
the figures are the second runs. Printed per policy: wall time, decode tokens per second, steps, prompt positions
computed (prefill plus recompute) per prompt token, preemptions (and the most of one request), and per request the
latency from arrival to its last token and to its first token (p50, p99, in steps and ms); then the ratios
parked / eager (latencies in ms, whose noise on a shared machine is large, and in steps, which are deterministic:
the same workload gives the same steps every run), and how many requests' tokens differ between the two (greedy:
none should, up to a near tie).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def workload(n: int, gap: float, vocab: int, seed: int) -> list[tuple[int, list[int], int]]:
    """(arrival step, prompt ids, max_tokens) per request, seeded."""
    rng = random.Random(seed)
    out, step = [], 0.0
    for _ in range(n):
        out.append((int(step), [1] + [rng.randrange(5, vocab) for _ in range(rng.randint(15, 95))],
                    rng.randint(32, 160)))
        step += rng.expovariate(1 / gap) if gap > 0 else 0
    return out


def run(engine, reqs, max_running: int, limit: int = 200_000) -> dict:
    """Drive the engine as the worker does: arrivals join a queue, started in order while a slot is free and the
    engine admits the prompt; one step over everything running. Returns the figures and each request's tokens."""
    from router.messages import SamplingParams

    engine.preemptions, engine.positions, engine.steps = 0, [0, 0], 0
    pending = deque(enumerate(reqs))
    waiting: deque = deque()
    running: dict[int, object] = {}
    arrived: dict[int, tuple[int, float]] = {}
    first: dict[int, tuple[int, float]] = {}
    done: dict[int, tuple[int, float]] = {}
    outputs: dict[int, list[int]] = {}
    most = 0
    step, t0 = 0, time.perf_counter()
    while len(done) < len(reqs):
        now = time.perf_counter()
        while pending and pending[0][1][0] <= step:
            i, req = pending.popleft()
            waiting.append((i, req))
            arrived[i] = (step, now)
        starting = []
        while waiting and len(running) + len(starting) < max_running:
            i, (_, ids, budget) = waiting[0]
            seq = engine.new_sequence(f"r{i}", len(ids), SamplingParams(max_tokens=budget, temperature=0.0,
                                                                        ignore_eos=True))
            if not engine.fits_pool(seq):
                raise SystemExit(f"request {i} needs more than the whole pool: raise --blocks")
            if not engine.admissible(seq):
                break
            waiting.popleft()
            starting.append((seq, engine.start(seq, ids, [])))
            running[i] = seq
        if running:
            engine.step(list(running.values()), starting)  # those starting are among them: counted once
            engine.settle()
        step += 1
        if step > limit:
            raise SystemExit("the scheduler stopped making progress")
        now = time.perf_counter()
        for i, seq in list(running.items()):
            if i not in first and seq.output:
                first[i] = (step, now)
            if seq.finish is not None:
                done[i], outputs[i] = (step, now), list(seq.output)
                most = max(most, seq.preempted)
                del running[i]
    wall = time.perf_counter() - t0
    lat = [(done[i][0] - arrived[i][0], (done[i][1] - arrived[i][1]) * 1e3) for i in done]
    ttft = [(first[i][0] - arrived[i][0], (first[i][1] - arrived[i][1]) * 1e3) for i in done]
    prompt_tokens = sum(len(ids) for _, ids, _ in reqs)
    return {"wall": wall, "steps": step, "tok_s": engine.positions[0] / wall,
            "prompt_ratio": engine.positions[1] / prompt_tokens, "preemptions": engine.preemptions, "most": most,
            "lat": lat, "ttft": ttft, "outputs": outputs}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--blocks", type=int, default=40, help="KV pool blocks of 16 tokens")
    ap.add_argument("--gap", type=float, default=3.0, help="mean steps between arrivals (0: all at once)")
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--budget", type=int, default=256, help="--max-batched-tokens")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model-dir", type=Path, default=None)
    args = ap.parse_args()
    from backbone.engine import load_engine
    from models.demo import write_demo_model
    from models.spec import ModelSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or Path(f"/tmp/tributary-bench/demo-{args.size}")
    if not (model_dir / "model.safetensors").exists():
        write_demo_model(model_dir, args.size)
    spec = ModelSpec.from_dir(model_dir)
    engine = load_engine(spec, max_batched_tokens=args.budget, max_running=args.max_running, num_blocks=args.blocks,
                         prefix_cache=False)
    reqs = workload(args.requests, args.gap, spec.config["text_config"]["vocab_size"], args.seed)
    results: dict[str, dict] = {}
    for _ in range(2):  # alternately; the second run of each is kept (the first warms the allocator)
        for name, park in (("parked", True), ("eager", False)):
            engine.park_preempted = park
            results[name] = run(engine, reqs, args.max_running)
    engine.park_preempted = True
    print(f"{args.size} demo model, CPU fp32, torch threads {torch.get_num_threads()}: {args.requests} requests "
          f"(16-96 prompt + 32-160 greedy tokens), one every {args.gap} steps on average, KV pool {args.blocks} blocks "
          f"x 16 tokens, max running {args.max_running}, --max-batched-tokens {args.budget}")
    print(f"{'policy':<8}{'wall s':>8}{'tok/s':>8}{'steps':>7}{'prompt x':>9}{'preempt':>8}{'most':>5}"
          f"{'lat p50 st/ms':>16}{'lat p99 st/ms':>16}{'ttft p50 st/ms':>16}{'ttft p99 st/ms':>16}")
    for name, r in results.items():
        cols = []
        for key in ("lat", "ttft"):
            for q in (50, 99):
                cols.append(f"{pct([s for s, _ in r[key]], q):.0f}/{pct([ms for _, ms in r[key]], q):.0f}")
        print(f"{name:<8}{r['wall']:>8.2f}{r['tok_s']:>8.1f}{r['steps']:>7}{r['prompt_ratio']:>9.2f}"
              f"{r['preemptions']:>8}{r['most']:>5}" + "".join(f"{c:>16}" for c in cols))
    p, e = results["parked"], results["eager"]
    differ = sum(p["outputs"][i] != e["outputs"][i] for i in p["outputs"])

    def ratio(key: str, q: int) -> str:  # in ms (the machine's noise in it) / in steps (deterministic)
        ms = pct([v for _, v in p[key]], q) / pct([v for _, v in e[key]], q)
        steps = pct([v for v, _ in p[key]], q) / pct([v for v, _ in e[key]], q)
        return f"{ms:.2f}x/{steps:.2f}x"

    print(f"parked / eager: throughput {p['tok_s'] / e['tok_s']:.2f}x, wall {p['wall'] / e['wall']:.2f}x, steps "
          f"{p['steps'] / e['steps']:.2f}x, prompt positions {p['prompt_ratio'] / e['prompt_ratio']:.2f}x, "
          f"preemptions {p['preemptions']} vs {e['preemptions']}; in ms/steps: latency p50 {ratio('lat', 50)} p99 "
          f"{ratio('lat', 99)}, TTFT p50 {ratio('ttft', 50)} p99 {ratio('ttft', 99)}; requests whose tokens differ "
          f"between the policies: {differ} of {len(p['outputs'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
