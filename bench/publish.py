"""An encoder worker's answer path for one batch ([gpu-encoders]): 32 LLaVA-1.5 images' rows (576 x 4096, bf16)
published to a real Redis through cache/tensors.py's three round trips (ack, store and take, tell), the way the
worker did it before against now, and the worker's loop with publishing inline against on its own thread.

    .venv/bin/python bench/publish.py [--batch 32] [--rows 576] [--hidden 4096] [--repeats 8] [--forward-ms 31]
                                      [--json out.json]

Prints, measured in one run against one embedded Redis on loopback:
- **serialize**: ``safetensors.torch.save`` per item (before) vs :func:`cache.codec.tensor_payloads` (now: one copy
  into one buffer for the batch; on a GPU that copy is the device-to-host copy itself, so the host does none);
- **publish**: ``TensorPublisher.execute`` on a redis-py client packing with hiredis (before: it copies each value
  twice) vs on :func:`cache.client.connect`'s client (its packer hands the payload memoryviews to the socket);
- the ratios, and the images/s one worker's publishing could sustain each way;
- **overlap**: batches/s of a loop of ``--forward-ms`` of forward per batch (a sleep standing in for the GPU, which
  leaves the host idle; 31 ms is the H200's llava-1.5-7b tower at batch 32) then the answer, inline vs on a thread
  as encoders/worker.py does it, with the new answer path.

The rows are random bf16 (the bytes' values do not matter to Redis). On the GPU the real worker's figures are in
bench/gpu.py's encoder rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.client import connect  # noqa: E402
from cache.codec import tensor_payloads  # noqa: E402
from cache.embedded import EmbeddedRedis  # noqa: E402
from cache.keys import ENCODER_GROUP, Keys, alive  # noqa: E402
from cache.streams import ensure_group  # noqa: E402
from cache.tensors import Answers, TensorPublisher  # noqa: E402

KEYS = Keys("bench")
STREAM = KEYS.jobs("image")
REPLY = "bench:reply"


def queued(r, n: int) -> list[bytes]:
    """``n`` jobs queued and read by this consumer (entry ids): the acks then find them pending, as a worker's do."""
    for _ in range(n):
        r.xadd(STREAM, {"p": b"job"})
    reply = r.xreadgroup(ENCODER_GROUP, "bench", {STREAM: ">"}, count=n)
    return [entry_id for entry_id, _ in reply[0][1]]


def answer(publisher: TensorPublisher, r, datas: list, entry_ids: list[bytes]) -> None:
    answers = Answers()
    for entry_id, data in zip(entry_ids, datas):
        digest = uuid.uuid4().hex
        keys = (KEYS.tensor("enc", digest), KEYS.waiters("enc", digest), KEYS.lease("enc", digest), KEYS.blob(digest))
        answers.publish(keys, entry_id, data, 576, 60, b"done", REPLY)
    sent = publisher.execute(answers)
    assert sent == len(datas), f"{sent} of {len(datas)} answers sent"
    r.xtrim(REPLY, maxlen=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rows", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--forward-ms", type=float, default=31.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = torch.randn(args.batch, args.rows, args.hidden).to(torch.bfloat16)  # [B, N, H]
    gb = out.numel() * out.element_size() / 1e9
    res: dict = {"batch": args.batch, "rows": args.rows, "hidden": args.hidden, "GB_per_batch": gb}
    # maxmemory of a few batches: once it is full, every batch's writes take the memory evicted tensors leave (as
    # a serving Redis does), rather than faulting in fresh pages. A warm-up fills it first.
    with EmbeddedRedis(maxmemory=f"{max(1, round(8 * gb))}gb") as server:
        old_r = redis.Redis.from_url(server.url)  # redis-py's default packer (hiredis, installed with the product)
        new_r = connect(server.url)
        ensure_group(new_r, STREAM, ENCODER_GROUP)
        new_r.set(alive(REPLY), 1)  # no TTL: not evictable
        ways = {"before": (lambda: [st_save({"t": t}) for t in out], TensorPublisher(old_r, STREAM, ENCODER_GROUP)),
                "now": (lambda: [p.data for p in tensor_payloads(list(out))],
                        TensorPublisher(new_r, STREAM, ENCODER_GROUP))}
        times = {way: {"serialize": [], "publish": []} for way in ways}
        for _ in range(12):
            answer(ways["now"][1], new_r, ways["now"][0](), queued(new_r, args.batch))
        for _ in range(args.repeats):  # the two ways alternate, so drift on a noisy machine hits both
            for way, (serialize, publisher) in ways.items():
                entry_ids = queued(new_r, args.batch)
                t0 = time.perf_counter()
                datas = serialize()
                t1 = time.perf_counter()
                answer(publisher, new_r, datas, entry_ids)
                times[way]["serialize"].append(t1 - t0)
                times[way]["publish"].append(time.perf_counter() - t1)
                del datas
        for way, phases in times.items():
            s, p = min(phases["serialize"]), min(phases["publish"])
            res[way] = {"serialize_s": s, "publish_s": p, "serialize_GBps": gb / s, "publish_GBps": gb / p,
                        "images_per_s": args.batch / (s + p)}
        # The loop: forward (stand-in), then the answer inline or handed to one thread (waited before the next).
        publisher = ways["now"][1]
        pool = ThreadPoolExecutor(1)
        loops = {}
        for mode in ("inline", "thread", "inline", "thread"):
            batches = [queued(new_r, args.batch) for _ in range(args.repeats)]
            t0, future = time.perf_counter(), None
            for entry_ids in batches:
                time.sleep(args.forward_ms / 1e3)
                datas = [p.data for p in tensor_payloads(list(out))]
                if mode == "inline":
                    answer(publisher, new_r, datas, entry_ids)
                else:
                    if future is not None:
                        future.result()
                    future = pool.submit(answer, publisher, new_r, datas, entry_ids)
            if future is not None:
                future.result()
            rate = args.batch * args.repeats / (time.perf_counter() - t0)
            loops[mode] = max(loops.get(mode, 0.0), rate)
        pool.shutdown()
        res["loop_images_per_s"] = loops
        res["forward_ms"] = args.forward_ms
        res["redis"] = new_r.info("server").get("redis_version")
    b, n = res["before"], res["now"]
    print(f"batch of {args.batch} x [{args.rows}, {args.hidden}] bf16 ({gb:.3f} GB), one Redis {res['redis']} on "
          f"loopback, best of {args.repeats}:")
    for way in ("before", "now"):
        r = res[way]
        print(f"  {way:6s} serialize {r['serialize_s'] * 1e3:7.1f} ms ({r['serialize_GBps']:.2f} GB/s)  publish "
              f"{r['publish_s'] * 1e3:7.1f} ms ({r['publish_GBps']:.2f} GB/s)  -> {r['images_per_s']:.0f} images/s")
    print(f"  now / before: serialize {b['serialize_s'] / n['serialize_s']:.2f}x, publish "
          f"{b['publish_s'] / n['publish_s']:.2f}x, both {n['images_per_s'] / b['images_per_s']:.2f}x")
    print(f"loop with a {args.forward_ms:g} ms forward per batch: inline {loops['inline']:.0f} images/s, publishing "
          f"on a thread {loops['thread']:.0f} images/s ({loops['thread'] / loops['inline']:.2f}x); the forward alone "
          f"{args.batch / args.forward_ms * 1e3:.0f} images/s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
