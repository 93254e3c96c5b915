"""Backbone: decode throughput and inter-token latency of the backbone workers (real processes, real Redis) at
concurrency 1, 8 and 32 on the `small` demo model, against transformers' `generate` run one request at a time in one
process; 1 shard vs 2 pipeline shards; each shard's RSS against its share of the weights.

    .venv/bin/python bench/backbone.py [--tokens 32] [--prompt 64] [--shards 1,2] [--sync-io] [--micro-batched] \
        [--in-process]

Plans go straight onto the `gen` stream (no gateway, no encoders: text-only prompts of --prompt tokens, greedy,
ignore_eos, exactly --tokens new tokens each); token events are timestamped as they arrive on a reply stream.
Decode tokens/s counts tokens after each request's first, over the time from the first first-token to the last
token; inter-token latency is the gap between consecutive events of one request (one event per step).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def baseline_rss_mb() -> float:
    """RSS of a process that imported what a backbone worker imports, and loaded nothing."""
    code = ("import torch, transformers, redis, msgspec, safetensors; import backbone.worker, backbone.pipeline; "
            "import sys; print('ready', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    p.stdout.readline()
    mb = rss_mb(p.pid)
    p.stdin.close()
    p.wait()
    return mb


def weight_share_mb(spec, shards: int) -> list[float]:
    from backbone.loader import load_shard
    from backbone.worker import even_layers

    text = spec.config["text_config"]
    out = []
    for i in range(shards):
        shard, _ = load_shard(spec.path, text, even_layers(text["num_hidden_layers"], shards, i))
        tensors = [t for w in shard.layers for t in w.values()]
        tensors += [t for t in (shard.embed_weight, shard.norm_weight, shard.lm_head_weight) if t is not None]
        out.append(sum({id(t): t.numel() * t.element_size() for t in tensors}.values()) / 2**20)
    return out


def start_backbone(model: Path, redis_url: str, shards: int, extra: tuple[str, ...] = (), ready_timeout: float = 120
                   ) -> list[subprocess.Popen]:
    from cache.embedded import free_port
    from tests.integration.procs import start_tier

    cores = os.cpu_count() or 1
    threads = str(max(1, cores // shards))
    base = [sys.executable, "-m", "tributary.cli", "backbone", "--model", str(model), "--redis-url", redis_url,
            "--threads", threads, "--max-running", "64", "--log-level", "WARNING", *extra]
    if shards == 1:
        return [start_tier(base[3:] + [], redis_url, "backbone", timeout=ready_timeout)]
    url = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(base + ["--shard", str(i), "--num-shards", str(shards), "--dist-url", url])
             for i in range(shards - 1, 0, -1)]
    head = start_tier(base[3:] + ["--shard", "0", "--num-shards", str(shards), "--dist-url", url], redis_url,
                      "backbone", timeout=ready_timeout)
    return [head, *procs[::-1]]


def run_wave(r, keys, concurrency: int, prompt: int, tokens: int, wave: int) -> dict:
    from cache.keys import alive
    from cache.streams import fields_payload, payload_fields
    from router import messages as m

    reply = f"bench:reply:{wave}"
    r.set(alive(reply), 1, ex=600)  # act as the live gateway: workers answer only live gateways ([recovery])
    stamps: dict[str, list[float]] = {}
    pipe = r.pipeline(transaction=False)
    for i in range(concurrency):
        ids = [1] + [20 + (i * 7 + k) % 400 for k in range(prompt - 1)]
        plan = m.PromptPlan(request_id=f"w{wave}-{i}", reply_to=reply, token_ids=ids, deadline=time.time() + 600,
                            sampling=m.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
        pipe.xadd(keys.gen(), payload_fields(m.encode(plan)))
    t0 = time.perf_counter()
    pipe.execute()
    last, done, deadline = "0-0", 0, time.monotonic() + 600
    while done < concurrency:
        if time.monotonic() > deadline:
            raise RuntimeError(f"wave {wave}: {done} of {concurrency} requests finished in 600 s")
        for _, entries in r.xread({reply: last}, block=5000) or []:
            for entry_id, fields in entries:
                last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                stamps.setdefault(ev.request_id, []).extend([time.perf_counter()] * max(1, len(ev.token_ids)))
                done += ev.finish is not None
    r.delete(reply)
    firsts = [s[0] for s in stamps.values()]
    end = max(s[-1] for s in stamps.values())
    decode_tokens = sum(len(s) - 1 for s in stamps.values())
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    # Steady decode: from the last stream's first token to the first stream's last, every stream decoding (what an
    # in-process run of the full batch measures); the window before includes the staggered admissions.
    lo, hi = max(firsts), min(s[-1] for s in stamps.values())
    steady = sum(lo < t <= hi for s in stamps.values() for t in s) / (hi - lo) if hi > lo else None
    return {"tok_s": decode_tokens / (end - min(firsts)), "tok_s_steady": steady, "itl": gaps,
            "ttft": [f - t0 for f in firsts]}


def hf_one_at_a_time(spec, requests: int, prompt: int, tokens: int) -> dict:
    import torch
    from transformers import StoppingCriteria

    from models import trimodal

    lm = trimodal.load_language_model(spec.path, spec.config)

    class Stamp(StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kw):
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    gaps, decode_tokens, decode_s = [], 0, 0.0
    for i in range(requests):
        ids = torch.tensor([[1] + [20 + (i * 7 + k) % 400 for k in range(prompt - 1)]])
        stamp = Stamp()
        with torch.inference_mode():
            lm.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, stopping_criteria=[stamp],
                        pad_token_id=0)
        gaps += [b - a for a, b in zip(stamp.t, stamp.t[1:])]
        decode_tokens += len(stamp.t) - 1
        decode_s += stamp.t[-1] - stamp.t[0]
    return {"tok_s": decode_tokens / decode_s, "itl": gaps}


def in_process(spec, concurrency: int, prompt: int, tokens: int, threads: int) -> dict:
    """The same requests through the backbone engine in this process (no Redis, no worker loop): decode tokens/s
    from the first step that found every prompt done, as the worker's figure counts it, and the step time."""
    import torch

    from backbone.engine import load_engine
    from router import messages as m
    from router.lifecycle import tune_allocator

    tune_allocator()  # as every worker process does (else its page faults would be counted against the engine)
    torch.set_num_threads(threads)  # what one worker process gets
    engine = load_engine(spec, max_running=max(16, concurrency), prefix_cache=False)
    seqs = []
    for i in range(concurrency):
        ids = [1] + [20 + (i * 7 + k) % 400 for k in range(prompt - 1)]
        seq = engine.new_sequence(f"ip{i}", len(ids), m.SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                       ignore_eos=True))
        engine.start(seq, ids, [])
        seqs.append(seq)
    while any(not s.output for s in seqs):
        engine.step(seqs)
    t0, steps, produced = time.perf_counter(), 0, sum(len(s.output) for s in seqs)
    while any(s.finish is None for s in seqs):
        engine.step([s for s in seqs if s.finish is None])
        steps += 1
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(os.cpu_count() or 1)
    return {"tok_s": (sum(len(s.output) for s in seqs) - produced) / elapsed, "step_ms": 1e3 * elapsed / steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--sync-io", action="store_true",
                    help="also run 1 shard with --sync-io (each step's Redis round trip between steps)")
    ap.add_argument("--in-process", action="store_true",
                    help="also run the same requests through the engine in this process (no Redis, no worker loop)")
    ap.add_argument("--micro-batched", action="store_true",
                    help="also run 2 shards with --micro-batches 2 (two pipeline steps in flight; on CPUs the "
                         "default is one)")
    args = ap.parse_args(argv)

    import redis
    import torch

    from cache.embedded import EmbeddedRedis
    from cache.keys import Keys
    from models.demo import write_demo_model
    from models.spec import ModelSpec

    if not (args.model_dir / "model.safetensors").exists():
        write_demo_model(args.model_dir, "small")
    spec = ModelSpec.from_dir(args.model_dir)
    conc = [int(c) for c in args.concurrency.split(",")]
    shard_counts = [int(s) for s in args.shards.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.time()
    hf = hf_one_at_a_time(spec, 4, args.prompt, args.tokens)
    results, rss, loaded = {}, {}, {}
    with EmbeddedRedis(maxmemory="512mb") as server:
        r = redis.Redis.from_url(server.url, socket_timeout=120)
        configs = [(shards, (), f"{shards} shard(s)") for shards in shard_counts]
        if args.sync_io:
            configs.append((1, ("--sync-io",), "1 shard(s), sync I/O"))
        if args.micro_batched:
            configs.append((2, ("--micro-batches", "2"), "2 shard(s), 2 micro-batches"))
        for shards, extra, label in configs:
            r.flushall()
            procs = start_backbone(args.model_dir, server.url, shards, extra)
            loaded[shards] = [rss_mb(p.pid) for p in procs]  # weights loaded, no traffic yet
            try:
                run_wave(r, Keys(), 2, args.prompt, 4, wave=-shards - 10 * len(extra))  # warm-up
                for c in conc:
                    results[(label, c)] = run_wave(r, Keys(), c, args.prompt, args.tokens,
                                                   wave=shards * 100 + c + 1000 * len(extra))
                if not extra:
                    rss[shards] = [rss_mb(p.pid) for p in procs]
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(60)
    inproc = {c: in_process(spec, c, args.prompt, args.tokens, os.cpu_count() or 1)
              for c in conc} if args.in_process else {}
    base = baseline_rss_mb()
    cores = os.cpu_count()
    print(f"backbone: demo-small ({spec.config['text_config']['num_hidden_layers']} layers), prompt {args.prompt} "
          f"tokens, {args.tokens} new tokens each, greedy, {cores} cores, torch {torch.__version__}")
    print(f"{'config':<28}{'decode tok/s':>14}{'x generate':>12}{'ITL p50 ms':>12}{'ITL p99 ms':>12}")
    print(f"{'transformers generate, 1-at-a-time':<28}{hf['tok_s']:>14.1f}{1.0:>12.2f}"
          f"{1e3 * pct(hf['itl'], .5):>12.2f}{1e3 * pct(hf['itl'], .99):>12.2f}")
    for (label, c), res in results.items():
        print(f"{f'tributary {label}, conc {c}':<28}{res['tok_s']:>14.1f}{res['tok_s'] / hf['tok_s']:>12.2f}"
              f"{1e3 * pct(res['itl'], .5):>12.2f}{1e3 * pct(res['itl'], .99):>12.2f}")
    for c, res in inproc.items():
        print(f"{f'in-process engine, conc {c}':<28}{res['tok_s']:>14.1f}{res['tok_s'] / hf['tok_s']:>12.2f}"
              f"{res['step_ms']:>12.2f}{'':>12}")
    one, two, sync, micro = "1 shard(s)", "2 shard(s)", "1 shard(s), sync I/O", "2 shard(s), 2 micro-batches"
    for c, res in inproc.items():
        if (one, c) in results:
            print(f"worker (Redis, overlapped round trips) / in-process engine, conc {c}: decode tok/s "
                  f"{results[(one, c)]['tok_s'] / res['tok_s']:.2f}x; worker ITL p50 / in-process step "
                  f"{1e3 * pct(results[(one, c)]['itl'], .5) / res['step_ms']:.2f}x")
    if (one, 8) in results:
        ratio = results[(one, 8)]["tok_s"] / hf["tok_s"]
        print(f"\nconcurrency 8 vs one-at-a-time generate: {ratio:.2f}x "
              f"(target >= 3x: {'met' if ratio >= 3 else 'MISSED'})")
    for c in conc:
        if (one, c) in results and (sync, c) in results:
            print(f"overlapped / synchronous round trips, conc {c}: decode tok/s "
                  f"{results[(one, c)]['tok_s'] / results[(sync, c)]['tok_s']:.2f}x, ITL p50 "
                  f"{pct(results[(one, c)]['itl'], .5) / pct(results[(sync, c)]['itl'], .5):.2f}x")
    for c in conc:
        if (two, c) in results and (micro, c) in results:
            print(f"2 shards, 2 micro-batches / one step in flight, conc {c}: decode tok/s "
                  f"{results[(micro, c)]['tok_s'] / results[(two, c)]['tok_s']:.2f}x, ITL p99 "
                  f"{pct(results[(micro, c)]['itl'], .99) / pct(results[(two, c)]['itl'], .99):.2f}x")
        if (one, c) in results and (two, c) in results and c > 1:
            ratio = results[(two, c)]["tok_s"] / results[(one, c)]["tok_s"]
            print(f"2 shards / 1 shard, conc {c}: decode tok/s {ratio:.2f}x")
    if (one, 1) in results and (two, 1) in results:
        step = pct(results[(two, 1)]["itl"], .5) / pct(results[(one, 1)]["itl"], .5)
        print(f"2 shards / 1 shard, per decode step at concurrency 1 (ITL p50): {step:.2f}x "
              f"(target <= 1.3x: {'met' if step <= 1.3 else 'MISSED'})")
    print(f"\nRSS (MB): a process that only imported the same libraries: {base:.0f}")
    for shards, values in rss.items():
        shares = weight_share_mb(spec, shards)
        for i, (mb, idle, share) in enumerate(zip(values, loaded[shards], shares)):
            growth = idle - base
            ok = growth <= 1.2 * share + 100
            print(f"  {shards} shard(s), shard {i}: RSS loaded {idle:.0f} (growth {growth:.0f} vs weight share "
                  f"{share:.0f}; target <= 1.2 x share + 100 = {1.2 * share + 100:.0f}: {'met' if ok else 'MISSED'}), "
                  f"after the runs {mb:.0f} (heap kept for activations and KV, see router/lifecycle.tune_allocator)")
    print(f"\ntotal bench time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
