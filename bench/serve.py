"""Side by side ([bench]): Tributary and the monolithic baseline (bench/monolith.py) on the same machine, in one run,
driven by NVIDIA's aiperf, and the isolation experiment.

    bash scripts/bench-env.sh                 # once: aiperf 0.13 in .venv-bench
    .venv/bin/python bench/serve.py [--concurrency 4] [--requests 32] [--skip-isolation]   # ~12 min on 2 cores

All servers serve the ``small`` demo model (one checkpoint, written once) through the same API. On a 2-core machine
the tiers are pinned as separate hardware would place them (``os.sched_setaffinity`` on every thread): Tributary's
backbone on core 0, its gateway, encoders and Redis on core 1; the monolith on cores 0-1 (the same cores in total).

1. **aiperf workloads** at fixed concurrency (``--concurrency``, ``--requests`` each): text only (200 prompt tokens,
   32 output), + one synthetic image (320x240), + one synthetic audio clip (2 s), long prompts (1,500 tokens); the
   model's own tokenizer from the checkpoint directory (no hub), ``ignore_eos`` so every request makes its tokens,
   server token counts. aiperf runs with one worker process on core 1 (bounded: on 2 cores its processes otherwise
   take most of the machine); the CPU seconds it used are measured (``RUSAGE_CHILDREN``) and reported per run.
   Reported per server and workload: requests/s, output tokens/s, TTFT, ITL and request latency (mean, p50, p99),
   and goodput under a TTFT / ITL SLO.
   **chat** (``chat_dataset``): an aiperf multi-turn input file of chats about pictures: each chat sends a
   640x480 JPEG with a question, then asks a follow-up; aiperf resends the history (picture included) as a chat
   client does, so half the pictures a server receives are repeats. It also runs on Tributary with the media cache
   off (``--no-media-cache``): the cache on vs off on the same requests.
2. **Isolation** (the EPD papers' claim): 4 text streams decode (300 tokens each) while, 3 s in, a burst of 6 image
   + audio requests arrives; each server's text-stream inter-token latency p99 during the burst against its own
   quiet run (the same streams, no burst). Measured with the openai SDK (one timestamp per streamed chunk).
   ``--isolation-variants`` adds Tributary runs with other backbone flags (default: a 64-token step budget, and a
   step-time target).
3. **Cache**: the chat workload's TTFT for first-seen pictures (each chat's first turn) and repeated ones (its
   follow-ups), on every server and on Tributary with the cache on and off.

Per-tier timings: Tributary's runs start with ``--worker-metrics-port``; the workers' and the gateway's counters are
read before and after each experiment, and the report says where the time went (backbone busy share, mean step time
and prompt positions per step, encoder busy share and ms per batch, cache hits).

Writes bench/results/serve.json and bench/results/serve.md (tables, the machine, the client's CPU, what the figures
do and do not show); PNG plots beside it when matplotlib is importable (it is in .venv-bench: the report step reruns
itself there). Ray Serve (bench/rayserve.py, the same split as Ray Serve deployments) joins as a third server when
``bash scripts/bench-env.sh --ray`` has made .venv-ray; it gets cores 0-1 like the monolith. ``--rate R`` replaces
the fixed concurrency by Poisson arrivals at R requests/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AIPERF = ROOT / ".venv-bench" / "bin" / "aiperf"
RESULTS = ROOT / "bench" / "results"
WORKLOADS = {
    "text": [],
    "image": ["--image-width-mean", "320", "--image-height-mean", "240", "--image-batch-size", "1",
              "--image-format", "jpeg"],
    "audio": ["--audio-length-mean", "2", "--audio-batch-size", "1", "--audio-format", "wav",
              "--audio-sample-rates", "16"],
    "long": None,  # text with long prompts (--prompt-input-tokens-mean set below)
    "chat": None,  # an input file (chat_dataset)
}
CHAT_SESSIONS, CHAT_TURNS = 16, 2  # 32 requests, half of their pictures repeats
SLO = {"ttft_ms": 2000.0, "itl_ms": 200.0}


# --- processes and cores -------------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` (torch's pools included) onto ``cores``; threads made later inherit it."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cores)


def pin_tributary(up_pid: int, redis_pid: int, backbone: set[int], rest: set[int]) -> dict[str, list[int]]:
    placed: dict[str, list[int]] = {}
    for pid in descendants(up_pid) + [redis_pid]:
        line = cmdline(pid)
        cores = backbone if " backbone" in line else rest
        pin(pid, cores)
        placed.setdefault(" ".join(map(str, sorted(cores))), []).append(pid)
    return placed


# --- aiperf --------------------------------------------------------------------------------------------------------

def chat_dataset(folder: Path, sessions: int = CHAT_SESSIONS, turns: int = CHAT_TURNS, seed: int = 9000) -> Path:
    """An aiperf ``multi_turn`` JSONL: ``sessions`` chats, each about one picture of its own (a 640x480 JPEG file):
    the first turn sends it with a question, the next ``turns - 1`` ask follow-ups. aiperf sends each turn with the
    chat's history, as a chat client does, so the picture goes to the server again with every turn."""
    from tests.media import jpeg_bytes

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(sessions):
        pic = folder / f"picture-{s}.jpg"
        pic.write_bytes(jpeg_bytes(640, 480, seed=seed + s))
        follow = [{"text": f"And what else do you see there? ({k})", "output_length": 16} for k in range(1, turns)]
        lines.append(json.dumps({"type": "multi_turn", "session_id": f"chat-{s:03d}", "turns": [
            {"text": "What is in this picture?", "image": str(pic), "output_length": 16}, *follow]}))
    path = folder / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_aiperf(url: str, model: str, tokenizer: Path, workload: str, concurrency: int, requests: int, out: Path,
               cores: set[int], rate: float | None = None) -> dict:
    """``rate``: Poisson arrivals at that many requests/s (``concurrency`` then only caps requests in flight)."""
    load = (["--request-rate", str(rate), "--arrival-pattern", "poisson", "--concurrency", "256"] if rate
            else ["--concurrency", str(concurrency)])
    if workload == "chat":
        requests = CHAT_SESSIONS * CHAT_TURNS
        shape = ["--input-file", str(chat_dataset(out / "dataset")), "--custom-dataset-type", "multi_turn",
                 "--dataset-sampling-strategy", "sequential"]
    else:
        shape = ["--prompt-input-tokens-mean", "1500" if workload == "long" else "200",
                 "--prompt-input-tokens-stddev", "0", "--prompt-output-tokens-mean", "32",
                 "--prompt-output-tokens-stddev", "0", *(WORKLOADS[workload] or [])]
    args = [str(AIPERF), "profile", "-m", model, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", str(tokenizer), *load, "--request-count", str(requests),
            *([] if workload == "chat" else ["--warmup-request-count", str(concurrency)]), *shape, "--extra-inputs",
            "ignore_eos:true", "--use-server-token-count", "--workers-max", "1", "--ui-type", "none",
            "--random-seed", "0", "--goodput", f"time_to_first_token:{SLO['ttft_ms']} "
            f"inter_token_latency:{SLO['itl_ms']}", "--output-artifact-dir", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=out.parent,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"aiperf failed ({workload}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads((out / "profile_export_aiperf.json").read_text())

    def stat(name: str) -> dict:
        d = data.get(name) or {}
        return {k: d.get(k) for k in ("avg", "p50", "p99")}

    turns: dict[str, list[float]] = {"first": [], "repeat": []}  # chat: a chat's first turn, then its follow-ups
    records = out / "profile_export.jsonl"
    if workload == "chat" and records.exists():
        for line in records.read_text().splitlines():
            rec = json.loads(line)
            ttft = (rec.get("metrics") or {}).get("time_to_first_token", {}).get("value")
            if ttft is not None:
                turns["repeat" if rec["metadata"].get("turn_index") else "first"].append(ttft)

    return {"requests_per_s": (data.get("request_throughput") or {}).get("avg"),
            "output_tokens_per_s": (data.get("output_token_throughput") or {}).get("avg"),
            "goodput_per_s": (data.get("goodput") or {}).get("avg"),
            "ttft_ms": stat("time_to_first_token"), "itl_ms": stat("inter_token_latency"),
            "latency_ms": stat("request_latency"), "completed": (data.get("request_count") or {}).get("avg"),
            "errors": (data.get("error_summary") or []), "client_cpu_s": cpu, "client_wall_s": wall,
            **({"first_ttft_mean_ms": statistics.fmean(turns["first"]) if turns["first"] else None,
                "repeat_ttft_mean_ms": statistics.fmean(turns["repeat"]) if turns["repeat"] else None}
               if workload == "chat" else {}),
            "client_cores": cpu / wall if wall else 0.0}


# --- isolation -----------------------------------------------------------------------------------------------------

def isolation(base_url: str, model: str, burst: bool, streams: int = 4, tokens: int = 300, burst_at: float = 3.0,
              burst_n: int = 6) -> dict:
    """Text streams' inter-token gaps (seconds, each stamped with when it ended) and the burst's window."""
    from openai import OpenAI

    from tests.media import b64, data_url, jpeg_bytes, wav_bytes

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    gaps: list[tuple[float, float]] = []
    window = [float("inf"), float("inf")]
    lock = threading.Lock()
    t0 = time.perf_counter()

    def text(i: int) -> None:
        last = None
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell a long story, number {i}."}],
            max_tokens=tokens, temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter() - t0
                if last is not None:
                    with lock:
                        gaps.append((now, now - last))
                last = now

    def media(i: int) -> None:
        content = [{"type": "text", "text": "Describe both."},
                   {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(640, 480, seed=5000 + i),
                                                                       "image/jpeg")}},
                   {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(4.0, seed=5000 + i)),
                                                           "format": "wav"}}]
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=4,
                                       temperature=0.0, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=text, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    if burst:
        time.sleep(burst_at)
        window[0] = time.perf_counter() - t0
        burst_threads = [threading.Thread(target=media, args=(i,)) for i in range(burst_n)]
        for t in burst_threads:
            t.start()
        for t in burst_threads:
            t.join()
        window[1] = time.perf_counter() - t0
    for t in threads:
        t.join()
    return {"gaps": gaps, "window": window}


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1) + 0.5))] if xs else float("nan")


def isolation_summary(quiet: dict, busy: dict) -> dict:
    lo, hi = busy["window"]
    during = [g for t, g in busy["gaps"] if lo <= t <= hi]
    # The quiet run's gaps over the same stretch of the streams' lives (same positions, no burst).
    same = [g for t, g in quiet["gaps"] if lo <= t <= hi] or [g for _, g in quiet["gaps"]]
    return {"quiet_itl_p99_ms": p99(same) * 1e3, "burst_itl_p99_ms": p99(during) * 1e3,
            "quiet_itl_p50_ms": statistics.median(same) * 1e3 if same else float("nan"),
            "burst_itl_p50_ms": statistics.median(during) * 1e3 if during else float("nan"),
            "burst_window_s": hi - lo, "ratio": (p99(during) / p99(same)) if same and during else float("nan"),
            "gaps_in_window": len(during)}


# --- where Tributary's time goes ------------------------------------------------------------------------------------

def read_counters(urls: list[str]) -> dict[str, float]:
    """Every sample of these Prometheus endpoints, summed over them: ``name`` or ``name:label`` (the sample's
    modality, kind or phase label). An endpoint with nothing behind it is skipped."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for url in urls:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            continue  # a port with nothing behind it
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                label = s.labels.get("modality") or s.labels.get("kind") or s.labels.get("phase") or ""
                key = s.name + (f":{label}" if label else "")
                out[key] = out.get(key, 0.0) + s.value
    return out


class TierMeter:
    """Reads a Tributary cluster's counters (the gateway's /metrics and its workers' --metrics-port) so that an
    experiment's window can be told apart: ``start()`` then ``stop()`` gives the tiers' work over that window."""

    def __init__(self, base_url: str, worker_ports: range):
        self.base_url, self.worker_ports = base_url, worker_ports
        self.t0, self.before = 0.0, {}

    def read(self) -> dict[str, float]:
        return read_counters([f"{self.base_url}/metrics",
                              *(f"http://127.0.0.1:{p}/metrics" for p in self.worker_ports)])

    def start(self) -> None:
        self.t0, self.before = time.perf_counter(), self.read()

    def stop(self) -> dict[str, float]:
        wall, after = time.perf_counter() - self.t0, self.read()

        def d(key: str) -> float:
            return after.get(key, 0.0) - self.before.get(key, 0.0)

        timed = d("tributary_backbone_timed_steps_total")
        steps = d("tributary_backbone_steps_total")
        res = {"wall_s": wall, "steps": steps,
               "backbone_busy": d("tributary_backbone_step_seconds_total") / wall if wall else None,
               "step_ms": d("tributary_backbone_step_seconds_total") / timed * 1e3 if timed else None,
               "prompt_per_step": d("tributary_backbone_positions_total:prompt") / steps if steps else None,
               "decode_per_step": d("tributary_backbone_positions_total:decode") / steps if steps else None}
        for mod in ("image", "audio"):
            batches = d(f"tributary_encoder_encode_seconds_count:{mod}")
            res[f"{mod}_busy"] = d(f"tributary_encoder_encode_seconds_sum:{mod}") / wall if wall else None
            res[f"{mod}_ms_per_batch"] = (d(f"tributary_encoder_encode_seconds_sum:{mod}") / batches * 1e3
                                          if batches else None)
            res[f"{mod}_items_per_batch"] = d(f"tributary_encoder_batch_size_sum:{mod}") / batches if batches else None
            res[f"{mod}_cache_hits"] = d(f"tributary_encoder_cache_hits_total:{mod}")
            res[f"{mod}_cache_misses"] = d(f"tributary_encoder_cache_misses_total:{mod}")
        return res


# --- servers -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tributary(model: Path, tmp: Path, backbone: set[int], rest: set[int], *extra: str):
    from cache.embedded import EmbeddedRedis, free_port
    from tests.e2e.conftest import local_cluster

    first = free_port()
    with EmbeddedRedis(maxmemory="2gb") as server, local_cluster(model, server.url, tmp, "--encoder-max-wait-ms",
                                                                  "5", "--worker-metrics-port", str(first),
                                                                  *extra) as c:
        c.wait_ready()
        placed = pin_tributary(c.proc.pid, server.proc.pid, backbone, rest)
        yield c.base_url, placed, TierMeter(c.base_url, range(first, first + 3))


@contextlib.contextmanager
def monolith(model: Path, tmp: Path, cores: set[int]):
    from cache.embedded import free_port

    port = free_port()
    log = (tmp / "monolith.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "monolith.py"), "--model", str(model), "--port",
                             str(port), "--threads", str(len(cores))], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc, tmp / "monolith.log", 180)
        yield base, {" ".join(map(str, sorted(cores))): [proc.pid]}, None
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@contextlib.contextmanager
def rayserve(model: Path, tmp: Path, cores: set[int]):
    from cache.embedded import free_port

    python = ROOT / ".venv-ray" / "bin" / "python"
    port = free_port()
    log = (tmp / "rayserve.log").open("w")
    proc = subprocess.Popen([str(python), str(ROOT / "bench" / "rayserve.py"), "--model", str(model), "--port",
                             str(port), "--num-cpus", str(len(cores))], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc, tmp / "rayserve.log", 300)
        yield base, {" ".join(map(str, sorted(cores))): descendants(proc.pid)}, None
    finally:
        subprocess.run([str(python.parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(30)
        log.close()


def _wait_health(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)  # loading torch and the checkpoint


# --- report --------------------------------------------------------------------------------------------------------

def fmt(x, spec=".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def report(res: dict) -> str:
    lines = ["# Tributary vs a monolithic server (bench/serve.py)", "",
             f"Generated {res['date']} by `{res['command']}` on {res['machine']}.", "",
             "Every server: the `small` demo model (random weights), the same HTTP API. Cores: " +
             "; ".join(f"{name}: {placed}" for name, placed in res["placement"].items()) + ".", "",
             "## aiperf workloads", "",
             ("Poisson arrivals (requests/s: " + ", ".join(f"{k if k != '*' else 'others'} {v:g}"
                                                  for k, v in res["rate"].items()) + ")" if res.get("rate") else
              f"Concurrency {res['concurrency']}") + f", {res['requests']} requests per run, 32 output tokens each "
             f"(chat: its file's {CHAT_SESSIONS * CHAT_TURNS} turns, 16 tokens each), "
             f"goodput SLO: TTFT <= {SLO['ttft_ms']:.0f} ms and ITL <= {SLO['itl_ms']:.0f} ms.", "",
             "| workload | server | req/s | out tok/s | goodput/s | TTFT mean / p50 / p99 ms | ITL mean / p50 / p99 ms"
             " | aiperf CPU (cores) |", "|---|---|---|---|---|---|---|---|"]
    for wl, by_server in res["aiperf"].items():
        for server, r in by_server.items():
            t, i = r["ttft_ms"], r["itl_ms"]
            lines.append(f"| {wl} | {server} | {fmt(r['requests_per_s'], '.2f')} | "
                         f"{fmt(r['output_tokens_per_s'])} | {fmt(r['goodput_per_s'], '.2f')} | "
                         f"{fmt(t['avg'], '.0f')} / {fmt(t['p50'], '.0f')} / {fmt(t['p99'], '.0f')} | "
                         f"{fmt(i['avg'])} / {fmt(i['p50'])} / {fmt(i['p99'])} | "
                         f"{fmt(r['client_cpu_s'])} s ({fmt(r['client_cores'], '.2f')}) |")
        pair = res["aiperf"][wl]
        for other in ("monolith", "ray serve"):
            if "tributary" in pair and other in pair and pair[other]["requests_per_s"]:
                ratio = pair["tributary"]["requests_per_s"] / pair[other]["requests_per_s"]
                lines.append(f"| {wl} | **Tributary / {other}** | **{ratio:.2f}x** | | | | | |")
    if res.get("isolation"):
        lines += ["", "## Isolation: text streams while an image + audio burst arrives", "",
                  "| server | quiet ITL p50 / p99 ms | burst ITL p50 / p99 ms | burst / quiet p99 | burst lasted |",
                  "|---|---|---|---|---|"]
        for server, s in res["isolation"].items():
            lines.append(f"| {server} | {fmt(s['quiet_itl_p50_ms'])} / {fmt(s['quiet_itl_p99_ms'])} | "
                         f"{fmt(s['burst_itl_p50_ms'])} / {fmt(s['burst_itl_p99_ms'])} | {fmt(s['ratio'], '.2f')}x | "
                         f"{fmt(s['burst_window_s'])} s |")
        iso = res["isolation"]
        for other in ("monolith", "ray serve"):
            if "tributary" in iso and other in iso:
                lines.append(f"\nTributary's burst ITL p99 / {other}'s: "
                             f"**{iso['tributary']['burst_itl_p99_ms'] / iso[other]['burst_itl_p99_ms']:.2f}x** "
                             "(target <= 0.5x).")
    chat = res["aiperf"].get("chat", {})
    if chat:
        lines += ["", "## Cache: chats about the same pictures", "",
                  f"aiperf's multi-turn input file: {CHAT_SESSIONS} chats of {CHAT_TURNS} turns, each about one "
                  "640x480 JPEG of its own, 16 output tokens a turn; every turn resends the chat's history, "
                  "picture included, so half the pictures a server receives are repeats (the follow-ups). Cache off: "
                  "Tributary with `--no-media-cache`, the same requests.", "",
                  "| server | req/s | TTFT mean ms | first-seen (turn 1) mean ms | repeat (follow-up) mean ms |",
                  "|---|---|---|---|---|"]
        for server, r in chat.items():
            lines.append(f"| {server} | {fmt(r['requests_per_s'], '.2f')} | {fmt(r['ttft_ms']['avg'], '.0f')} | "
                         f"{fmt(r.get('first_ttft_mean_ms'), '.0f')} | {fmt(r.get('repeat_ttft_mean_ms'), '.0f')} |")
        on, off = chat.get("tributary"), chat.get("tributary --no-media-cache")
        if on and off and off["ttft_ms"]["avg"]:
            ratio = on["ttft_ms"]["avg"] / off["ttft_ms"]["avg"]
            lines.append(f"\nTributary's mean TTFT, cache on / off: **{ratio:.2f}x** (target <= 0.7x).")
    tiers = [(f"{wl}", server, r["tiers"]) for wl, by in res["aiperf"].items() for server, r in by.items()
             if r.get("tiers")]
    tiers += [("isolation burst", server, s["tiers"]) for server, s in res["isolation"].items() if s.get("tiers")]
    if tiers:
        lines += ["", "## Where Tributary's time went (its metrics over each run)", "",
                  "Busy: a tier's compute seconds over the run's wall time (the backbone's steps from launch to "
                  "tokens on the host; an encoder's forward batches). Positions per step: decodes and prompt "
                  "positions (prefill chunks) each step computed. Cache: the gateways' hits / misses.", "",
                  "| run | server | backbone busy | step ms | decode / prompt positions per step | image busy, ms per "
                  "batch (items) | audio busy, ms per batch (items) | image cache hits / misses |",
                  "|---|---|---|---|---|---|---|---|"]
        for run, server, t in tiers:
            enc = []
            for mod in ("image", "audio"):
                enc.append(f"{fmt(t[f'{mod}_busy'], '.2f')}, {fmt(t[f'{mod}_ms_per_batch'], '.0f')} "
                           f"({fmt(t[f'{mod}_items_per_batch'], '.1f')})" if t.get(f"{mod}_ms_per_batch") else "-")
            lines.append(f"| {run} | {server} | {fmt(t['backbone_busy'], '.2f')} | {fmt(t['step_ms'])} | "
                         f"{fmt(t['decode_per_step'], '.1f')} / {fmt(t['prompt_per_step'], '.1f')} | {enc[0]} | "
                         f"{enc[1]} | {t['image_cache_hits']:.0f} / {t['image_cache_misses']:.0f} |")
    lines += [f"\n![{p}]({p})" for p in res.get("plots", [])]
    lines += ["", "## What this shows and does not", "", *res["notes"], "", "## Not measured yet", "",
              *([f"- {res['notes_ray']}"] if res.get("notes_ray") else []),
              "- Fixed concurrency and Poisson arrivals in one run: `--rate R` runs every workload with Poisson "
              "arrivals instead (bench/results/poisson).", ""]
    return "\n".join(lines)


def plot(path: Path) -> list[str]:
    """PNG plots beside ``path`` (serve.json): run with .venv-bench's python, which has matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    made = []
    workloads = list(res["aiperf"])
    servers = sorted({s for by in res["aiperf"].values() for s in by})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, (("requests_per_s", "requests/s"), ("ttft_ms", "TTFT p50 (ms)"),
                                       ("itl_ms", "ITL p99 (ms)"))):
        width = 0.8 / max(1, len(servers))
        for k, server in enumerate(servers):
            vals = []
            for wl in workloads:
                r = res["aiperf"][wl].get(server, {})
                v = r.get(key)
                v = (v or {}).get("p50" if key == "ttft_ms" else "p99") if isinstance(v, dict) else v
                vals.append(v or 0)
            ax.bar([i + k * width for i in range(len(workloads))], vals, width, label=server)
        ax.set_xticks([i + width * (len(servers) - 1) / 2 for i in range(len(workloads))], workloads)
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    out = path.with_name("serve.png")
    fig.savefig(out, dpi=110)
    made.append(out.name)
    if res.get("isolation"):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        names = list(res["isolation"])
        quiet = [res["isolation"][n]["quiet_itl_p99_ms"] for n in names]
        burst = [res["isolation"][n]["burst_itl_p99_ms"] for n in names]
        ax.bar([i - 0.2 for i in range(len(names))], quiet, 0.4, label="quiet")
        ax.bar([i + 0.2 for i in range(len(names))], burst, 0.4, label="image + audio burst")
        ax.set_xticks(range(len(names)), [n.replace("tributary --", "tributary\n--") for n in names])
        ax.set_ylabel("text streams' ITL p99 (ms)")
        ax.legend()
        fig.tight_layout()
        out = path.with_name("serve-isolation.png")
        fig.savefig(out, dpi=110)
        made.append(out.name)
    return made


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # the report step, in .venv-bench
        print(" ".join(plot(Path(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", default=None,
                    help="Poisson arrivals instead of a fixed concurrency: requests/s for every workload (1.2), or "
                         "per workload (text=2,image=1.2,long=0.25; unnamed workloads: the bare number, else 1)")
    ap.add_argument("--workloads", default="text,image,audio,long,chat",
                    help="comma list of text, image, audio, long, chat (chat also runs with the cache off)")
    ap.add_argument("--skip-isolation", action="store_true")
    ap.add_argument("--skip-ray", action="store_true", help="leave Ray Serve out even if .venv-ray exists")
    ap.add_argument("--isolation-variants", default="--max-step-ms 50|--max-step-ms 0",
                    help="also run the isolation experiment on Tributary with each of these flag sets ('|' between)")
    ap.add_argument("--variant-workloads", default="",
                    help="aiperf workloads the --isolation-variants also run (comma list; default: none)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not AIPERF.exists():
        print("bench/serve.py: aiperf is missing: run `bash scripts/bench-env.sh` first", file=sys.stderr)
        return 2
    from models.demo import write_demo_model

    rates = {}
    for item in filter(None, (args.rate or "").split(",")):
        name, _, value = item.rpartition("=")
        rates[name or "*"] = float(value)
    ncores = len(os.sched_getaffinity(0))
    everything = set(range(ncores))
    backbone_cores, rest_cores = ({0}, {1}) if ncores == 2 else ({0}, everything - {0})
    client_cores = rest_cores
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["bench/serve.py",
           *sys.argv[1:]]), "machine": f"{ncores} CPU cores ({platform.processor() or platform.machine()}), "
           f"{platform.system()} {platform.release()}", "concurrency": args.concurrency, "requests": args.requests,
           "rate": rates or None, "aiperf": {}, "isolation": {}, "placement": {}, "notes": []}
    with tempfile.TemporaryDirectory(prefix="tributary-serve-") as tmp_name:
        tmp = Path(tmp_name)
        model = write_demo_model(tmp / "demo-small", "small")
        workloads = [w for w in args.workloads.split(",") if w]
        servers = [("tributary", lambda: tributary(model, tmp, backbone_cores, rest_cores), workloads, True),
                   ("monolith", lambda: monolith(model, tmp, everything), workloads, True)]
        if (ROOT / ".venv-ray" / "bin" / "python").exists() and not args.skip_ray:
            servers.append(("ray serve", lambda: rayserve(model, tmp, everything), workloads, True))
        else:
            res["notes_ray"] = "Ray Serve skipped: run `bash scripts/bench-env.sh --ray` (or --skip-ray was given)"
        if "chat" in workloads:  # the cache off, on the same chats
            servers.append(("tributary --no-media-cache", lambda: tributary(model, tmp, backbone_cores, rest_cores,
                                                                            "--no-media-cache"), ["chat"], False))
        for variant in filter(None, (v.strip() for v in args.isolation_variants.split("|"))):
            if not args.skip_isolation:
                servers.append((f"tributary {variant}", lambda v=variant: tributary(
                    model, tmp, backbone_cores, rest_cores, *shlex.split(v)),
                    [w for w in args.variant_workloads.split(",") if w], True))
        for name, start, wls, isolate in servers:
            with start() as (base, placed, meter):
                res["placement"][name] = placed
                for wl in wls:
                    out = tmp / f"aiperf-{name.replace(' ', '_')}-{wl}"
                    out.mkdir()
                    print(f"{name}: aiperf {wl} ...", flush=True)
                    if meter:
                        meter.start()
                    r = run_aiperf(base, "demo-small", model, wl, args.concurrency, args.requests, out,
                                   client_cores, rates.get(wl, rates.get("*", 1.0)) if rates else None)
                    if meter:
                        r["tiers"] = meter.stop()
                    res["aiperf"].setdefault(wl, {})[name] = r
                if isolate and not args.skip_isolation:
                    print(f"{name}: isolation ...", flush=True)
                    quiet = isolation(base, "demo-small", burst=False)
                    if meter:
                        meter.start()
                    busy = isolation(base, "demo-small", burst=True)
                    res["isolation"][name] = isolation_summary(quiet, busy)
                    if meter:
                        res["isolation"][name]["tiers"] = meter.stop()
    res["notes"] = [
        f"- Everything shares {ncores} CPU cores: Tributary's tiers are pinned apart as separate machines would be, "
        "but the load generator shares core(s) " + ",".join(map(str, sorted(client_cores))) + " with the gateway "
        "and encoders; its CPU is in the tables. On GPUs the backbone would have its own device and the encoders "
        "cheap ones: the isolation the split buys grows, and the monolith's inline encoding would stall a GPU "
        "batch instead of a CPU core.",
        "- The demo model's weights are random and small; the text is noise and a step costs milliseconds, so "
        "per-request overheads (HTTP, Redis round trips) weigh more than they would on a 7B model.",
        "- One run per configuration: these machines are noisy, read ratios, not absolute figures."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(res, indent=2) + "\n")
    made = subprocess.run([str(AIPERF.parent / "python"), __file__, "--plot", str(args.out / "serve.json")],
                          capture_output=True, text=True, timeout=300)
    if made.returncode == 0:
        res["plots"] = made.stdout.split()
    else:
        print(f"no plots: {made.stderr[-500:]}", file=sys.stderr)
    (args.out / "serve.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
