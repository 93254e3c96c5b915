"""The host's side of an eager encoder forward, alone and while the encoder worker's preprocessing pool is busy
([gpu-encoders]: why the encoder's forward is replayed from CUDA graphs, encoders/graphs.py).

    .venv/bin/python bench/dispatch.py [--threads 1,2,8] [--repeats 30] [--json out.json]

On a GPU an eager forward costs the host one Python dispatch per kernel; below batch 32 that, not the kernels, sets
the pace of LLaVA-1.5's tower on an H200 (~13 ms at batch 1 and at batch 8 alike). This bench measures that host
work where no GPU is needed: LLaVA-1.5's image encoder with its real depth and structure (CLIP ViT-L/14-336 cut at
its feature layer, 23 layers, + the projector) but 32 wide and 4 patches, so its arithmetic is negligible and what is
timed is the dispatch of its ~3,000 ops. It prints the median ms of one forward on an idle host, then while pools
of ``--threads`` threads decode and preprocess photo-sized JPEGs as the worker's pool does the next batch, and the
ratios, measured in one run. A replayed graph is one call, whatever the pool does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import busy_pool  # noqa: E402
from encoders.preprocess import ImagePreprocessor  # noqa: E402
from models.family import plain_json  # noqa: E402
from models.llava import ImageEncoder  # noqa: E402
from models.real_shapes import SIZES, _image_processor  # noqa: E402


def thin_tower() -> ImageEncoder:
    """llava-1.5-7b's image encoder at its real depth, 32 wide, on a 28 px input (4 patches)."""
    from transformers import LlavaConfig

    real = SIZES["llava-1.5-7b"]
    vision = dict(real["vision"], hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=28)
    text = dict(real["text"], hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                num_hidden_layers=1, vocab_size=64)
    config = plain_json(LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default").to_dict())
    module = ImageEncoder(config)
    module.cut()
    return module.eval()


def forward_ms(module, x, repeats: int) -> float:
    with torch.inference_mode():
        module(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2,8", help="pool sizes, comma-separated (the worker's default: "
                                                       "min(8, cores))")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one launching thread, as on a GPU (its kernels run on the device)
    module = thin_tower()
    x = torch.randn(1, 3, 28, 28)
    ops = len(list(module.modules()))
    pre = ImagePreprocessor(_image_processor(SIZES["llava-1.5-7b"]["vision"]), 576)
    idle = forward_ms(module, x, args.repeats)
    print(f"one eager forward of llava-1.5-7b's image encoder structure ({ops} modules, arithmetic negligible): "
          f"{idle:.2f} ms of host time on an idle host")
    results = {"idle_ms": idle, "busy": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        ms, pool = busy_pool(pre, lambda: forward_ms(module, x, args.repeats), threads)
        rate = pool["pool_images_per_s"]
        results["busy"][threads] = {"ms": ms, "ratio": ms / idle, "pool_images_per_s": rate}
        print(f"  while {threads} preprocessing thread(s) run ({rate:.0f} images/s): {ms:.2f} ms = "
              f"{ms / idle:.1f}x idle")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
