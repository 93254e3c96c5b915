"""The monolithic baseline ([bench]): what a user would write with transformers instead of Tributary.

    .venv/bin/python bench/monolith.py --model DIR [--port 8100] [--max-batch 8] [--max-wait-ms 20] [--threads N]

One process serving the same HTTP API (``POST /v1/chat/completions``, streamed as SSE or not, ``GET /v1/models``,
``GET /health``): each request's messages are parsed and rendered with the checkpoint's chat template, its images and
audio decoded and encoded inline (the checkpoint's own preprocessing, its encoder + projector in torch), the media
rows spliced into the embeddings, and ``LlamaForCausalLM`` (built from the checkpoint's text config, loaded with its
``language_model.*`` weights) fed ``inputs_embeds`` through ``generate``. Requests are batched statically: a batch
closes at ``--max-batch`` requests or ``--max-wait-ms`` after its first, its prompts are left-padded, and it runs to
its longest request's end before the next batch starts (no continuous batching: the simple thing a user would write
first). Greedy unless the batch's first request asks for a temperature; ``ignore_eos`` honoured when every request of
the batch sets it. Request parsing and validation are Tributary's own (gateway/schemas.py, gateway/prompt.py), so
both servers accept and refuse the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from bench.openai_wire import Completion  # noqa: E402
from bench.openai_wire import usage as completion_usage  # noqa: E402

DONE = object()


@dataclass
class Job:
    request_id: str
    embeds: torch.Tensor  # [S, H]
    max_tokens: int
    temperature: float
    ignore_eos: bool
    prompt_tokens: int
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    tokens: list[int] = field(default_factory=list)
    done: bool = False

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class BatchStreamer(BaseStreamer):
    """Hands each generated token of a batch to its request, and ends each request at its own limit or EOS."""

    def __init__(self, jobs: list[Job], eos: set[int]):
        self.jobs, self.eos, self.first = jobs, eos, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate first puts the prompt (empty here: inputs_embeds)
            self.first = False
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if token in self.eos and not job.ignore_eos:
                job.done = True
                job.emit(("stop", None))
                continue
            job.tokens.append(token)
            job.emit(("token", token))
            if len(job.tokens) >= job.max_tokens:
                job.done = True
                job.emit(("length", None))

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                job.done = True
                job.emit(("length", None))


class Monolith:
    def __init__(self, model_dir: Path, max_batch: int, max_wait_ms: float):
        from transformers import LlamaConfig, LlamaForCausalLM

        from encoders.loader import load_preprocessor, load_torch_module
        from gateway.prompt import PromptBuilder
        from models.checkpoint import read_tensors
        from models.spec import ModelSpec

        self.spec = ModelSpec.from_dir(model_dir)
        self.tokenizer = self.spec.load_tokenizer()
        self.builder = PromptBuilder(self.spec, self.tokenizer, 20 << 20)
        self.preprocess = {m: load_preprocessor(self.spec, m) for m in self.spec.modalities}
        self.encoders = {m: load_torch_module(self.spec, m).eval() for m in self.spec.modalities}
        text = dict(self.spec.config["text_config"])
        self.model = LlamaForCausalLM(LlamaConfig(**text)).eval()
        missing, unexpected = self.model.load_state_dict(read_tensors(model_dir, "language_model."), strict=False)
        if missing or unexpected:
            raise SystemExit(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
        eos = text.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad = text.get("pad_token_id") or 0
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True, name="batcher").start()

    # --- request side (event loop) -------------------------------------------------------------------------------

    def prepare(self, body: bytes, loop) -> tuple[Job, object]:
        """Parse, render, decode and encode the media inline, splice: one job (on a worker thread)."""
        from backbone.fusion import fuse
        from gateway.prompt import expand_placeholders
        from gateway.schemas import parse_chat_request

        req = parse_chat_request(body)
        prompt = self.builder.build(req)
        rows = []
        with torch.inference_mode():
            for part in prompt.media:
                prepared = self.preprocess[part.modality](part.data)
                batch = prepared.data.unsqueeze(0)
                out = self.encoders[part.modality](batch) if prepared.length is None else \
                    self.encoders[part.modality](batch, torch.tensor([prepared.length]))
                rows.append((part.modality, out[0, : prepared.num_tokens]))
            ids = expand_placeholders(prompt.token_ids, self.spec.placeholder_ids, [r.shape[0] for _, r in rows])
            embeds = fuse(self.model.get_input_embeddings(), ids, rows, self.spec.placeholder_ids)[0]
        budget = req.token_budget() or 256
        job = Job(uuid.uuid4().hex, embeds, budget, req.temperature or 0.0, bool(req.ignore_eos), len(ids),
                  asyncio.Queue(), loop)
        return job, req

    # --- the batcher (one thread) --------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 -- the batch's requests get the error, the server goes on
                for job in batch:
                    job.emit(("error", str(exc)))

    def _run(self, batch: list[Job]) -> None:
        longest = max(j.embeds.shape[0] for j in batch)
        hidden = batch[0].embeds.shape[1]
        embeds = torch.zeros(len(batch), longest, hidden, dtype=batch[0].embeds.dtype)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, job in enumerate(batch):  # left padding, as generate wants for a decoder-only model
            n = job.embeds.shape[0]
            embeds[i, longest - n :] = job.embeds
            mask[i, longest - n :] = 1
        sample = batch[0].temperature > 0
        kwargs = {"do_sample": True, "temperature": batch[0].temperature} if sample else {"do_sample": False}
        eos = None if all(j.ignore_eos for j in batch) else sorted(self.eos)
        with torch.inference_mode():
            self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                max_new_tokens=max(j.max_tokens for j in batch),
                                eos_token_id=eos, pad_token_id=self.pad, streamer=BatchStreamer(batch, self.eos),
                                **kwargs)


def app(mono: Monolith) -> Starlette:
    name = mono.spec.name

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "monolith"}]})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def chat(request: Request):
        from gateway.errors import APIError

        body = await request.body()
        try:
            job, req = await asyncio.to_thread(mono.prepare, body, asyncio.get_running_loop())
        except APIError as exc:
            return exc.response({})
        mono.jobs.put(job)
        out = Completion(name, job.request_id)
        chunk = out.chunk


        async def events():
            decoded, finish = "", None
            while True:
                kind, value = await job.out.get()
                if kind == "token":
                    text = mono.tokenizer.decode(job.tokens)
                    delta, decoded = text[len(decoded):], text
                    if delta:
                        yield kind, delta
                elif kind == "error":
                    yield kind, value
                    return
                else:
                    finish = kind
                    yield "finish", finish
                    return

        def usage() -> dict:
            return completion_usage(job.prompt_tokens, len(job.tokens))

        if req.stream:
            async def sse():
                yield chunk({"role": "assistant", "content": ""})
                async for kind, value in events():
                    if kind == "token":
                        yield chunk({"content": value})
                    elif kind == "finish":
                        yield chunk({}, value)
                    else:
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk({}, usage=usage())
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish = "", "length"
        async for kind, value in events():
            if kind == "token":
                text += value
            elif kind == "finish":
                finish = value
            else:
                return JSONResponse({"error": {"message": value, "type": "server_error"}}, status_code=500)
        return JSONResponse(out.body(text, finish, usage()))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
                             Route("/health", health)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn

    uvicorn.run(app(Monolith(args.model, args.max_batch, args.max_wait_ms)), host=args.host, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
