"""The Ray Serve baseline ([bench]): the same split as Tributary, as a Ray Serve user would write it.

    bash scripts/bench-env.sh --ray                   # once: .venv-ray (the product's lock + ray[serve] 2.60)
    .venv-ray/bin/python bench/rayserve.py --model DIR [--port 8200] [--image-replicas 1] [--audio-replicas 1]

Deployments: ``ImageEncoder`` and ``AudioEncoder`` (preprocess + encoder + projector in torch, ``@serve.batch`` up to
8 items or 10 ms, their own replicas), ``Backbone`` (``LlamaForCausalLM`` on ``inputs_embeds`` through ``generate``,
``@serve.batch`` up to 8 requests or 20 ms per batch, streamed token by token), and ``Gateway``, the HTTP ingress
(``POST /v1/chat/completions``, SSE or not; ``GET /v1/models``; ``GET /health``): it parses and renders the request
with Tributary's own code (the same prompts and refusals as the other two servers), awaits the encoders through
deployment handles, splices the rows into the embeddings and streams the backbone's tokens. Tensors travel through
Ray's object store (Ray's own serialization): the baseline's mechanism, not Tributary's. Ray runs here with
``--num-cpus`` logical CPUs (default: the cores this process may use); the backbone asks for 1, each encoder and the
gateway for 0.25 (logical: Ray schedules by them, the OS shares the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402

from bench.openai_wire import Completion  # noqa: E402
from bench.openai_wire import usage as completion_usage  # noqa: E402


def _spec(model_dir: str):
    sys.path.insert(0, str(ROOT))
    from models.spec import ModelSpec

    return ModelSpec.from_dir(Path(model_dir))


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Encoder:
    def __init__(self, model_dir: str, modality: str):
        import torch

        from encoders.loader import load_preprocessor, load_torch_module

        self.torch = torch
        spec = _spec(model_dir)
        self.preprocess = load_preprocessor(spec, modality)
        self.module = load_torch_module(spec, modality).eval()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, blobs: list[bytes]) -> list:
        torch = self.torch
        prepared = [self.preprocess(b) for b in blobs]
        out = []
        with torch.inference_mode():
            shapes: dict = {}
            for i, p in enumerate(prepared):
                shapes.setdefault((tuple(p.data.shape), p.length is None), []).append(i)
            rows: dict[int, object] = {}
            for (_, plain), idx in shapes.items():
                batch = torch.stack([prepared[i].data for i in idx])
                y = self.module(batch) if plain else self.module(batch, torch.tensor([prepared[i].length for i in idx]))
                for k, i in enumerate(idx):
                    rows[i] = y[k, : prepared[i].num_tokens].clone()
            out = [rows[i] for i in range(len(prepared))]
        return out


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Backbone:
    def __init__(self, model_dir: str):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from models.checkpoint import read_tensors

        self.torch = torch
        spec = _spec(model_dir)
        text = dict(spec.config["text_config"])
        self.model = LlamaForCausalLM(LlamaConfig(**text)).eval()
        self.model.load_state_dict(read_tensors(Path(model_dir), "language_model."))
        eos = text.get("eos_token_id")
        self.eos = sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))
        self.pad = text.get("pad_token_id") or 0

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate(self, requests: list[tuple]):
        """Each request: (embeds [S, H], max_tokens, ignore_eos). Yields, per step, one token per request, or
        StopIteration for a request that is done (Serve then ends its stream)."""
        import threading

        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        longest = max(e.shape[0] for e, _, _ in requests)
        embeds = torch.zeros(len(requests), longest, requests[0][0].shape[1])
        mask = torch.zeros(len(requests), longest, dtype=torch.long)
        for i, (e, _, _) in enumerate(requests):
            embeds[i, longest - e.shape[0] :] = e
            mask[i, longest - e.shape[0] :] = 1
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:
                    self.first = False
                    return
                loop.call_soon_threadsafe(steps.put_nowait, value.reshape(-1).tolist())

            def end(self):
                loop.call_soon_threadsafe(steps.put_nowait, None)

        eos = None if all(ig for _, _, ig in requests) else self.eos

        def run():
            with torch.inference_mode():
                self.model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                    max_new_tokens=max(n for _, n, _ in requests), eos_token_id=eos,
                                    pad_token_id=self.pad, streamer=Streamer())

        threading.Thread(target=run, daemon=True).start()
        made = [0] * len(requests)
        done = [False] * len(requests)
        while (tokens := await steps.get()) is not None:
            out = []
            for i, t in enumerate(tokens):
                _, limit, ignore = requests[i]
                if done[i] or (t in self.eos and not ignore):
                    done[i] = True
                    out.append(StopIteration)
                    continue
                made[i] += 1
                done[i] = made[i] >= limit
                out.append(t)
            yield out

    async def stream(self, embeds, max_tokens: int, ignore_eos: bool):
        async for token in self.generate((embeds, max_tokens, ignore_eos)):
            yield token


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Gateway:
    def __init__(self, model_dir: str, image, audio, backbone):
        import torch

        from gateway.prompt import PromptBuilder
        from models.checkpoint import read_tensors

        self.torch = torch
        self.spec = _spec(model_dir)
        self.tokenizer = self.spec.load_tokenizer()
        self.builder = PromptBuilder(self.spec, self.tokenizer, 20 << 20)
        weight = read_tensors(Path(model_dir), "language_model.model.embed_tokens.")["weight"]
        self.embed = torch.nn.Embedding.from_pretrained(weight)
        self.encoders = {"image": image, "audio": audio}
        self.backbone = backbone.options(stream=True)

    async def __call__(self, request: Request):
        path = request.url.path
        if path.endswith("/models"):
            return JSONResponse({"object": "list", "data": [{"id": self.spec.name, "object": "model"}]})
        if path.endswith("/health"):
            return JSONResponse({"status": "ok"})
        return await self.chat(request)

    async def chat(self, request: Request):
        from backbone.fusion import fuse
        from gateway.errors import APIError
        from gateway.prompt import expand_placeholders
        from gateway.schemas import parse_chat_request

        try:
            req = parse_chat_request(await request.body())
            prompt = self.builder.build(req)
        except APIError as exc:
            return exc.response({})
        rows = await asyncio.gather(*(self.encoders[p.modality].encode.remote(p.data) for p in prompt.media))
        media = [(p.modality, r) for p, r in zip(prompt.media, rows)]
        ids = expand_placeholders(prompt.token_ids, self.spec.placeholder_ids, [r.shape[0] for r in rows])
        with self.torch.inference_mode():
            embeds = fuse(self.embed, ids, media, self.spec.placeholder_ids)[0]
        budget = req.token_budget() or 256
        gen = self.backbone.stream.remote(embeds, budget, bool(req.ignore_eos))
        out = Completion(self.spec.name)
        chunk = out.chunk
        tokens: list[int] = []


        def usage() -> dict:
            return completion_usage(len(ids), len(tokens))

        async def texts():
            decoded = ""
            async for token in gen:
                tokens.append(token)
                text = self.tokenizer.decode(tokens)
                delta, decoded = text[len(decoded):], text
                if delta:
                    yield delta

        finish = lambda: "length" if len(tokens) >= budget else "stop"  # noqa: E731
        if req.stream:
            async def sse():
                yield chunk({"role": "assistant", "content": ""})
                async for delta in texts():
                    yield chunk({"content": delta})
                yield chunk({}, finish())
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk({}, usage=usage())
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text = "".join([d async for d in texts()])
        return JSONResponse(out.body(text, finish(), usage()))


def main() -> int:
    import os

    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--image-replicas", type=int, default=1)
    ap.add_argument("--audio-replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=None)
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    ray.init(num_cpus=args.num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    image = Encoder.options(name="ImageEncoder", num_replicas=args.image_replicas).bind(model, "image")
    audio = Encoder.options(name="AudioEncoder", num_replicas=args.audio_replicas).bind(model, "audio")
    serve.run(Gateway.bind(model, image, audio, Backbone.bind(model)), route_prefix="/", blocking=False)
    print(f"ray serve ready on http://127.0.0.1:{args.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
