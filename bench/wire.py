"""Where the bytes go: one LLaVA-1.5 image's embeddings (576 x 4096) on the wire, fp32 vs bf16, compressed or not,
and written to a real Redis with one command vs through a script that copies them.

    .venv/bin/python bench/wire.py [--rows 576] [--hidden 4096] [--repeats 20] [--json out.json]

Prints, measured in one run:
- bytes per image in fp32 and bf16 (what the safetensors codec writes);
- compression ratio and throughput (MB/s of input) of zlib levels 1 and 6, and of zlib after a byte shuffle (the
  bf16 exponent bytes apart from the mantissa bytes), against the Redis write + read throughput of the same bytes;
  compression pays only where it is faster than the bytes it saves would take on the wire;
- HSET of the tensor (one command) vs EVAL with the tensor as an argument (the publish path before [redis-cluster]).

The embeddings are synthetic (no real checkpoint is reachable here): Gaussian with a few large-magnitude channels,
the shape of projector outputs; real ones may compress a little differently, never like text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.codec import encode_tensor  # noqa: E402
from cache.embedded import EmbeddedRedis  # noqa: E402

MB = 1e6


def embeddings(rows: int, hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    outliers = torch.randperm(hidden, generator=g)[: max(1, hidden // 256)]
    x[:, outliers] *= 20  # a few channels of large magnitude, as projector outputs have
    return x


def shuffle(data: bytes, width: int) -> bytes:
    """Byte ``i`` of every element together: the exponent bytes in one run, the mantissa bytes in another."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.copy().tobytes()


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    x = embeddings(args.rows, args.hidden)
    out: dict = {"rows": args.rows, "hidden": args.hidden, "dtypes": {}}
    with EmbeddedRedis(maxmemory="2gb") as server:
        import redis

        r = redis.Redis(port=server.port)
        copy = r.register_script("redis.call('HSET', KEYS[1], 'data', ARGV[1], 'n', ARGV[2]) return 1")
        for dtype, name, width in ((torch.float32, "float32", 4), (torch.bfloat16, "bfloat16", 2)):
            blob = encode_tensor(x.to(dtype), name)
            raw = x.to(dtype).view(torch.uint8 if width == 1 else torch.int16 if width == 2 else torch.int32)
            raw = raw.numpy().tobytes()
            size = len(blob) / MB
            key = f"bench:t:{name}"
            write = best(lambda: r.hset(key, mapping={"data": blob, "n": args.rows}), args.repeats)
            read = best(lambda: r.hget(key, "data"), args.repeats)
            scripted = best(lambda: copy(keys=[key], args=[blob, args.rows]), args.repeats)
            row = {"bytes": len(blob), "redis_write_MBps": size / write, "redis_read_MBps": size / read,
                   "hset_s": write, "eval_copy_s": scripted, "codecs": {}}
            for codec, compress, decompress in (
                    ("zlib-1", lambda: zlib.compress(raw, 1), zlib.decompress),
                    ("zlib-6", lambda: zlib.compress(raw, 6), zlib.decompress),
                    ("shuffle+zlib-1", lambda: zlib.compress(shuffle(raw, width), 1), zlib.decompress)):
                packed = compress()
                c = best(compress, max(3, args.repeats // 4))
                d = best(lambda: decompress(packed), max(3, args.repeats // 4))
                row["codecs"][codec] = {"ratio": len(packed) / len(raw), "compress_MBps": len(raw) / MB / c,
                                        "decompress_MBps": len(raw) / MB / d}
            out["dtypes"][name] = row
            r.delete(key)
    f32, b16 = out["dtypes"]["float32"], out["dtypes"]["bfloat16"]
    print(f"one image ({args.rows} x {args.hidden}): float32 {f32['bytes'] / MB:.2f} MB, bfloat16 "
          f"{b16['bytes'] / MB:.2f} MB ({b16['bytes'] / f32['bytes']:.2f}x)")
    for name, row in out["dtypes"].items():
        print(f"\n{name}: Redis (loopback) write {row['redis_write_MBps']:.0f} MB/s, read "
              f"{row['redis_read_MBps']:.0f} MB/s; HSET {row['hset_s'] * 1e3:.2f} ms vs EVAL copying the bytes "
              f"{row['eval_copy_s'] * 1e3:.2f} ms ({row['eval_copy_s'] / row['hset_s']:.2f}x)")
        for codec, c in row["codecs"].items():
            print(f"  {codec:15s} ratio {c['ratio']:.3f}  compress {c['compress_MBps']:7.0f} MB/s  decompress "
                  f"{c['decompress_MBps']:7.0f} MB/s  ({c['compress_MBps'] / row['redis_write_MBps']:.3f}x the "
                  "Redis write rate)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
