"""CPU budget: ``tributary up`` with each process on its share of the cores vs every process on every core.

    .venv/bin/python bench/cpu_budget.py [--requests 24] [--concurrency 4]   # ~2 min on 2 cores

Two local clusters on the ``small`` demo model, one after the other on the same machine (``--cpu-budget auto``,
then ``off``), each warmed up, then the same workload: ``--requests`` streamed chat completions at
``--concurrency``, each with a fresh 96x96 PNG (an image encode each) and every other one with a 1 s WAV, 16 tokens
each (``ignore_eos``). Prints time to first token (p50, p99) and generated tokens per second for both, and
budget / off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.media import b64, data_url, png_bytes, wav_bytes  # noqa: E402


def one(client, model: str, i: int, seed: int) -> tuple[float, int]:
    content = [{"type": "text", "text": "Describe it."},
               {"type": "image_url", "image_url": {"url": data_url(png_bytes(96, 96, seed=seed + i))}}]
    if i % 2:
        content.append({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(1.0, seed=seed + i)),
                                                                "format": "wav"}})
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            max_tokens=16, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft or time.perf_counter() - t0, tokens


def run(model_dir: Path, budget: str, requests: int, concurrency: int, seed: int) -> dict:
    from openai import OpenAI

    from cache.embedded import EmbeddedRedis
    from tests.e2e.conftest import local_cluster

    with EmbeddedRedis(maxmemory="1gb") as server, tempfile.TemporaryDirectory() as tmp:
        with local_cluster(model_dir, server.url, Path(tmp), "--cpu-budget", budget) as c:
            c.wait_ready()
            client = OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
            with ThreadPoolExecutor(concurrency) as pool:  # warm-up: every tier once
                list(pool.map(lambda i: one(client, c.model, i, seed + 10_000), range(concurrency)))
                t0 = time.perf_counter()
                results = list(pool.map(lambda i: one(client, c.model, i, seed), range(requests)))
                wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {"p50": statistics.median(ttfts), "p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "tok_s": sum(r[1] for r in results) / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"))
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)

    from models.demo import write_demo_model
    from tributary.cluster import CpuBudget

    if not (args.model_dir / "model.safetensors").exists():
        write_demo_model(args.model_dir, "small")
    import os

    print(CpuBudget.split(os.cpu_count() or 1, 2, 1).describe())
    rows = {budget: run(args.model_dir, budget, args.requests, args.concurrency, seed=100 + 1000 * k)
            for k, budget in enumerate(("auto", "off"))}
    print(f"{args.requests} requests at concurrency {args.concurrency} (image each, audio every other, 16 tokens)")
    print(f"{'':>14}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'tokens/s':>10}")
    for budget, r in rows.items():
        print(f"{'budget ' + budget:>14}{1e3 * r['p50']:>13.0f}{1e3 * r['p99']:>13.0f}{r['tok_s']:>10.1f}")
    a, o = rows["auto"], rows["off"]
    print(f"{'auto / off':>14}{a['p50'] / o['p50']:>13.2f}{a['p99'] / o['p99']:>13.2f}{a['tok_s'] / o['tok_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
