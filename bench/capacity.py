"""The capacity model (``tributary plan --workload``) against ``tributary up --autoscale`` on this machine.

    .venv/bin/python bench/capacity.py [--levels 0.3,0.6] [--seconds 40] [--size 384] [--tokens 4]   # ~4 min

One local cluster on the ``small`` demo model with the image tier autoscaled (1 to 3 workers, ``--autoscale-idle-cores
0`` so that the policy alone decides, as on a machine with cores to spare):

1. **Calibrate** (quiet, one request at a time): the prefill rate and the gateway's own time from text prompts of two
   lengths (time to first token), the image encoder's busy time per image from a fresh image vs the same image again
   (a cache hit), the same for a 10 s audio clip, the decode step at 1 and 4 running sequences (inter-token gaps),
   Redis write and read MB/s. Written to ``--rates`` (default bench/results/rates-cpu.json), the file ``tributary
   plan --rates`` reads.
2. **Two load levels**, given as fractions of what one replica per tier can carry by the model (the bottleneck's
   1 / busy time per request): Poisson arrivals of chat completions with a fresh image each (every image a miss) for
   ``--seconds``. Observed: the image tier's replicas (the autoscaler's, polled from Redis; mean over the level's
   second half, and max), time to first token (mean, p50, p90) and requests refused. Predicted by
   ``router.capacity.plan_capacity`` for the same workload and the calibrated rates: where the autoscaler's policy
   settles for the image tier, the replicas the plan would give each tier at 70 % utilization, the bottleneck, and
   the mean TTFT of the deployment as it ran (one backbone, the image workers observed).

The model assumes each replica has its own cores. Here every process shares 2 (the encoders and the backbone slow
each other down, which calibrating one request at a time does not see): the table says by how much the observed
TTFT departs from the prediction.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.media import b64, data_url, jpeg_bytes, wav_bytes  # noqa: E402

SHORT = "Hi."
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
MAX_IMAGE_WORKERS = 3


def ttft(client, model: str, content, tokens: int = 1) -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, prompt tokens) of one streamed request."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            max_tokens=tokens, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    times, prompt = [], 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            prompt = chunk.usage.prompt_tokens
    first = (times[0] if times else time.perf_counter()) - t0
    return first, [b - a for a, b in zip(times, times[1:])], prompt


def image_content(seed: int, size: int) -> list[dict]:
    return [{"type": "text", "text": SHORT},
            {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(size, size, seed=seed), "image/jpeg")}}]


def audio_content(seed: int) -> list[dict]:
    """A clip of the workload's default length (router/capacity.Workload.audio_seconds: 10 s)."""
    return [{"type": "text", "text": SHORT},
            {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(10.0, seed=seed)), "format": "wav"}}]


def calibrate(client, model: str, size: int, redis_url: str, reps: int = 7) -> tuple[dict, dict]:
    from cache.client import connect

    for i in range(3):  # warm-up
        ttft(client, model, SHORT)
        ttft(client, model, image_content(10_000 + i, size))
    short = [ttft(client, model, SHORT) for _ in range(reps)]
    long = [ttft(client, model, LONG) for _ in range(reps)]
    t_short, t_long = statistics.median(s[0] for s in short), statistics.median(s[0] for s in long)
    n_short, n_long = short[0][2], long[0][2]
    prefill = (n_long - n_short) / max(t_long - t_short, 1e-6)
    gateway = max(0.0, t_short - n_short / prefill)
    cold, hit = [], []
    for i in range(reps):
        content = image_content(20_000 + i, size)
        c, _, n_image = ttft(client, model, content)
        h, _, _ = ttft(client, model, content)
        cold.append(c)
        hit.append(h)
    image_s = max(1e-4, statistics.median(c - h for c, h in zip(cold, hit)))
    cold, hit = [], []
    for i in range(3):
        content = audio_content(30_000 + i)
        cold.append(ttft(client, model, content)[0])
        hit.append(ttft(client, model, content)[0])
    audio_s = max(1e-4, statistics.median(c - h for c, h in zip(cold, hit)))
    steps = {}
    for running in (1, 4):
        gaps = []

        def stream(seed: int) -> None:
            gaps.extend(ttft(client, model, f"Count: {seed}", tokens=24)[1])

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(running)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps[running] = statistics.median(gaps)
    r = connect(redis_url)
    blob = bytes(4_000_000)
    t0 = time.perf_counter()
    for i in range(10):
        r.set(f"bench:capacity:{i}", blob, ex=60)
    write = 40 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(10):
        r.get(f"bench:capacity:{i}")
    read = 40 / (time.perf_counter() - t0)
    rates = {"image_s_per_item": image_s, "audio_s_per_item": audio_s, "prefill_tokens_per_s": prefill,
             "decode_step_s": {str(k): v for k, v in steps.items()}, "max_running": 16,
             "redis_write_MBps": write, "redis_read_MBps": read, "gateway_s": gateway,
             "machine": f"{_cores()} CPU cores, demo model small, image {size}x{size} JPEG"}
    shape = {"prompt_tokens": n_short, "image_rows": n_image - n_short}
    return rates, shape


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def level(client, model: str, size: int, rate: float, seconds: float, tokens: int, redis_url: str, seed: int,
          prefix: str = "trib") -> dict:
    """Poisson arrivals at ``rate``/s for ``seconds``; TTFTs and the image tier's replicas over time."""
    from cache.client import connect

    r = connect(redis_url)
    replicas: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            n = r.hget(f"{prefix}:autoscale", "encoder:image")
            replicas.append((time.perf_counter(), int(n) if n is not None else 1))
            done.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rng = random.Random(seed)
    out, lock, threads = [], threading.Lock(), []
    t0, at, i = time.perf_counter(), 0.0, 0

    refused = []

    def send(k: int) -> None:
        try:
            first, _, _ = ttft(client, model, image_content(seed + k, size), tokens)
        except Exception as exc:  # noqa: BLE001 -- a 503 past the gateway's bounds is an outcome to count
            with lock:
                refused.append(getattr(exc, "status_code", type(exc).__name__))
            return
        with lock:
            out.append(first)

    while True:
        at += rng.expovariate(rate)
        if at > seconds:
            break
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        t = threading.Thread(target=send, args=(i,))
        t.start()
        threads.append(t)
        i += 1
    for t in threads:
        t.join()
    done.set()
    poller.join()
    half = [(t - t0, n) for t, n in replicas if t - t0 >= seconds / 2]
    weighted = statistics.fmean(n for _, n in half) if half else float("nan")
    out.sort()
    return {"rate": rate, "requests": len(out), "refused": len(refused), "ttft_mean": statistics.fmean(out),
            "ttft_p50": out[len(out) // 2],
            "ttft_p90": out[int(0.9 * (len(out) - 1))], "replicas_mean": weighted,
            "replicas_max": max((n for _, n in replicas), default=1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="0.3,0.6",
                    help="load levels, as fractions of what one replica per tier carries (by the model)")
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--size", type=int, default=384, help="image side in pixels (JPEG)")
    ap.add_argument("--tokens", type=int, default=4, help="output tokens per request")
    ap.add_argument("--rates", type=Path, default=ROOT / "bench" / "results" / "rates-cpu.json")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "capacity.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from openai import OpenAI

    from cache.embedded import EmbeddedRedis
    from models.demo import write_demo_model
    from router.capacity import Rates, Workload, plan_capacity
    from tests.e2e.conftest import local_cluster

    flags = ["--autoscale", "--autoscale-max", f"image={MAX_IMAGE_WORKERS}", "--autoscale-idle-cores", "0",
             "--scale-up-delay", "2", "--scale-down-delay", "30", "--scale-cooldown", "5", "--autoscale-poll", "0.5",
             "--encoder-max-wait-ms", "5"]
    levels = [float(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(maxmemory="1gb") as server:
        model = Path(tmp) / "demo-small"
        write_demo_model(model, "small")
        with local_cluster(model, server.url, Path(tmp), *flags) as c:
            c.wait_ready()
            client = OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
            rates, shape = calibrate(client, c.model, args.size, server.url)
            args.rates.parent.mkdir(parents=True, exist_ok=True)
            args.rates.write_text(json.dumps(rates, indent=2) + "\n")
            print(f"calibrated ({args.rates}): prefill {rates['prefill_tokens_per_s']:.0f} tokens/s, gateway "
                  f"{rates['gateway_s'] * 1e3:.1f} ms, image encode {rates['image_s_per_item'] * 1e3:.1f} ms/item, "
                  f"decode step {rates['decode_step_s']} s, Redis write {rates['redis_write_MBps']:.0f} / read "
                  f"{rates['redis_read_MBps']:.0f} MB/s; prompt {shape['prompt_tokens']} tokens + "
                  f"{shape['image_rows']} image rows")
            rows = []
            one = plan_capacity(Workload(requests_per_s=1.0, image_share=1.0, prompt_tokens=shape["prompt_tokens"],
                                         image_rows=shape["image_rows"], output_tokens=args.tokens), Rates(**rates))
            per_request = max(t.service_s for t in one.tiers)  # the bottleneck's busy seconds per request
            for k, frac in enumerate(levels):
                rate = frac / per_request
                if k:
                    time.sleep(35)  # the scale-down window: each level starts from one image worker
                observed = level(client, c.model, args.size, rate, args.seconds, args.tokens, server.url,
                                 args.seed + 1_000_000 * (k + 1))
                workload = Workload(requests_per_s=rate, image_share=1.0, prompt_tokens=shape["prompt_tokens"],
                                    image_rows=shape["image_rows"], output_tokens=args.tokens)
                plan = plan_capacity(workload, Rates(**rates))
                ran = plan_capacity(workload, Rates(**rates), replicas={
                    "encoder:image": max(1, round(observed["replicas_mean"])), "backbone": 1})
                image = plan.tiers[0]
                rows.append({"fraction": frac, **observed, "plan_replicas": {t.name: t.replicas for t in plan.tiers},
                             "predicted_autoscaler_replicas": image.autoscaler_replicas,
                             "predicted_ttft": ran.ttft_s, "bottleneck": plan.bottleneck,
                             "offered": {t.name: t.offered for t in plan.tiers}})
    print(f"\n{'load':>5s} {'req/s':>6s} {'n':>4s} {'503':>4s} | {'image workers: policy':>21s} "
          f"{'observed mean':>13s} {'max':>4s} | {'TTFT ms: predicted':>18s} {'observed mean':>13s} {'p50':>6s} "
          f"{'p90':>6s} {'obs/pred':>8s} | plan at 70% (bottleneck)")
    for row in rows:
        plan = ", ".join(f"{k.split(':')[-1]} {v}" for k, v in row["plan_replicas"].items())
        print(f"{row['fraction']:5.2f} {row['rate']:6.2f} {row['requests']:4d} {row['refused']:4d} | "
              f"{row['predicted_autoscaler_replicas']:21d} {row['replicas_mean']:13.2f} {row['replicas_max']:4d} | "
              f"{row['predicted_ttft'] * 1e3:18.0f} {row['ttft_mean'] * 1e3:13.0f} {row['ttft_p50'] * 1e3:6.0f} "
              f"{row['ttft_p90'] * 1e3:6.0f} {row['ttft_mean'] / row['predicted_ttft']:8.2f} | {plan} "
              f"({row['bottleneck']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rates": rates, "shape": shape, "levels": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
