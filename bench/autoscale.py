"""Autoscaling: an image burst against ``tributary up --autoscale`` vs the same cluster with a fixed single image
worker.

    .venv/bin/python bench/autoscale.py [--rate 6] [--seconds 25] [--pairs 2] [--idle-cores 0.75]   # ~6 min

Two local clusters on the ``small`` demo model, one after the other on the same machine: fixed (one worker per tier) and
``--autoscale`` (image tier 1..4, up after 1 s of demand, down after 10 s, cool-down 5 s), ``--pairs`` times, the order
alternating (the spread between pairs is the noise). Each is warmed up, then gets the same open-loop burst: ``--rate``
chat completions per second for ``--seconds``, each with a fresh ``--size`` JPEG (a cache miss: an image encode each)
and ``--tokens`` generated tokens, sent on schedule whether or not earlier ones finished (a closed loop would slow its
own arrivals and hide the queue). Prints time to first token (p50, p99, max) for both and their ratios and the replica
counts over time (the autoscaler's trace), and saves a PNG plot (the image tier's replicas over time; each request's
TTFT by its send time). ``--save-trace FILE`` keeps the autoscaler's trace (tests/unit/data/autoscale_trace.json is one,
replayed by tests/unit/test_autoscale_policy.py)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.media import data_url, jpeg_bytes  # noqa: E402

AUTOSCALE = ["--autoscale", "--autoscale-max", "image=4", "--scale-up-delay", "1", "--scale-down-delay", "10",
             "--scale-cooldown", "5", "--autoscale-poll", "0.5"]


SIZE, TOKENS, IDLE = 1024, 1, 0.75  # set by main()


def one(client, model: str, seed: int) -> float:
    image = data_url(jpeg_bytes(SIZE, SIZE, seed=seed), "image/jpeg")
    content = [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": image}}]
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            max_tokens=TOKENS, temperature=0.0, stream=True,
                                            extra_body={"ignore_eos": True})
    ttft = None
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0


def burst(client, model: str, rate: float, seconds: float, seed: int) -> list[tuple[float, float]]:
    """(send time from the burst's start, TTFT) for every request, sent open-loop at ``rate`` per second."""
    out, lock, threads = [], threading.Lock(), []
    t0 = time.perf_counter()
    burst.started_unix = time.time()

    def send(i: int, at: float) -> None:
        ttft = one(client, model, seed + i)
        with lock:
            out.append((at, ttft))

    for i in range(int(rate * seconds)):
        at = i / rate
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        t = threading.Thread(target=send, args=(i, at))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return sorted(out)


def run(model_dir: Path, autoscale: bool, rate: float, seconds: float, seed: int, tail_s: float) -> dict:
    from openai import OpenAI

    from cache.embedded import EmbeddedRedis
    from tests.e2e.conftest import local_cluster

    with EmbeddedRedis(maxmemory="1gb") as server, tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        flags = [*AUTOSCALE, "--autoscale-idle-cores", str(IDLE), "--autoscale-trace", str(trace)] if autoscale else []
        with local_cluster(model_dir, server.url, Path(tmp), *flags) as c:
            c.wait_ready()
            client = OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
            for i in range(3):  # warm-up
                one(client, c.model, seed + 900_000 + i)
            results = burst(client, c.model, rate, seconds, seed)
            if autoscale:
                time.sleep(tail_s)  # the scale-down after the burst, for the plot
        data = json.loads(trace.read_text()) if trace.exists() else None
    if data:  # the trace's clock, moved to the burst's: 0 is the first request
        shift = burst.started_unix - data["t0_unix"]
        data["replicas"] = {k: [(t - shift, n) for t, n in v] for k, v in data["replicas"].items()}
    ttfts = sorted(t for _, t in results)
    return {"results": results, "trace": data, "p50": statistics.median(ttfts),
            "p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))], "max": ttfts[-1]}


def plot(path: Path, scaled: dict, fixed: dict) -> None:
    """Two panels drawn with Pillow: the image tier's replicas over time; each request's TTFT by its send time."""
    from PIL import Image, ImageDraw

    w, h, pad = 900, 620, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    panels = [(pad, 40, w - pad, 250), (pad, 330, w - pad, h - 50)]
    trace = scaled["trace"] or {"replicas": {}}
    reps = [(max(0.0, t), n) for t, n in trace["replicas"].get("encoder:image", []) if t >= -1]
    t_max = max([t for t, _ in reps] + [t for t, _ in scaled["results"]] + [1.0])
    y_rep = max([n for _, n in reps] + [1]) + 1
    y_ttft = max(fixed["max"], scaled["max"]) * 1.1

    def axes(box, ymax, title, ylabel):
        x0, y0, x1, y1 = box
        d.rectangle(box, outline="black")
        d.text((x0, y0 - 18), title, fill="black")
        d.text((x0 - 50, y0), ylabel, fill="black")
        for k in range(5):
            v = ymax * k / 4
            y = y1 - (y1 - y0) * k / 4
            d.line((x0 - 4, y, x0, y), fill="black")
            d.text((x0 - 40, y - 6), f"{v:.1f}", fill="black")
        for k in range(6):
            x = x0 + (x1 - x0) * k / 5
            d.text((x - 8, y1 + 4), f"{t_max * k / 5:.0f}s", fill="black")

    def xy(box, t, v, ymax):
        x0, y0, x1, y1 = box
        return x0 + (x1 - x0) * t / t_max, y1 - (y1 - y0) * min(v, ymax) / ymax

    axes(panels[0], y_rep, "image-tier replicas (autoscaled; the fixed cluster has 1 throughout)", "replicas")
    pts = [xy(panels[0], t, n, y_rep) for t, n in reps]
    for a, b in zip(pts, pts[1:]):
        d.line((a[0], a[1], b[0], a[1]), fill="blue", width=2)
        d.line((b[0], a[1], b[0], b[1]), fill="blue", width=2)
    d.line((*xy(panels[0], 0, 1, y_rep), *xy(panels[0], t_max, 1, y_rep)), fill="red", width=1)
    axes(panels[1], y_ttft, "time to first token (s) by send time: blue autoscaled, red fixed", "TTFT")
    for run_, color in ((fixed, "red"), (scaled, "blue")):
        for t, ttft in run_["results"]:
            x, y = xy(panels[1], t, ttft, y_ttft)
            d.ellipse((x - 3, y - 3, x + 3, y + 3), outline=color)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=6.0, help="requests per second during the burst")
    ap.add_argument("--seconds", type=float, default=25.0, help="burst length")
    ap.add_argument("--tail", type=float, default=25.0, help="seconds kept after the burst (the scale-down)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--size", type=int, default=1024, help="image side (JPEG): decoding and resizing is the work")
    ap.add_argument("--tokens", type=int, default=1, help="generated tokens per request")
    ap.add_argument("--idle-cores", type=float, default=0.75,
                    help="tributary up --autoscale-idle-cores (0: add workers even on saturated cores)")
    ap.add_argument("--pairs", type=int, default=2, help="fixed/autoscaled pairs, one after the other")
    ap.add_argument("--only", choices=["fixed", "autoscaled"], default=None, help="run one of the two clusters")
    ap.add_argument("--png", type=Path, default=ROOT / "bench" / "autoscale.png")
    ap.add_argument("--save-trace", type=Path, default=None)
    args = ap.parse_args()
    global SIZE, TOKENS, IDLE
    SIZE, TOKENS, IDLE = args.size, args.tokens, args.idle_cores
    from models.demo import write_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "demo-small"
        write_demo_model(model, "small")
        pairs = []
        for k in range(args.pairs):  # the spread between pairs is the noise; the order alternates
            runs = {}
            for autoscale in ((False, True) if k % 2 == 0 else (True, False)):
                if args.only != ("fixed" if autoscale else "autoscaled"):
                    runs[autoscale] = run(model, autoscale, args.rate, args.seconds, args.seed,
                                          args.tail if autoscale else 0)
            pairs.append((runs.get(False) or runs[True], runs.get(True) or runs[False]))
    fixed, scaled = pairs[-1]
    n = len(fixed["results"])
    print(f"image burst: {n} requests at {args.rate:g}/s for {args.seconds:g} s, a {args.size}x{args.size} JPEG "
          f"and {args.tokens} generated token(s) each; autoscaled: --autoscale-idle-cores {args.idle_cores:g}")
    for k, (fixed, scaled) in enumerate(pairs, 1):
        print(f"pair {k}        {'p50 TTFT':>10} {'p99 TTFT':>10} {'max TTFT':>10}")
        for name, r in (("fixed", fixed), ("autoscaled", scaled)):
            print(f"{name:12} {r['p50']:9.3f}s {r['p99']:9.3f}s {r['max']:9.3f}s")
        print(f"{'fixed/auto':12} {fixed['p50'] / scaled['p50']:9.2f}x {fixed['p99'] / scaled['p99']:9.2f}x "
              f"{fixed['max'] / scaled['max']:9.2f}x")
        reps = (scaled["trace"] or {}).get("replicas", {})
        for tier, series in reps.items():
            changes = [(t, c) for i, (t, c) in enumerate(series) if i == 0 or series[i - 1][1] != c]
            print(f"  {tier:15} replicas over time (s from the burst's start): "
                  + ", ".join(f"{t:.1f}s:{c}" for t, c in changes))
    plot(args.png, scaled, fixed)
    print(f"plot: {args.png}")
    if args.save_trace and scaled["trace"]:
        args.save_trace.parent.mkdir(parents=True, exist_ok=True)
        args.save_trace.write_text(json.dumps(scaled["trace"], indent=None))
        print(f"trace: {args.save_trace}")


if __name__ == "__main__":
    main()
