"""Skeleton latency: one non-streamed text+image+audio chat request through the whole Tributary cluster vs. the same
models driven in ONE process (same loaders, same Engine decode loop; no Redis, no HTTP).

    .venv/bin/python bench/skeleton_latency.py [--requests 20] [--max-tokens 16] [--block 5]

Both sides see a fresh random PNG (320x240) and a fresh 2 s 16 kHz WAV on every request (so no encoder cache helps),
run at temperature 0 with ``ignore_eos`` so exactly ``--max-tokens`` tokens come out, and alternate in blocks
(ABAB..., the first block's side alternating too) so that machine noise hits both alike. Prints median / p90 of each
side, the ratio of medians (target <= 1.15) and a per-stage breakdown: the Tributary side's from the JSON logs the
tiers write to stderr (correlated by the ``x-request-id`` each response carries), the in-process side's measured
directly. The in-process side gets the workers' process set-up (``tune_allocator()``, all cores as torch threads).

Two columns help read a run on a small shared machine: ``faults/req`` (minor page faults of the side's processes per
request: allocator churn) and ``others`` (cores that processes outside this benchmark used while a request ran;
requests above ``--noisy`` are counted, and a quiet-only ratio is printed as well).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


# ----------------------------------------------------------------------------------------------------------- media
def png_bytes(rng: np.random.Generator, width: int = 320, height: int = 240) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(rng: np.random.Generator, seconds: float = 2.0, rate: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate, format="WAV")
    return buf.getvalue()


def messages(rng: np.random.Generator) -> list[dict]:
    img = "data:image/png;base64," + base64.b64encode(png_bytes(rng)).decode()
    wav = base64.b64encode(wav_bytes(rng)).decode()
    return [{"role": "user", "content": [
        {"type": "text", "text": "Describe the picture, then the sound."},
        {"type": "image_url", "image_url": {"url": img}},
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
    ]}]


# ------------------------------------------------------------------------------------------------------ noise meter
class CpuMeter:
    """CPU time the rest of the machine took while a request ran: busy jiffies of the whole machine (steal included)
    minus those of this benchmark's process tree (itself, ``tributary up`` and every tier and Redis under it).

    Both counters come from the same scheduler ticks, so the difference is the other tenants' share; sampled between
    requests, outside the timed calls."""

    def __init__(self, root: int):
        self.root = root
        self.hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _stat(pid: str) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None

    def sample(self) -> tuple[int, int, int]:
        """(busy jiffies of the machine, jiffies of our tree, minor page faults of our tree)"""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        stats = {pid: st for pid in os.listdir("/proc") if pid.isdigit() and (st := self._stat(pid))}
        kids: dict[str, list[str]] = defaultdict(list)
        for pid, st in stats.items():
            kids[st[1]].append(pid)
        ours, faults, todo = 0, 0, [str(self.root)]
        while todo:
            pid = todo.pop()
            if pid in stats:
                ours += int(stats[pid][11]) + int(stats[pid][12])  # utime + stime of all its threads
                faults += int(stats[pid][7])
            todo.extend(kids.get(pid, []))
        return busy, ours, faults

    def foreign_s(self, before: tuple, after: tuple) -> float:
        return max(0, (after[0] - before[0]) - (after[1] - before[1])) / self.hz


# ------------------------------------------------------------------------------------------------------ in-process
class InProcess:
    """The tiers' steps in one process: parse + template + tokenize, image and audio preprocess + encode, expand,
    prefill, decode steps, detokenize. Same loaders and Engine as the workers."""

    def __init__(self, model_dir: Path):
        import torch
        import transformers

        from backbone.engine import load_engine
        from encoders.loader import load_preprocessor, load_runtime
        from gateway.config import GatewayConfig
        from gateway.prompt import PromptBuilder
        from models.spec import ModelSpec
        from router.lifecycle import tune_allocator

        transformers.logging.set_verbosity_error()  # the demo's custom model_type makes AutoTokenizer warn
        tune_allocator()  # the workers' process set-up, so that the ratio is not an allocator artefact
        torch.set_num_threads(os.cpu_count() or 1)  # the backbone's budget in the cluster
        self.spec = ModelSpec.from_dir(model_dir)
        self.tokenizer = self.spec.load_tokenizer()
        self.builder = PromptBuilder(self.spec, self.tokenizer, GatewayConfig(str(model_dir), "-").max_media_bytes)
        self.pre = {m: load_preprocessor(self.spec, m) for m in ("image", "audio")}
        self.rt = {m: load_runtime(self.spec, m) for m in ("image", "audio")}
        self.engine = load_engine(self.spec, prefix_cache=False)  # the backbone worker's loader and engine

    def run(self, body: bytes) -> dict:
        from gateway.detokenize import Detokenizer
        from gateway.prompt import expand_placeholders
        from gateway.schemas import parse_chat_request
        from router.messages import SamplingParams

        st: dict[str, float] = {}
        t0 = time.perf_counter()
        req = parse_chat_request(body)
        prompt = self.builder.build(req)
        t = time.perf_counter()
        st["prepare"] = t - t0
        media, counts = [], []
        for part in prompt.media:
            a = time.perf_counter()
            prepared = self.pre[part.modality](part.data)
            b = time.perf_counter()
            out = self.rt[part.modality].run(prepared.data.unsqueeze(0))[0, : prepared.num_tokens]
            c = time.perf_counter()
            st[f"{part.modality}_pre"], st[f"{part.modality}_enc"] = b - a, c - b
            media.append((part.modality, out))
            counts.append(prepared.num_tokens)
        ids = expand_placeholders(prompt.token_ids, self.spec.placeholder_ids, counts)
        seq = self.engine.new_sequence("bench", len(ids), SamplingParams(
            max_tokens=req.token_budget(), temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            ignore_eos=req.ignore_eos))
        t = time.perf_counter()
        self.engine.prefill(seq, ids, media)
        t2 = time.perf_counter()
        st["prefill"] = t2 - t
        while seq.finish is None:
            self.engine.step([seq])
        t3 = time.perf_counter()
        st["decode"] = t3 - t2
        detok = Detokenizer(self.tokenizer)
        text = detok.add(seq.output) + detok.flush()
        t4 = time.perf_counter()
        st["detok"] = t4 - t3
        return {"total": t4 - t0, "text": text, "completion_tokens": len(seq.output), "prompt_tokens": len(ids),
                "stages": st}


# ------------------------------------------------------------------------------------------------------- tributary
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tributary_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "tributary"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tributary.cli"]


def start_cluster(model_dir: Path, port: int, log_path: Path, timeout: float) -> subprocess.Popen:
    log = log_path.open("wb")
    # The same request again and again: both sides compute it whole (no prefix cache), as the bench measures
    proc = subprocess.Popen([*tributary_cmd(), "up", "--model", str(model_dir), "--port", str(port),
                             "--no-prefix-cache"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tributary up exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if json.load(resp).get("status") == "ok":
                    return proc
        except OSError:
            pass
        time.sleep(0.25)
    stop_cluster(proc)
    raise SystemExit(f"the cluster was not healthy after {timeout:.0f}s; see {log_path}")


def stop_cluster(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tributary_request(client, model: str, msgs: list[dict], max_tokens: int) -> dict:
    wall0, t0 = time.time(), time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                           temperature=0, extra_body={"ignore_eos": True})
    t1, wall1 = time.perf_counter(), time.time()
    resp, rid = raw.parse(), raw.headers["x-request-id"]  # the server's id: what every tier logs
    return {"total": t1 - t0, "rid": rid, "sent": wall0, "received": wall1, "text": resp.choices[0].message.content,
            "completion_tokens": resp.usage.completion_tokens, "prompt_tokens": resp.usage.prompt_tokens}


def log_breakdown(log_path: Path, runs: list[dict]) -> dict[str, list[float]]:
    """Per-stage seconds of each measured Tributary request, from the tiers' JSON log lines (ts: unix s, 1 ms)."""
    by_rid: dict[str, list[dict]] = defaultdict(list)
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the banner and other plain text
        if isinstance(rec, dict) and rec.get("request_id"):
            by_rid[rec["request_id"]].append(rec)
    out: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        recs = by_rid.get(run["rid"], [])
        first = lambda msg: next((r for r in recs if r["msg"] == msg), None)  # noqa: E731
        req, pre, fin, resp = first("request"), first("prefilled"), first("finished"), first("response")
        enc = {r["modality"]: r for r in recs if r["msg"] == "encoded"}
        if not (req and pre and fin and resp and set(enc) == {"image", "audio"}):
            continue
        enc_end = max(r["ts"] for r in enc.values())
        prefill = pre["ms"] / 1e3
        for mod, r in enc.items():
            out[f"{mod}_pre"].append(r["preprocess_ms"] / 1e3)
            out[f"{mod}_enc"].append(r["encode_ms"] / 1e3)
        out["client->gw parsed (HTTP, JSON, tokenize, hash)"].append(req["ts"] - run["sent"])
        out["encode wall (jobs, both encoders, replies)"].append(enc_end - req["ts"])
        out["encoded->prefill start (replies, plan, fetch)"].append(pre["ts"] - prefill - enc_end)
        out["prefill"].append(prefill)
        out["decode (K-1 steps + per-step Redis)"].append(fin["ts"] - pre["ts"])
        out["finished->gw response (events, detok)"].append(resp["ts"] - fin["ts"])
        out["gw response->client (JSON, HTTP, SDK)"].append(run["received"] - resp["ts"])
    return out


# ------------------------------------------------------------------------------------------------------- reporting
def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def ms(x: float) -> str:
    return f"{x * 1e3:8.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"),
                   help="demo checkpoint cache (built on first use)")
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--requests", type=int, default=20, help="measured requests per side")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured requests per side first")
    p.add_argument("--block", type=int, default=5, help="requests per side before switching sides")
    p.add_argument("--max-tokens", type=int, default=16, help="K: completion tokens per request")
    p.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    p.add_argument("--log", type=Path, default=None, help="cluster log file (default: <model-dir>/../cluster.log)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--noisy", type=float, default=0.1,
                   help="a request is 'noisy' if other processes used more than this many cores while it ran")
    args = p.parse_args(argv)

    t_start = time.monotonic()
    model_dir = args.model_dir.resolve()
    if not (model_dir / "model.safetensors").exists():
        from models.demo import write_demo_model

        print(f"building the {args.size} demo model in {model_dir} ...", flush=True)
        write_demo_model(model_dir, args.size)
    log_path = (args.log or model_dir.parent / "cluster.log").resolve()
    port = args.port or free_port()
    rng = np.random.default_rng(args.seed)
    K = args.max_tokens

    print(f"starting the cluster (tributary up, port {port}, log {log_path}) ...", flush=True)
    cluster = start_cluster(model_dir, port, log_path, args.ready_timeout)
    try:
        from openai import OpenAI

        print("loading the in-process models ...", flush=True)
        local = InProcess(model_dir)
        import torch

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120.0, max_retries=0)
        name = local.spec.name

        def trib(msgs):
            r = tributary_request(client, name, msgs, K)
            assert r["completion_tokens"] == K, f"expected {K} tokens, got {r['completion_tokens']}"
            return r

        def inproc(msgs):
            body = json.dumps({"model": name, "messages": msgs, "max_tokens": K, "temperature": 0,
                               "ignore_eos": True}).encode()
            r = local.run(body)
            assert r["completion_tokens"] == K, f"expected {K} tokens, got {r['completion_tokens']}"
            return r

        sides = {"tributary": trib, "in-process": inproc}
        for _ in range(args.warmup):
            for fn in sides.values():
                fn(messages(rng))
        meter = CpuMeter(os.getpid())
        results: dict[str, list[dict]] = {s: [] for s in sides}
        order = list(sides)
        blk = 0
        while any(len(v) < args.requests for v in results.values()):
            for side in (order if blk % 2 == 0 else order[::-1]):  # ABBA...: neither side always goes first
                for _ in range(min(args.block, args.requests - len(results[side]))):
                    msgs = messages(rng)  # fresh media, made outside the timed call
                    before = meter.sample()
                    r = sides[side](msgs)
                    after = meter.sample()
                    r["others"] = meter.foreign_s(before, after) / r["total"]  # cores others used meanwhile
                    r["faults"] = after[2] - before[2]  # minor page faults of our processes
                    results[side].append(r)
            blk += 1
        pt = {s: {r["prompt_tokens"] for r in v} for s, v in results.items()}
        assert pt["tributary"] == pt["in-process"], f"prompt lengths differ: {pt}"
    finally:
        code = stop_cluster(cluster)

    tot = {s: [r["total"] for r in v] for s, v in results.items()}
    med = {s: statistics.median(v) for s, v in tot.items()}
    ratio = med["tributary"] / med["in-process"]
    cores = os.cpu_count()
    print()
    print(f"skeleton latency: model {name} ({args.size}), 1 text+image(320x240 PNG)+audio(2 s WAV) request, "
          f"K={K} tokens, prompt {next(iter(pt['tributary']))} tokens, {args.requests} measured + {args.warmup} "
          f"warm-up per side, blocks of {args.block}, {cores} cores, torch {torch.__version__}")
    print(f"{'side':<12}{'median ms':>10}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}"
          f"{'faults/req':>11}{'others (cores, median)':>24}{'noisy reqs':>12}")
    for s in ("tributary", "in-process"):
        v, others = tot[s], [r["others"] for r in results[s]]
        noisy = sum(o > args.noisy for o in others)
        print(f"{s:<12}{ms(med[s]):>10}{ms(pct(v, 90)):>10}{ms(min(v)):>10}{ms(max(v)):>10}"
              f"{statistics.median(r['faults'] for r in results[s]):>11.0f}{statistics.median(others):>24.2f}"
              f"{noisy:>9}/{len(v)}")
    print(f"ratio of medians (tributary / in-process): {ratio:.3f}   (target <= 1.15: "
          f"{'met' if ratio <= 1.15 else 'NOT met'})")
    quiet = {s: [r["total"] for r in v if r["others"] <= args.noisy] for s, v in results.items()}
    if all(len(v) >= 5 for v in quiet.values()):
        qm = {s: statistics.median(v) for s, v in quiet.items()}
        print(f"quiet requests only (other processes used <= {args.noisy} core meanwhile): tributary "
              f"{ms(qm['tributary']).strip()} ms (n={len(quiet['tributary'])}), in-process "
              f"{ms(qm['in-process']).strip()} ms (n={len(quiet['in-process'])}), ratio "
              f"{qm['tributary'] / qm['in-process']:.3f}")
    else:
        print(f"quiet requests only: too few (<5 per side with other processes <= {args.noisy} core); the machine "
              "was busy with other work, so the numbers above are inflated by it")

    print("\nin-process breakdown (median ms; torch threads = %d)" % cores)
    st = defaultdict(list)
    for r in results["in-process"]:
        for k, v in r["stages"].items():
            st[k].append(v)
    for k, v in st.items():
        print(f"  {k:<48}{ms(statistics.median(v))}")
    print(f"  {'sum of medians':<48}{ms(sum(statistics.median(v) for v in st.values()))}")

    bd = log_breakdown(log_path, results["tributary"])
    n = len(next(iter(bd.values()), []))
    print(f"\ntributary breakdown from the tiers' JSON logs (median ms over {n} requests; log ts has 1 ms resolution;"
          f" encoders {max(1, cores // 2)} thread(s) each, concurrently; backbone {cores})")
    wall = [k for k in bd if not k.endswith(("_pre", "_enc")) and k != "prefill"]
    for k in ("image_pre", "image_enc", "audio_pre", "audio_enc"):
        if k in bd:
            print(f"    {k:<46}{ms(statistics.median(bd[k]))}")
    for k in bd:
        if k in wall or k == "prefill":
            print(f"  {k:<48}{ms(statistics.median(bd[k]))}")
    print(f"  {'sum of wall-stage medians':<48}{ms(sum(statistics.median(bd[k]) for k in wall + ['prefill']))}")
    print(f"\ncluster stopped (exit code {code}); total bench time {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
