"""What the [isolation] checks cost on the hot paths, measured against the work they guard, in one run.

* Gateway: ``PromptBuilder.build`` of a text + image + audio request (base64, header probes, sha256, template,
  tokenizer) vs the header probes alone (``probe_image`` + ``probe_audio`` + ``placeholder_count``).
* Backbone: one decode step of the engine at batch 1 / 8 / 32 vs the per-step soundness check on its logits
  (``(logits < inf).all(-1)``, the reduction ``sample_batch`` adds for its per-row status).

Both sides of each ratio alternate in the same loop. Usage: ``.venv/bin/python bench/isolation.py`` (~30 s).
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

from backbone.engine import load_engine  # noqa: E402
from gateway.prompt import PromptBuilder  # noqa: E402
from gateway.schemas import parse_chat_request  # noqa: E402
from models.media import placeholder_count, probe_audio, probe_image  # noqa: E402
from models.spec import ModelSpec  # noqa: E402
from router.messages import SamplingParams  # noqa: E402
from tests.media import b64, data_url, png_bytes, wav_bytes  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def gateway(spec: ModelSpec, rounds: int) -> None:
    builder = PromptBuilder(spec, spec.load_tokenizer(), 16 << 20)
    png, wav = png_bytes(320, 240, seed=1), wav_bytes(2.0, seed=1)
    body = json.dumps({"model": spec.name, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What do you see and hear?"},
        {"type": "image_url", "image_url": {"url": data_url(png)}},
        {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}}]}]}).encode()
    build, probe = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        builder.build(parse_chat_request(body))
        t1 = time.perf_counter()
        placeholder_count(spec, "image", probe_image(png))
        placeholder_count(spec, "audio", probe_audio(wav))
        t2 = time.perf_counter()
        build.append(t1 - t0)
        probe.append(t2 - t1)
    print(f"gateway  parse+build {median_ms(build):7.3f} ms   header probes {median_ms(probe):7.3f} ms   "
          f"probes / build = {median_ms(probe) / median_ms(build):.3f}")


def backbone(spec: ModelSpec, rounds: int) -> None:
    engine = load_engine(spec, prefix_cache=False)
    vocab = spec.config["text_config"]["vocab_size"]
    for batch in (1, 8, 32):
        seqs = []
        for i in range(batch):
            ids = [1] + [(7 * i + k) % (vocab - 10) + 5 for k in range(24)]
            seq = engine.new_sequence(f"b{i}", len(ids), SamplingParams(max_tokens=10_000, temperature=1.0,
                                                                        seed=i, ignore_eos=True))
            engine.prefill(seq, ids, [])
            seqs.append(seq)
        logits = torch.randn(batch, vocab)
        step, check = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            engine.step(seqs)
            t1 = time.perf_counter()
            (logits < float("inf")).all(dim=-1).tolist()
            t2 = time.perf_counter()
            step.append(t1 - t0)
            check.append(t2 - t1)
        for seq in seqs:
            engine.release(seq)
        print(f"backbone batch {batch:>2}  decode step {median_ms(step):7.3f} ms   finite check "
              f"{median_ms(check) * 1e3:7.1f} us   check / step = {median_ms(check) / median_ms(step):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"))
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    if not (args.model_dir / "model.safetensors").exists():
        from models.demo import write_demo_model

        write_demo_model(args.model_dir, "small")
    torch.set_num_threads(2)
    spec = ModelSpec.from_dir(args.model_dir)
    gateway(spec, args.rounds)
    backbone(spec, args.rounds)


if __name__ == "__main__":
    main()
