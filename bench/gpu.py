"""The GPU bench's table (run it through ``bash bench/gpu.sh``, which checks the environment and runs the GPU
correctness tests first).

Rows, on one GPU, bf16, real-shape random-weight checkpoints (models/real_shapes.py, written to --workdir):

* decode tokens/s of the backbone engine (the code the worker runs: continuous-batching steps, batched device
  sampling, one host copy of the new tokens per step) at batch 1, 8, 32 for ``llava-1b`` and 1, 32 for
  ``llava-1.5-7b``, greedy, ``--prompt`` tokens of prompt, ``--steps`` timed steps after ``--warm`` untimed ones;
* against the HBM floor: the bytes one decode step must read (the language model's weights, the embedding table
  only where it is also the lm_head, plus every sequence's KV at the mean context of the timed steps) over the
  measured device-to-device copy bandwidth (bytes read + written per second of a 1 GiB copy);
* the same decode steps replayed from CUDA graphs ([cuda-graphs], one per batch bucket), with their capture time
  and memory;
* the fastest of those decode variants again sampling (temperature 0.8, seeded; then with top_p 0.9, which adds the
  sort over the vocabulary) against greedy: what the sampler costs a step;
* against transformers' own ``generate`` (LlavaForConditionalGeneration, same weights, same GPU, same prompts,
  greedy, EOS off): decode tokens/s from two runs, 1 and 1 + ``--steps`` new tokens, so prefill cancels out;
* the worker row ([cuda-graphs]): one backbone worker process on ``llava-1.5-7b`` (the product's loop, Redis round
  trips overlapped with the steps), 32 text streams put straight on its stream: decode tokens/s and the gap between
  a stream's tokens against the in-process engine's at batch 32; then the same streams while LLaVA-sized image plans
  (576 rows in bf16 in Redis, as an encoder publishes them) arrive at 5 per second: the streams' ITL p50/p99;
* the image encoder ([gpu-encoders], ``llava-1.5-7b``'s ViT-L/14-336 to its feature layer + projector, the bench's
  dtype): images/s at batch 1, 8, 32 against its FLOP floor (FLOPs of one image by torch's counter over a measured
  8192^3 matmul's rate); one encoder worker process end to end on 512 photo-sized JPEGs (fetch, decode and
  preprocess on its pool, encode, publish to Redis) against the tower's rate at batch 32;
* the tiered path: ``tributary up`` on the one GPU (gateway, image encoder and backbone processes, embedded Redis,
  ``llava-1b``), streamed chat requests each with one of 4 images at concurrency 16 through the HTTP API:
  requests/s, time to first token (p50 / p90), output tokens/s.

``--cpu-smoke``: the same code on ``llava-tiny`` in fp32 on the CPU (batches 1 and 8; the tiered row at
concurrency 4), to prove the script in CI; its numbers mean nothing.

Prints one table, and writes it as JSON to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_ROWS = [("llava-1b", [1, 8, 32, 64]), ("llava-1.5-7b", [1, 8, 32, 64])]
SMOKE_ROWS = [("llava-tiny", [1, 8])]
# The arrival row (key: smoke?): decoding streams, LLaVA-sized prompts arriving together, the chunked step budget.
ITL_MODEL = {False: "llava-1b", True: "llava-tiny"}
ITL_ROW = {False: {"streams": 16, "arrivals": 8, "budget": 512}, True: {"streams": 4, "arrivals": 2, "budget": 16}}
# The image encoder rows ([gpu-encoders]): the tower at these batches, the worker at the largest.
ENCODER_ROW = {False: ("llava-1.5-7b", [1, 8, 32]), True: ("llava-tiny", [1, 4])}
# The worker row ([cuda-graphs]): 32 streams through a backbone worker process, alone and while images arrive.
WORKER_MODEL = {False: "llava-1.5-7b", True: "llava-tiny"}
WORKER_ROW = {False: {"streams": 32, "images_per_s": 5.0, "arrival_tokens": 256},
              True: {"streams": 8, "images_per_s": 20.0, "arrival_tokens": 64}}


PROFILE_STEPS = 20  # decode steps under torch's profiler (--profile)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes`` (best of 5)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def text_config(path: Path) -> dict:
    from models.llava import read_config

    return read_config(path, json.loads((path / "config.json").read_text()))


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [[1] + torch.randint(5, vocab, (length - 1,), generator=gen).tolist() for _ in range(batch)]


def decode_ours(path: Path, batches: list[int], device, dtype, prompt: int, warm: int, steps: int,
                itl: dict | None = None, baselines: bool = True, profile: bool = False) -> dict:
    """{batch: {backend: tokens/s}} of the engine's decode steps with the paged attention backend ("paged") and the
    per-sequence loop it replaced ("loop"), plus the bytes a step reads (for the floor). With ``itl`` (streams,
    arrivals, budget), also the arrival row: ITL of decoding streams while LLaVA-sized prompts arrive, chunked vs
    unchunked. ``baselines`` False: no loop rows. ``profile``: where a batch-1 step's host time goes (the fastest
    variant), from torch's profiler."""
    from backbone.attention import backend_for
    from backbone.engine import Engine
    from backbone.loader import load_shard
    from models.llava import placeholder_ids
    from router.messages import SamplingParams

    config = text_config(path)
    text = config["text_config"]
    model, _ = load_shard(path, text, None, dtype, device)
    paged = model.attention
    need = max(batches) * -(-(prompt + warm + steps + 2 + PROFILE_STEPS) // 16)
    if itl:  # each stream stays under 256 positions, each LLaVA-sized prompt under 768
        need = max(need, itl["streams"] * 16 + itl["arrivals"] * 48)
    model.allocate_pool(need)  # room for the largest batch
    engine = Engine(model, placeholder_ids(config), [], int(text["max_position_embeddings"]),
                    max_batched_tokens=max(batches) * prompt, prefix_cache=False)  # each batch's prompts in one step
    weights = sum(t.numel() * t.element_size() for w in model.layers for t in w.values())
    weights += sum(t.numel() * t.element_size() for t in (model.norm_weight, model.lm_head_weight))
    cfg, itemsize = model.cfg, torch.empty((), dtype=dtype).element_size()
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    # [cuda-graphs]: decode graphs for every batch measured (None on a CPU: it runs eagerly); eager rows first.
    took = model.capture_graphs(max(batches), int(text["max_position_embeddings"]))
    graphs, model.graphs = model.graphs, None
    out = {"capture": took}
    for batch in batches:
        context = prompt + 1 + warm + steps / 2  # mean KV length over the timed steps
        out[batch] = {"bytes_per_step": weights + batch * context * kv_per_token}
        variants = [("paged", paged, None, 0.0, 1.0)] + (
            [("loop", backend_for(device, "loop"), None, 0.0, 1.0)] if baselines else [])
        if graphs is not None:
            variants.append(("graphs", paged, graphs, 0.0, 1.0))
        # The fastest variant again, sampling: temperature alone (the fused race on CUDA), then with top_p's sort.
        variants += [("sampled", paged, graphs, 0.8, 1.0), ("nucleus", paged, graphs, 0.8, 0.9)]
        for name, backend, replay, temperature, top_p in variants:
            model.attention, model.graphs = backend, replay
            params = SamplingParams(max_tokens=warm + steps + 2 + PROFILE_STEPS, temperature=temperature,
                                    top_p=top_p, seed=7, ignore_eos=True)
            ids = prompts(batch, prompt, cfg.vocab_size)
            seqs = [engine.new_sequence(f"b{i}", prompt, params) for i in range(batch)]
            for seq, p in zip(seqs, ids):
                engine.start(seq, p, [])
            while any(not seq.output for seq in seqs):  # the prompts (one step)
                engine.step(seqs)
            for _ in range(warm):
                engine.step(seqs)
            elapsed = timed_steps(engine, seqs, device, steps)
            assert all(seq.finish is None and len(seq.output) == 1 + warm + steps for seq in seqs), "one stopped"
            if profile and batch == min(batches) and name == ("graphs" if graphs is not None else "paged"):
                out["profile"] = profile_steps(engine, seqs, device, name, PROFILE_STEPS)
            for seq in seqs:
                engine.release(seq)
            out[batch][name] = batch * steps / elapsed
            out[batch][f"{name}_step_ms"] = 1e3 * elapsed / steps
    model.attention, model.graphs = paged, None
    if itl:
        out["itl"] = arrival_row(engine, config, itl)
    engine = model = graphs = None  # free the weights, the pool and the graphs before the next model loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def timed_steps(engine, seqs, device, steps: int) -> float:
    """Seconds ``steps`` engine steps over ``seqs`` take, the device synchronized before and after."""
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step(seqs)
    sync(device)
    return time.perf_counter() - t


def profile_steps(engine, seqs, device, name: str, steps: int) -> str:
    """torch's profiler over ``steps`` decode steps: the ops with the most host time, and the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = timed_steps(engine, seqs, device, steps)
    head = f"profile of {steps} decode steps ({name}, batch {len(seqs)}): {1e3 * wall / steps:.2f} ms per step"
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    return head + "\n" + ops


def paged_variants() -> int | None:
    """How many variants of the paged attention kernel Triton compiled in this process (each a stall)."""
    try:
        from backbone.attention import _KERNEL

        return sum(len(c[0]) for c in _KERNEL.device_caches.values()) if _KERNEL is not None else 0
    except Exception:  # another Triton's internals
        return None


def arrival_row(engine, config: dict, itl: dict) -> dict:
    """ITL of ``streams`` decoding streams while ``arrivals`` LLaVA-sized prompts (one image's rows + 100 text
    tokens) arrive together: chunked (``budget``) vs unchunked (every prompt in one step)."""
    from bench.chunked import arrival_itl
    from models.llava import image_tokens, placeholder_ids

    model = engine.model
    vocab, rows = model.cfg.vocab_size, image_tokens(config)
    image_id = placeholder_ids(config)["image"]
    gen = torch.Generator().manual_seed(7)
    streams = [[1] + torch.randint(5, vocab, (63,), generator=gen).tolist() for _ in range(itl["streams"])]
    arrivals = []
    for _ in range(itl["arrivals"]):
        text = torch.randint(5, vocab, (100,), generator=gen).tolist()
        pixels = (0.02 * torch.randn(rows, model.cfg.hidden_size, generator=gen)).to(model.dtype)
        arrivals.append(([1] + [image_id] * rows + text[1:], [("image", pixels)]))
    prompt = 1 + rows + 99
    out = {"prompt_tokens": prompt, **itl}
    for name, budget in (("unchunked", itl["arrivals"] * prompt + itl["streams"]), ("chunked", itl["budget"])):
        engine.max_batched_tokens = budget
        arrival_itl(engine, streams, arrivals[:1], quiet_steps=3, after_steps=1)  # warm
        before = paged_variants()
        out[name] = arrival_itl(engine, streams, arrivals)
        after = paged_variants()
        out[name]["kernel_compiles"] = None if before is None else after - before  # during the timed window
    return out


def worker_row(path: Path, device, dtype, streams: int, prompt: int, tokens: int, images_per_s: float,
               arrival_tokens: int, image_tokens_max: int = 8) -> dict:
    """[cuda-graphs]: one backbone worker process (the product's loop: Redis round trips, overlapped) on ``path``,
    plans put straight on its stream. (1) ``streams`` text streams alone: decode tokens/s and the gap between a
    stream's consecutive tokens, to set against the in-process engine's; (2) the same streams while LLaVA-sized image
    plans (their encoder rows in Redis in the backbone's dtype, as an encoder publishes them) arrive at
    ``images_per_s`` (each stream ``arrival_tokens`` long, so that the arrivals span its decode): the streams' ITL
    p50/p99."""
    import threading

    import redis

    from bench.backbone import pct, run_wave, start_backbone
    from cache.codec import encode_tensor
    from cache.embedded import EmbeddedRedis, free_port
    from cache.keys import Keys, alive
    from cache.streams import fields_payload, payload_fields
    from models.llava import image_tokens, placeholder_ids
    from models.spec import ModelSpec
    from router import messages as m

    config = text_config(path)
    spec = ModelSpec.from_dir(path)
    hidden, rows = config["text_config"]["hidden_size"], image_tokens(config)
    image_id = placeholder_ids(config)["image"]
    wire = str(dtype).removeprefix("torch.")
    keys = Keys()
    with EmbeddedRedis(maxmemory="4gb") as server:
        r = redis.Redis.from_url(server.url, socket_timeout=120)
        port = free_port()
        procs = start_backbone(path, server.url, 1, ("--device", str(device), "--dtype", wire, "--metrics-port",
                                                     str(port)), ready_timeout=600)
        try:
            run_wave(r, keys, 2, prompt, 4, wave=-1)  # warm-up (and the first graphs' replays)
            before = metric_values(port)
            quiet = run_wave(r, keys, streams, prompt, tokens, wave=1)
            after = metric_values(port)
            # The worker loop's time per step by phase (its own metrics), over the quiet wave.
            steps = after["tributary_backbone_steps_total"] - before["tributary_backbone_steps_total"]
            loop = "tributary_backbone_loop_seconds_total:"
            loop_ms = {phase: round(1e3 * (after[loop + phase] - before[loop + phase]) / max(1.0, steps), 3)
                       for phase in ("step", "io_wait", "host")}
            gen = torch.Generator().manual_seed(5)
            tensor_keys = []
            for i in range(4):  # four distinct images, each stored once, as the encoder tier caches them
                key = keys.tensor(spec.encoder_id("image"), f"bench{i}")
                blob = encode_tensor((0.02 * torch.randn(rows, hidden, generator=gen)), wire)
                r.hset(key, mapping={"data": blob, "n": rows})
                tensor_keys.append(key)
            reply = "bench:reply:arrivals"
            r.set(alive(reply), 1, ex=600)
            stop = threading.Event()
            sent = [0]

            def arrive() -> None:
                feeder = redis.Redis.from_url(server.url)
                while not stop.wait(1.0 / images_per_s):
                    i = sent[0]
                    ids = [1] + [image_id] * rows + [20 + k for k in range(31)]
                    plan = m.PromptPlan(
                        request_id=f"img{i}", reply_to=reply, token_ids=ids, deadline=time.time() + 600,
                        media=[m.MediaRef(modality=m.Modality.IMAGE, tensor_key=tensor_keys[i % 4], num_tokens=rows)],
                        sampling=m.SamplingParams(max_tokens=image_tokens_max, temperature=0.0, ignore_eos=True))
                    feeder.xadd(keys.gen(), payload_fields(m.encode(plan)))
                    sent[0] += 1

            stamps: dict[str, list[float]] = {}
            pipe = r.pipeline(transaction=False)
            for i in range(streams):
                ids = [1] + [20 + (i * 7 + k) % 400 for k in range(prompt - 1)]
                plan = m.PromptPlan(request_id=f"s{i}", reply_to=reply, token_ids=ids, deadline=time.time() + 600,
                                    sampling=m.SamplingParams(max_tokens=arrival_tokens, temperature=0.0,
                                                              ignore_eos=True))
                pipe.xadd(keys.gen(), payload_fields(m.encode(plan)))
            pipe.execute()
            feeder = threading.Thread(target=arrive, daemon=True)
            feeder.start()
            last, done, images_done = "0-0", 0, 0
            deadline = time.monotonic() + 600
            try:
                while done < streams:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        raise RuntimeError("the backbone worker died or stalled during the arrivals wave")
                    for _, entries in r.xread({reply: last}, block=5000) or []:
                        for entry_id, fields in entries:
                            last = entry_id
                            ev = m.decode(fields_payload(fields), m.TokenEvent)
                            if ev.request_id.startswith("s"):
                                stamps.setdefault(ev.request_id, []).extend(
                                    [time.perf_counter()] * max(1, len(ev.token_ids)))
                                done += ev.finish is not None
                            else:
                                images_done += ev.finish is not None
            finally:
                stop.set()
                feeder.join(10)
            gaps = [b - a for st in stamps.values() for a, b in zip(st[1:], st[2:])]  # after the first token
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
    return {"streams": streams, "prompt": prompt, "tokens": tokens, "tokens_per_s": quiet["tok_s"],
            "steady_tokens_per_s": quiet["tok_s_steady"], "loop_ms_per_step": loop_ms,
            "itl_p50_ms": 1e3 * pct(quiet["itl"], .5), "itl_p99_ms": 1e3 * pct(quiet["itl"], .99),
            "images_per_s": images_per_s, "images_sent": sent[0], "images_finished": images_done,
            "arrivals_itl_p50_ms": 1e3 * pct(gaps, .5), "arrivals_itl_p99_ms": 1e3 * pct(gaps, .99)}


def matmul_rate(device, dtype, n: int) -> float:
    """FLOP/s of an [n, n] x [n, n] matmul in ``dtype`` (best of 5): what the tower's FLOP floor is measured against."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def tower_rows(path: Path, device, dtype, batches: list[int], rate: float, iters: int) -> dict:
    """[gpu-encoders]: images/s of the image encoder (vision tower up to its feature layer + projector, as the
    encoder worker loads it) at each batch, against its FLOP floor: the FLOPs of one image (torch's FLOP counter on a
    batch-1 forward) over ``rate``. The rows run eagerly, then again replayed from the CUDA graphs the worker captures
    (encoders/graphs.py; on a CPU their static buffers run uncaptured), under "graphs"."""
    from torch.utils.flop_counter import FlopCounterMode

    from encoders.loader import load_torch_module
    from encoders.torch_runtime import TorchRuntime
    from models.spec import ModelSpec

    spec = ModelSpec.from_dir(path)
    runtime = TorchRuntime(load_torch_module(spec, "image", dtype), str(device), dtype)
    size = spec.config["vision_config"]["image_size"]
    with torch.inference_mode():
        x = torch.randn(max(batches), 3, size, size, device=device).to(dtype)
        with FlopCounterMode(display=False) as counter:
            runtime.module(x[:1])
    flops = counter.get_total_flops()
    out = {"flops_per_image": flops, "matmul_flops_per_s": rate, "floor_images_per_s": rate / flops}
    out.update(tower_rates(runtime, spec, x, batches, iters))
    took = runtime.capture((3, size, size), max(batches))
    if took is not None:
        out["graphs"] = dict(tower_rates(runtime, spec, x, batches, iters), capture=took)
    runtime = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def tower_rates(runtime, spec, x: torch.Tensor, batches: list[int], iters: int) -> dict:
    """Images/s of ``runtime.forward`` on the device batch ``x[:b]`` for each b; then at the largest batch as the
    worker runs it, alone and beside a busy preprocessing pool."""
    device = runtime.device
    out: dict = {}
    for b in batches:
        runtime.forward(x[:b])
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            runtime.forward(x[:b])
        sync(device)
        out[b] = b * iters / (time.perf_counter() - t)
    # The largest batch as the worker runs it (encoders/runtime.py): from a pinned fp32 batch on the host, through
    # the forward, the cast and finiteness check, into the items' payloads in pinned memory, each batch launched
    # before the one before it is waited for. Against the bare forward above, this says what the copies in and
    # out cost.
    from encoders.runtime import launch_isolating

    b = max(batches)
    host = torch.randn(b, *x.shape[1:])
    host = host.pin_memory() if device.type == "cuda" else host
    in_flight: list = []

    def step() -> None:
        in_flight.append(launch_isolating(runtime, host, None, runtime.dtype))
        if len(in_flight) > 1:
            in_flight.pop(0).result()

    def drain() -> None:
        while in_flight:
            in_flight.pop(0).result()

    step()
    drain()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    drain()
    out["with_transfers"] = {"batch": b, "images_per_s": b * iters / (time.perf_counter() - t)}
    # The same while a pool as large as the worker's decodes and preprocesses JPEGs all along (as it does the next
    # batch during a forward): against the row above, what sharing the host with preprocessing costs the forward
    # (the GIL, the cores), and how fast the pool goes meanwhile.
    def run() -> None:
        for _ in range(iters):
            step()
        drain()

    from encoders.loader import load_preprocessor

    _, busy = busy_pool(load_preprocessor(spec, "image"), run)
    seconds = busy.pop("seconds")
    out["with_preprocessing"] = dict(busy, batch=b, images_per_s=b * iters / seconds)
    return out


def busy_pool(pre, measure, threads: int | None = None) -> tuple[object, dict]:
    """``measure()`` run while ``threads`` threads (default: the encoder worker's pool size) preprocess photo-sized
    JPEGs with ``pre`` without pause, as the worker's pool does the next batch: its result, and the seconds it took
    and the images/s the pool preprocessed meanwhile."""
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pictures = jpegs(16)
    threads = threads or min(8, os.cpu_count() or 1)
    done, stop = [0], threading.Event()

    def feed(i: int) -> None:
        while not stop.is_set():
            pre(pictures[i % len(pictures)])
            done[0] += 1  # a rough count: two threads may now and then lose one of their increments
            i += threads

    with ThreadPoolExecutor(threads) as pool:
        for i in range(threads):
            pool.submit(feed, i)
        time.sleep(0.5)  # the pool at full speed first
        start, t = done[0], time.perf_counter()
        result = measure()
        seconds = time.perf_counter() - t
        preprocessed = done[0] - start
        stop.set()
    return result, {"seconds": seconds, "pool_threads": threads, "pool_images_per_s": preprocessed / seconds}


def jpegs(n: int, width: int = 640, height: int = 480) -> list[bytes]:
    """``n`` distinct photo-sized JPEGs (gradients + noise at quality 90: what decoding costs for real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, ((xx + yy) * (i + 3)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def encoder_worker_row(path: Path, device, dtype, images: int, max_batch: int, eager: bool = False) -> dict:
    """[gpu-encoders]: end-to-end images/s of one image encoder worker process (read jobs, fetch the JPEG bytes,
    decode and preprocess on its pool, encode, publish to Redis) on ``images`` jobs queued at once; ``eager``: with
    --eager (no CUDA graphs)."""
    import redis

    from cache.embedded import EmbeddedRedis, free_port
    from cache.keys import Keys, alive
    from cache.streams import fields_payload, payload_fields
    from models.spec import ModelSpec
    from router import messages as m
    from tests.integration.procs import start_tier

    wire = str(dtype).removeprefix("torch.")
    spec = ModelSpec.from_dir(path).with_encoder_dtypes(wire)
    keys = Keys()
    pictures = jpegs(32)
    port = free_port()
    with EmbeddedRedis(maxmemory="4gb") as server:
        r = redis.Redis.from_url(server.url, socket_timeout=120)
        proc = start_tier(["encoder", "--modality", "image", "--model", str(path), "--device", str(device),
                           "--dtype", wire, "--max-batch", str(max_batch), "--log-level", "WARNING",
                           "--metrics-port", str(port), *(["--eager"] if eager else [])],
                          server.url, "encoder:image", timeout=600)
        try:
            def wave(tag: str, n: int) -> float:
                reply = f"bench:enc:{tag}"
                r.set(alive(reply), 1, ex=600)
                pipe = r.pipeline(transaction=False)
                for i in range(n):
                    digest = f"{tag}-{i}"
                    job = m.EncodeJob(request_id=f"{tag}{i}", job_id=digest, modality=m.Modality.IMAGE,
                                      encoder_id=spec.encoder_id("image"), digest=digest, blob_key=keys.blob(digest),
                                      reply_to=reply, deadline=time.time() + 600)
                    pipe.set(job.blob_key, pictures[i % len(pictures)], ex=600)
                    pipe.xadd(keys.jobs("image"), payload_fields(m.encode(job)))
                t0 = time.perf_counter()
                pipe.execute()
                last, done, deadline = "0-0", 0, time.monotonic() + 600
                while done < n:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"the encoder worker died or stalled ({done} of {n} images done)")
                    for _, entries in r.xread({reply: last}, block=5000) or []:
                        for entry_id, fields in entries:
                            last = entry_id
                            msg = m.decode(fields_payload(fields), m.ReplyMessage)
                            if not isinstance(msg, m.EncodeDone):
                                raise RuntimeError(f"an encode failed: {msg}")
                            done += 1
                return n / (time.perf_counter() - t0)

            wave("warm", 2 * max_batch)
            before = phase_seconds(port)
            t = time.perf_counter()
            rate = wave("run", images)
            wall = time.perf_counter() - t
            after = phase_seconds(port)
        finally:
            proc.terminate()
            proc.wait(60)
    # Where the worker's time went (its own metrics), as shares of the wall time of the run: the forwards (launch to
    # outputs on the host, copies included), the loop's waits for preprocessing and for the batch before to be
    # answered, and the answers in Redis (on the publishing thread). Forwards and answers overlap each other and the
    # loop, so the shares need not add up to 1.
    phases = {k: round((after[k] - before[k]) / wall, 3) for k in after}
    return {"images": images, "max_batch": max_batch, "images_per_s": rate, "jpeg": "640x480 q90",
            "share_of_wall": phases}


def metric_values(port: int) -> dict[str, float]:
    """A worker's Prometheus samples now (``name`` or ``name:label``: bench/serve.py's reader)."""
    from bench.serve import read_counters

    return read_counters([f"http://127.0.0.1:{port}/metrics"])


def phase_seconds(port: int) -> dict[str, float]:
    """Seconds the image encoder worker spent per phase so far, from its Prometheus histograms' sums."""
    values = metric_values(port)
    return {phase: values.get(f"tributary_encoder_{phase}_seconds_sum:image", 0.0)
            for phase in ("encode", "preprocess_wait", "publish_wait", "publish")}


def decode_transformers(path: Path, batches: list[int], device, dtype, prompt: int, warm: int, steps: int) -> dict:
    """{batch: tokens/s} of LlavaForConditionalGeneration.generate's decode (greedy, EOS off)."""
    from transformers import LlavaForConditionalGeneration

    try:  # straight onto the device where transformers can (else through host memory)
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, device_map=str(device))
    except (ImportError, ValueError):
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.text_config.vocab_size
    out = {}
    for batch in batches:
        ids = torch.tensor(prompts(batch, prompt, vocab), device=device)

        def run(new: int) -> float:
            sync(device)
            t = time.perf_counter()
            with torch.inference_mode():
                got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     do_sample=False, pad_token_id=0)
            sync(device)
            assert got.shape[1] == prompt + new
            return time.perf_counter() - t

        run(warm)
        out[batch] = {"tokens_per_s": batch * steps / max(run(1 + steps) - run(1), 1e-9)}
    model = None  # free the weights before the next model loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- the tiered path ----------------------------------------------------------------------------------------------

def images(n: int, size: int) -> list[str]:
    from PIL import Image

    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


async def _one(client, url: str, model: str, image: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed request."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                      {"type": "image_url", "image_url": {"url": image}}]}]}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"a request streamed no text or {tokens} tokens instead of {max_tokens}")
    return first, tokens


async def _load(url: str, model: str, pics: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        for pic in pics:  # warm: each image encoded and cached once, first steps run, outside the timing
            await _one(client, url, model, pic, max_tokens)
        gate = asyncio.Semaphore(concurrency)

        async def limited(i: int):
            async with gate:
                return await _one(client, url, model, pics[i % len(pics)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {"requests": requests, "concurrency": concurrency, "requests_per_s": requests / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p90_ms": 1e3 * ttft[int(0.9 * (len(ttft) - 1))],
            "output_tokens_per_s": sum(r[1] for r in results) / wall, "wall_s": wall}


def tiered(path: Path, gpu: bool, concurrency: int, requests: int, max_tokens: int, log: Path,
           ready_timeout: float) -> dict:
    import httpx

    from cache.embedded import free_port

    port = free_port()
    devices = ["--backbone-device", "cuda", "--encoder-device", "cuda"] if gpu else ["--backbone-device", "cpu"]
    cmd = [sys.executable, "-m", "tributary.cli", "up", "--model", str(path), "--port", str(port),
           "--ready-timeout", str(ready_timeout), "--log-level", "WARNING", "--prefix", f"gpubench{os.getpid()}",
           *devices]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tributary up exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster was not ready in {ready_timeout} s; log:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        size = text_config(path)["vision_config"]["image_size"]
        return asyncio.run(_load(url, model, images(4, size), concurrency, requests, max_tokens))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ---- the table ----------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (CI): proves the script only")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tributary-gpu-bench",
                    help="where the checkpoints are written (llava-1.5-7b: 14 GB) and reused")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (default 128; smoke 16)")
    ap.add_argument("--warm", type=int, default=None, help="untimed decode steps (default 8; smoke 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 64; smoke 8)")
    ap.add_argument("--skip-tiered", action="store_true")
    ap.add_argument("--skip-worker", action="store_true", help="no backbone worker process row")
    ap.add_argument("--skip-decode", action="store_true", help="no decode rows (nor the worker row, which needs them)")
    ap.add_argument("--skip-encoders", action="store_true", help="no image encoder rows")
    ap.add_argument("--skip-baselines", action="store_true",
                    help="no per-sequence loop or transformers rows (measured once; they do not change)")
    ap.add_argument("--profile", action="store_true", help="torch's profiler over batch-1 decode steps of each model")
    ap.add_argument("--models", default=None, help="decode rows of these models only (comma-separated)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device (use --cpu-smoke to prove the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    prompt, warm, steps = args.prompt or (16 if smoke else 128), args.warm or (2 if smoke else 8), \
        args.steps or (8 if smoke else 64)
    args.workdir.mkdir(parents=True, exist_ok=True)
    import transformers

    from models.real_shapes import write_llava

    transformers.utils.logging.disable_progress_bar()
    name = "CPU (smoke: numbers mean nothing)" if smoke else torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device, (1 << 26) if smoke else (1 << 30))
    head = (f"{name} · torch {torch.__version__} · transformers {transformers.__version__} · "
            f"{str(dtype).removeprefix('torch.')} · copy bandwidth {bandwidth / 1e9:,.0f} GB/s · prompt {prompt}, "
            f"{steps} timed decode steps")
    print(head, flush=True)
    results: dict = {"device": name, "dtype": str(dtype), "copy_bandwidth_bytes_per_s": bandwidth, "decode": [],
                     "arrivals": None, "tiered": None, "worker": None}
    rows = SMOKE_ROWS if smoke else GPU_ROWS
    if args.models:
        rows = [(size, batches) for size, batches in rows if size in args.models.split(",")]
    for size, batches in [] if args.skip_decode else rows:
        t = time.perf_counter()
        path = write_llava(args.workdir / size, size, 0, str(device), dtype)
        print(f"  {size}: checkpoint ready in {time.perf_counter() - t:.1f} s", flush=True)
        itl = ITL_ROW[smoke] if size == ITL_MODEL[smoke] else None
        ours = decode_ours(path, batches, device, dtype, prompt, warm, steps, itl, not args.skip_baselines,
                           args.profile)
        theirs = {} if args.skip_baselines else decode_transformers(path, batches, device, dtype, prompt, warm, steps)
        for b in batches:
            floor = b / (ours[b]["bytes_per_step"] / bandwidth)
            results["decode"].append({"model": size, "batch": b, "tokens_per_s": ours[b]["paged"],
                                      "step_ms": ours[b]["paged_step_ms"], "floor_tokens_per_s": floor,
                                      "loop_tokens_per_s": ours[b].get("loop"),
                                      "graphs_tokens_per_s": ours[b].get("graphs"),
                                      "graphs_step_ms": ours[b].get("graphs_step_ms"),
                                      "sampled_tokens_per_s": ours[b]["sampled"],
                                      "nucleus_tokens_per_s": ours[b]["nucleus"],
                                      "transformers_tokens_per_s": theirs.get(b, {}).get("tokens_per_s")})
            print(f"  {size} batch {b}: {ours[b]['paged']:.1f} tok/s (loop {ours[b].get('loop')}, graphs "
                  f"{ours[b].get('graphs')})", flush=True)
        if "profile" in ours:
            results.setdefault("profile", {})[size] = ours["profile"]
            print(ours["profile"], flush=True)
        results.setdefault("capture", {})[size] = ours["capture"]
        if itl:
            results["arrivals"] = dict(ours["itl"], model=size)
        if size == WORKER_MODEL[smoke] and not args.skip_worker:
            b = WORKER_ROW[smoke]["streams"]
            row = worker_row(path, device, dtype, prompt=prompt, tokens=warm + steps, **WORKER_ROW[smoke])
            inproc = ours[b].get("graphs") or ours[b]["paged"]
            step_ms = 1e3 * b / inproc
            results["worker"] = dict(row, model=size, in_process_tokens_per_s=inproc, in_process_step_ms=step_ms)
            print(f"  {size} worker: {row['tokens_per_s']:.1f} tok/s vs in-process {inproc:.1f}", flush=True)
    if not args.skip_encoders:  # [gpu-encoders]: the image encoder of the largest model, in the bench's dtype
        t = time.perf_counter()
        size, batches = ENCODER_ROW[smoke]
        path = write_llava(args.workdir / size, size, 0, str(device), dtype)
        rate = matmul_rate(device, dtype, 512 if smoke else 8192)
        tower = tower_rows(path, device, dtype, batches, rate, 3 if smoke else 20)
        worker = encoder_worker_row(path, device, dtype, 16 if smoke else 512, max(batches))
        results["encoder"] = {"model": size, "batches": batches, "tower": tower, "worker": worker}
        if device.type == "cuda":  # the same worker without graphs (on a CPU it never has them)
            results["encoder"]["worker_eager"] = encoder_worker_row(path, device, dtype, 512, max(batches), True)
        print(f"  {size} image encoder: {', '.join(f'batch {b} {tower[b]:.1f}' for b in batches)} images/s; worker "
              f"{worker['images_per_s']:.1f} images/s ({time.perf_counter() - t:.0f} s)", flush=True)
    if not args.skip_tiered:
        size = "llava-tiny" if smoke else "llava-1b"
        path = write_llava(args.workdir / size, size, 0, str(device), dtype)
        conc, n, max_tokens = (4, 8, 8) if smoke else (16, 64, 32)
        results["tiered"] = dict(tiered(path, not smoke, conc, n, max_tokens, args.workdir / "tiered.log",
                                        120 if smoke else 240), model=size, max_tokens=max_tokens)
    print()
    print(table(results, head))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def table(results: dict, head: str) -> str:
    lines = [head, "HBM bound: the tokens/s at which a step takes exactly the time to read its bytes (weights + KV) "
             "at the copy bandwidth; loop: the same engine with one attention call per sequence per layer (what "
             "[paged-attention] replaced); transformers: LlavaForConditionalGeneration.generate, same weights", "",
             f"{'row':<26}{'batch':>6}{'tok/s':>10}{'ms/step':>9}{'HBM bound':>11}{'of bound':>10}{'loop':>9}"
             f"{'x loop':>8}{'transformers':>14}{'x transf.':>11}"]
    graphs = [r for r in results["decode"] if r.get("graphs_tokens_per_s")]
    def rel(mine: float, theirs: float | None, width: int, ratio: int) -> str:
        if not theirs:
            return f"{'-':>{width}}{'-':>{ratio}}"
        return f"{theirs:>{width}.1f}{mine / theirs:>{ratio}.2f}"

    for r in results["decode"]:
        lines.append(f"{r['model'] + ' decode':<26}{r['batch']:>6}{r['tokens_per_s']:>10.1f}{r['step_ms']:>9.2f}"
                     f"{r['floor_tokens_per_s']:>11.1f}{r['tokens_per_s'] / r['floor_tokens_per_s']:>10.2f}"
                     f"{rel(r['tokens_per_s'], r['loop_tokens_per_s'], 9, 8)}"
                     f"{rel(r['tokens_per_s'], r['transformers_tokens_per_s'], 14, 11)}")
    if graphs:  # [cuda-graphs] targets: batch 1 of llava-1.5-7b >= 0.6 of the bound, of llava-1b >= 0.4
        lines += ["", "CUDA graphs (decode steps replayed per batch bucket) vs the eager rows above:",
                  f"{'row':<26}{'batch':>6}{'graphs tok/s':>14}{'ms/step':>9}{'x eager':>9}{'of bound':>10}"]
        for r in graphs:
            lines.append(f"{r['model'] + ' decode':<26}{r['batch']:>6}{r['graphs_tokens_per_s']:>14.1f}"
                         f"{r['graphs_step_ms']:>9.2f}"
                         f"{r['graphs_tokens_per_s'] / r['tokens_per_s']:>9.2f}"
                         f"{r['graphs_tokens_per_s'] / r['floor_tokens_per_s']:>10.2f}")
        for model, took in (results.get("capture") or {}).items():
            if took:
                lines.append(f"{model}: captured buckets {took['buckets']} in {took['seconds']} s, "
                             f"{took['memory_mib']} MiB")
        lines.append("")
    sampled = [r for r in results["decode"] if r.get("sampled_tokens_per_s")]
    if sampled:  # the sampler's cost: the fastest greedy variant against the same steps sampling
        lines += ["Sampling (temperature 0.8; nucleus: top_p 0.9 too) vs greedy, the fastest variant above:",
                  f"{'row':<26}{'batch':>6}{'sampled tok/s':>15}{'x greedy':>10}{'nucleus tok/s':>15}{'x greedy':>10}"]
        for r in sampled:
            greedy = r.get("graphs_tokens_per_s") or r["tokens_per_s"]
            lines.append(f"{r['model'] + ' decode':<26}{r['batch']:>6}{r['sampled_tokens_per_s']:>15.1f}"
                         f"{r['sampled_tokens_per_s'] / greedy:>10.2f}{r['nucleus_tokens_per_s']:>15.1f}"
                         f"{r['nucleus_tokens_per_s'] / greedy:>10.2f}")
        lines.append("")
    by_model: dict = {}
    for r in results["decode"]:
        by_model.setdefault(r["model"], {})[r["batch"]] = r["tokens_per_s"]
    for model, rates in by_model.items():
        if 1 in rates and len(rates) > 1:
            top = max(rates)
            lines.append(f"{model}: batch {top} gives {rates[top] / rates[1]:.1f}x batch 1's tokens/s")
    a = results.get("arrivals")
    if a:
        lines.append(f"arrivals ({a['model']}): {a['streams']} streams decoding while {a['arrivals']} prompts of "
                     f"{a['prompt_tokens']} tokens (one image + text) arrive; ITL in ms")
        for name in ("unchunked", "chunked"):
            r = a[name]
            budget = "all at once" if name == "unchunked" else f"budget {a['budget']}"
            lines.append(f"  {name:<10} ({budget}): quiet p50 {r['quiet_p50_ms']:.1f}, during p50 {r['p50_ms']:.1f} "
                         f"p99 {r['p99_ms']:.1f} worst {r['worst_ms']:.1f} (p99 / quiet p50 "
                         f"{r['p99_ms'] / r['quiet_p50_ms']:.1f}x), prefill over {r['prefill_steps']} steps, "
                         f"{r.get('kernel_compiles')} attention kernel compiles")
    w = results.get("worker")
    if w:  # [cuda-graphs] target: the worker's decode throughput within 10% of the in-process engine's
        share = w["tokens_per_s"] / w["in_process_tokens_per_s"]
        steady = w.get("steady_tokens_per_s") or 0.0
        lines.append(f"worker ({w['model']}, one backbone process, Redis round trips overlapped): {w['streams']} "
                     f"streams decode {w['tokens_per_s']:.1f} tok/s from the first token on = {share:.2f}x the "
                     f"in-process engine's {w['in_process_tokens_per_s']:.1f}; with every stream decoding "
                     f"{steady:.1f} tok/s = {steady / w['in_process_tokens_per_s']:.2f}x; gap between a stream's "
                     "tokens p50 "
                     f"{w['itl_p50_ms']:.2f} ms vs the in-process step {w['in_process_step_ms']:.2f} ms "
                     f"({w['itl_p50_ms'] / w['in_process_step_ms']:.2f}x), p99 {w['itl_p99_ms']:.2f} ms")
        if w.get("loop_ms_per_step"):
            lines.append("  the worker loop per step (ms, its metrics): " + ", ".join(
                f"{k} {v:.2f}" for k, v in w["loop_ms_per_step"].items()))
        lines.append(f"  while images arrive at {w['images_per_s']:g}/s ({w['images_sent']} sent, "
                     f"{w['images_finished']} finished): stream ITL p50 {w['arrivals_itl_p50_ms']:.2f} ms, p99 "
                     f"{w['arrivals_itl_p99_ms']:.2f} ms")
    e = results.get("encoder")
    if e:  # [gpu-encoders] targets on an H200: the tower at batch 32 >= 0.3 of its floor; the worker >= 0.5 of it
        t = e["tower"]
        lines.append(f"image encoder ({e['model']}: tower to its feature layer + projector, "
                     f"{t['flops_per_image'] / 1e9:.1f} GFLOP per image; matmul rate "
                     f"{t['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s; FLOP floor {t['floor_images_per_s']:.1f} "
                     "images/s)")
        for label, rows in (("eager", t), ("graphs", t.get("graphs"))):
            if rows:
                lines += tower_lines(label, rows, t, e["batches"])
        top = max(t[max(e["batches"])], t.get("graphs", {}).get(max(e["batches"]), 0.0))
        for label, w in (("", e["worker"]), (" with --eager", e.get("worker_eager"))):
            if not w:
                continue
            lines.append(f"  worker{label} end to end ({w['images']} {w['jpeg']} JPEGs, max batch {w['max_batch']}: "
                         f"fetch, decode, preprocess, encode, publish): {w['images_per_s']:.1f} images/s = "
                         f"{w['images_per_s'] / top:.2f} of the tower's own best rate at batch {max(e['batches'])}")
            if w.get("share_of_wall"):
                lines.append("    its time, as shares of the run's wall time: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in w["share_of_wall"].items()))
    t = results["tiered"]
    if t:
        lines.append(f"{'tiered ' + t['model']:<26}concurrency {t['concurrency']}, {t['requests']} requests x "
                     f"{t['max_tokens']} tokens, one image each: {t['requests_per_s']:.2f} requests/s, TTFT p50 "
                     f"{t['ttft_p50_ms']:.0f} ms p90 {t['ttft_p90_ms']:.0f} ms, {t['output_tokens_per_s']:.1f} "
                     f"output tok/s")
    return "\n".join(lines)


def tower_lines(label: str, rows: dict, eager: dict, batches: list[int]) -> list[str]:
    """The tower's rows run one way (eager, or replayed from graphs: then against eager too)."""
    floor = eager["floor_images_per_s"]
    vs = (lambda b: "") if rows is eager else (lambda b: f" ({rows[b] / eager[b]:.2f}x eager)")
    lines = []
    c = rows.get("capture")
    if c and c["buckets"]:
        lines.append(f"  {label}: {len(c['buckets'])} buckets captured in {c['seconds']} s, {c['memory_mib']} MiB, "
                     f"replay vs eager {c['replay_vs_eager']:.2g}")
    elif c:
        lines.append(f"  {label}: not captured (a CPU): their static buffers run eagerly")
    for b in batches:
        lines.append(f"  {label} tower batch {b:>3}: {rows[b]:.1f} images/s = {rows[b] / floor:.2f} of the floor"
                     + vs(b))
    x = rows["with_transfers"]
    lines.append(f"  {label} tower batch {x['batch']:>3} as the worker runs it (pinned batch in, cast + check, "
                 f"payloads out): {x['images_per_s']:.1f} images/s = {x['images_per_s'] / rows[x['batch']]:.2f} of "
                 "its bare forward")
    x = rows["with_preprocessing"]
    lines.append(f"  {label} the same while {x['pool_threads']} threads preprocess JPEGs: {x['images_per_s']:.1f} "
                 f"images/s = {x['images_per_s'] / rows[x['batch']]:.2f} of its bare forward (the pool: "
                 f"{x['pool_images_per_s']:.0f} images/s meanwhile)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
