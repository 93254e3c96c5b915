"""Encoders: ONNX Runtime vs torch per item, dynamic batching under load, and what a cache hit saves, in one run.

    .venv/bin/python bench/encoders.py [--onnx] [--tables ABC] [--noisy 0.15]   # ~2 min quiet, <= ~6 busy (2 cores)

A) ORT vs torch: the image and audio encoders (+ projector) of the ``small`` demo model, in this process (no
   cluster), batch size 1, on the same preprocessed input (a fresh 320x240 PNG / 2 s WAV). Both runtimes get the same
   thread count (torch.set_num_threads(T), ORT intra_op T, inter_op 1); one row with all cores (the target row) and
   one with the workers' budget (``tributary up`` gives each encoder max(1, cores // 2) threads). Runs alternate
   (torch, ORT, ORT, torch, ...) with a short pause between calls so one runtime's spinning pool threads do not eat
   into the other's call. Prints median ms, the ratio ORT / torch (target <= 0.8) and max |ORT - torch|.
B) Batching: two clusters are up at once, ``--encoder-max-batch 8 --encoder-max-wait-ms 10`` and
   ``--encoder-max-batch 1``, same runtime; rounds of 16 concurrent text+image requests (fresh images, max_tokens=1,
   a 16-thread pool, the openai SDK) alternate between them (ABBA). Prints end-to-end requests/s, encoder-only
   items/s (items / encode_seconds from ``trib:stats:encoder:image``) and the mean batch (items / forward passes),
   and the ratios batch8 / batch1 (target >= 1.3). ``--onnx`` repeats it with ``--encoder-runtime onnx``.
C) Cache hit: on the batch-8 cluster, a streamed text+image request with a fresh image (cold) and then the same request
   again (hit), in pairs. Prints the time to the first content chunk (TTFT) of each, the encoder calls each made
   (stats delta; a hit must make none), the median encode time (stats delta of the cold requests) and checks
   hit TTFT <= cold TTFT - 0.8 * encode time.

Every timed call records ``others``: the cores that processes outside the measured side used meanwhile (machine busy
jiffies minus this process and the measured cluster's process tree; the idle cluster counts as "others"). Samples
above ``--noisy`` cores are "noisy". Before each table the benchmark waits (up to ``--quiet-wait`` s) for the machine
to go quiet; a table whose samples were too often noisy takes more (A up to 3x its calls, B up to ``--max-rounds``,
C up to ``--max-pairs``) while its share of ``--budget-s`` lasts. Each table prints all-sample and quiet-only
results; the verdicts use the quiet-only ones where there are enough, and say which they used.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: this file's name must not shadow the `encoders` package

from bench.skeleton_latency import (
    CpuMeter,
    free_port,
    ms,
    pct,
    png_bytes,
    stop_cluster,
    tributary_cmd,
    wav_bytes,
)

IMAGE_TEXT = "Describe the picture."


# ------------------------------------------------------------------------------------------------------ noise meter
class Meter(CpuMeter):
    """CpuMeter over chosen groups of processes, each a list of (pid, whole tree?) pairs; the first group is the
    measured side, and everything outside it is 'others'."""

    def __init__(self):
        super().__init__(os.getpid())

    def take(self, *groups: list[tuple[int, bool]]) -> tuple[int, ...]:
        """(busy jiffies of the machine, jiffies of each group)"""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        stats = {pid: st for pid in os.listdir("/proc") if pid.isdigit() and (st := self._stat(pid))}
        kids: dict[str, list[str]] = {}
        for pid, st in stats.items():
            kids.setdefault(st[1], []).append(pid)
        out = [busy]
        for roots in groups:
            jiffies = 0
            for root, tree in roots:
                todo = [str(root)]
                while todo:
                    pid = todo.pop()
                    if pid in stats:
                        jiffies += int(stats[pid][11]) + int(stats[pid][12])  # utime + stime, all threads
                    if tree:
                        todo.extend(kids.get(pid, []))
            out.append(jiffies)
        return tuple(out)

    def others(self, before: tuple, after: tuple, seconds: float) -> float:
        """Cores used by processes outside the first group over ``seconds``."""
        return self.foreign_s((*before[:2], 0), (*after[:2], 0)) / max(seconds, 1e-9)

    def cores(self, before: tuple, after: tuple, group: int, seconds: float) -> float:
        """Cores used by group ``group`` (1-based) over ``seconds``."""
        return (after[group] - before[group]) / self.hz / max(seconds, 1e-9)


def wait_quiet(meter: Meter, noisy: float, max_wait: float, window: float = 1.0, need: int = 2) -> float:
    """Wait (at most ``max_wait`` s) until processes outside our tree used <= ``noisy`` cores for ``need`` windows
    in a row; returns the seconds waited."""
    t0 = time.monotonic()
    calm = 0
    me = [(os.getpid(), True)]
    while calm < need and time.monotonic() - t0 < max_wait:
        b = meter.take(me)
        time.sleep(window)
        calm = calm + 1 if meter.others(b, meter.take(me), window) <= noisy else 0
    return time.monotonic() - t0


def quiet_share(others: list[float], noisy: float) -> float:
    return sum(o <= noisy for o in others) / max(len(others), 1)


# --------------------------------------------------------------------------------------------------------- table A
def table_a(model_dir: Path, threads_rows: list[int], runs: int, warmup: int, gap_s: float, meter: Meter,
            seed: int, noisy: float, deadline: float) -> dict:
    """Each row: ``runs`` alternating calls per runtime; more (up to 3x) while fewer than half of either side's calls
    were quiet, and fewer (at least 8) when the row's share of the time to ``deadline`` runs out."""
    import torch

    from encoders.export import ensure_onnx
    from encoders.loader import load_preprocessor, load_runtime
    from encoders.onnx_runtime import OnnxRuntime
    from models.spec import ModelSpec
    from router.lifecycle import tune_allocator

    tune_allocator()  # the workers' set-up
    spec = ModelSpec.from_dir(model_dir)
    rng = np.random.default_rng(seed)
    media = {"image": png_bytes(rng), "audio": wav_bytes(rng)}
    me = [(os.getpid(), True)]
    rows = []
    start, n_rows = time.monotonic(), 2 * len(threads_rows)
    for modality in ("image", "audio"):
        x = load_preprocessor(spec, modality)(media[modality]).data.unsqueeze(0)  # [1, ...]: batch size 1
        rt_torch = load_runtime(spec, modality, "torch")
        path = ensure_onnx(spec, modality)
        for threads in threads_rows:
            row_end = start + (len(rows) + 1) * (deadline - start) / n_rows
            torch.set_num_threads(threads)
            rt = {"torch": rt_torch, "onnx": OnnxRuntime(path, "cpu", threads)}
            diff = float((rt["onnx"].run(x) - rt["torch"].run(x)).abs().max())
            for _ in range(warmup):
                for r in rt.values():
                    r.run(x)
            times: dict[str, list[float]] = {"torch": [], "onnx": []}
            others: dict[str, list[float]] = {"torch": [], "onnx": []}
            i = 0
            while True:
                quiet = min(sum(o <= noisy for o in v) for v in others.values())
                late = time.monotonic() > row_end
                if (i >= runs and (quiet >= runs // 2 or late or i >= 3 * runs)) or (late and i >= 8):
                    break
                for side in (("torch", "onnx") if i % 2 == 0 else ("onnx", "torch")):
                    time.sleep(gap_s)  # let the other runtime's pool threads stop spinning
                    b = meter.take(me)
                    t0 = time.perf_counter()
                    rt[side].run(x)
                    t = time.perf_counter() - t0
                    a = meter.take(me)
                    times[side].append(t)
                    others[side].append(meter.others(b, a, t))
                i += 1
            rows.append({"modality": modality, "threads": threads, "diff": diff, "times": times, "others": others,
                         "shape": tuple(x.shape)})
    return {"rows": rows}


def a_quiet(res: dict, noisy: float) -> float:
    return min(quiet_share(r["others"]["torch"] + r["others"]["onnx"], noisy) for r in res["rows"])


def print_a(res: dict, noisy: float, target_threads: int) -> list[tuple[str, bool, str]]:
    print(f"{'encoder':<8}{'input':>13}{'thr':>4}{'torch ms':>10}{'ORT ms':>9}{'ORT/torch':>10}  |"
          f"{'quiet torch':>12}{'ORT':>8}{'ratio':>7}{'n':>7}  |{'others med':>11}{'max|ORT-torch|':>16}")
    verdicts = []
    for r in res["rows"]:
        t, o = r["times"]["torch"], r["times"]["onnx"]
        ratio = statistics.median(o) / statistics.median(t)
        qt = [v for v, n in zip(t, r["others"]["torch"]) if n <= noisy]
        qo = [v for v, n in zip(o, r["others"]["onnx"]) if n <= noisy]
        qratio = None
        if len(qt) >= 5 and len(qo) >= 5:
            qratio = statistics.median(qo) / statistics.median(qt)
            quiet = f"{ms(statistics.median(qt)):>12}{ms(statistics.median(qo)):>8}{qratio:>7.2f}"
        else:
            quiet = f"{'too few':>12}{'':>8}{'':>7}"
        oth = statistics.median(r["others"]["torch"] + r["others"]["onnx"])
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['modality']:<8}{shape:>13}{r['threads']:>4}{ms(statistics.median(t)):>10}"
              f"{ms(statistics.median(o)):>9}{ratio:>10.2f}  |{quiet}{f'{len(qt)}+{len(qo)}':>7}  |"
              f"{oth:>11.2f}{r['diff']:>16.2e}")
        if r["threads"] == target_threads:
            v, how = (qratio, f"quiet calls, n={len(qt)}+{len(qo)}") if qratio else (ratio, "all calls: NOISY")
            verdicts.append((f"A {r['modality']} ORT/torch at {r['threads']} threads <= 0.8", v <= 0.8,
                             f"{v:.2f} from {how}"))
    print("the verdicts use the quiet calls where there are >= 5 per runtime, else all calls")
    return verdicts


# ------------------------------------------------------------------------------------------------------- clusters
class Cluster:
    def __init__(self, label: str, model_dir: Path, extra: list[str], log_path: Path, env: dict[str, str]):
        self.label, self.extra, self.log_path = label, extra, log_path
        self.port = free_port()
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen([*tributary_cmd(), "up", "--model", str(model_dir), "--port", str(self.port),
                                      *extra], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **env})
        self.redis = None
        self.client = None

    def wait_ready(self, deadline: float) -> None:
        import redis
        from openai import OpenAI

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label}: tributary up exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    if json.load(resp).get("status") == "ok":
                        break
            except OSError:
                pass
            time.sleep(0.25)
        else:
            raise SystemExit(f"{self.label}: not healthy in time; see {self.log_path}")
        while time.monotonic() < deadline:  # the banner (with the embedded Redis URL) follows /health ok
            if found := re.search(r"Redis (redis://[^\s)]+)", self.log_path.read_text(errors="replace")):
                self.redis = redis.Redis.from_url(found.group(1))
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"{self.label}: no Redis URL in the banner; see {self.log_path}")
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=120.0,
                             max_retries=0)

    def stats(self) -> dict[str, float]:
        raw = self.redis.hgetall("trib:stats:encoder:image")
        return {k.decode(): float(v) for k, v in raw.items()}

    def roles(self) -> dict[str, int]:
        """pid of each tier process (and Redis) under this cluster's ``tributary up``."""
        out = {}
        for pid in os.listdir("/proc"):
            try:
                st = CpuMeter._stat(pid)
                if not (st and st[1] == str(self.proc.pid)):
                    continue
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [a.decode(errors="replace") for a in argv]
            if "--modality" in words:
                out[f"encoder:{words[words.index('--modality') + 1]}"] = int(pid)
            elif any(w in ("gateway", "backbone") for w in words):
                out[next(w for w in words if w in ("gateway", "backbone"))] = int(pid)
            elif any("redis" in w or "valkey" in w for w in words[:1]):
                out["redis"] = int(pid)
        return out


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def image_messages(rng: np.random.Generator) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": IMAGE_TEXT},
        {"type": "image_url",
         "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes(rng)).decode()}},
    ]}]


# --------------------------------------------------------------------------------------------------------- table B
ROLES = ("encoder:image", "backbone", "gateway", "redis")
def table_b(clusters: dict[str, Cluster], model: str, rounds: int, warmup: int, conc: int, meter: Meter,
            rng: np.random.Generator, noisy: float, min_quiet: int, max_rounds: int, deadline: float) -> dict:
    pool = ThreadPoolExecutor(conc)

    def one(client, msgs) -> tuple[float, str]:
        """Latency, and the server's request id (what every tier logs)."""
        t0 = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=1,
                                                               temperature=0, extra_body={"ignore_eos": True})
        resp = raw.parse()
        assert resp.usage.completion_tokens == 1, resp.usage
        return time.perf_counter() - t0, raw.headers["x-request-id"]

    def round_(c: Cluster, idle: Cluster) -> dict:
        msgs = [image_messages(rng) for _ in range(conc)]  # fresh images, made outside the timed part
        s0 = c.stats()
        groups = ([(os.getpid(), False), (c.proc.pid, True)], [(idle.proc.pid, True)],
                  *([(roles[c.label].get(r, -1), False)] for r in ROLES))
        b = meter.take(*groups)
        t0 = time.perf_counter()
        lat, rids = map(list, zip(*pool.map(lambda mm: one(c.client, mm), msgs)))
        wall = time.perf_counter() - t0
        a = meter.take(*groups)
        s1 = c.stats()
        return {"wall": wall, "lat": lat, "others": meter.others(b, a, wall), "rids": rids,
                "ours": meter.cores(b, a, 1, wall), "idle": meter.cores(b, a, 2, wall),
                **{r: meter.cores(b, a, 3 + k, wall) for k, r in enumerate(ROLES)},
                "items": delta(s1, s0, "encoder_calls"), "passes": delta(s1, s0, "forward_passes"),
                "enc_s": delta(s1, s0, "encode_seconds")}

    roles = {lab: c.roles() for lab, c in clusters.items()}
    labels = list(clusters)
    other = {labels[0]: clusters[labels[1]], labels[1]: clusters[labels[0]]}
    for _ in range(warmup):
        for lab in labels:
            round_(clusters[lab], other[lab])
    out: dict[str, list[dict]] = {lab: [] for lab in labels}
    i, took = 0, 0.0
    # `rounds` per cluster, then more (up to max_rounds) while either has fewer than min_quiet quiet ones; at least
    # 3 and no new pair of rounds that would end past `deadline`
    while i < max_rounds:
        quiet = min(sum(r["others"] <= noisy for r in v) for v in out.values())
        if i >= 3 and time.monotonic() + took > deadline or i >= rounds and quiet >= min_quiet:
            break
        t0 = time.monotonic()
        for lab in (labels if i % 2 == 0 else labels[::-1]):
            out[lab].append(round_(clusters[lab], other[lab]))
        took, i = time.monotonic() - t0, i + 1
    pool.shutdown()
    return out


def log_records(path: Path, rids: set[str]) -> dict[str, list[dict]]:
    """The tiers' JSON log lines of these requests, by message."""
    out: dict[str, list[dict]] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("request_id") in rids:
            out.setdefault(rec["msg"], []).append(rec)
    return out


def b_quiet(res: dict, noisy: float) -> float:
    return min(quiet_share([r["others"] for r in v], noisy) for v in res.values())


def b_summary(rs: list[dict], conc: int) -> dict:
    items, passes, enc = (sum(r[k] for r in rs) for k in ("items", "passes", "enc_s"))
    lat = [x for r in rs for x in r["lat"]]
    return {"rps": statistics.median(conc / r["wall"] for r in rs), "enc_ips": items / enc if enc else float("nan"),
            "batch": items / passes if passes else float("nan"), "n": len(rs),
            "lat50": statistics.median(lat), "lat90": pct(lat, 90),
            "items": items, "passes": passes, "enc_ms_per_pass": enc / passes * 1e3 if passes else float("nan"),
            "others": statistics.median(r["others"] for r in rs), "ours": statistics.median(r["ours"] for r in rs),
            "idle": statistics.median(r["idle"] for r in rs), "wall": sum(r["wall"] for r in rs),
            **{role: statistics.median(r[role] for r in rs) for role in ROLES}}


def print_b(res: dict, conc: int, noisy: float, runtime: str,
            clusters: dict[str, Cluster]) -> list[tuple[str, bool, str]]:
    (l8, l1) = list(res)
    print("columns: enc items/s = items / encode_seconds (stats hash); ms/pass = encode_seconds / forward passes; "
          "prefill ms = median backbone prefill step, seqs = sequences it started, busy = prefill steps / round wall; "
          "own cores = cores this side's processes used; others = everything else; (idle cl.) = the other cluster")
    print(f"{'cluster':<22}{'rounds':>7}{'req/s':>7}{'lat p50 ms':>11}{'p90':>8}{'enc items/s':>12}"
          f"{'mean batch':>11}{'ms/pass':>8}{'items':>6}{'passes':>7}{'prefill ms':>11}{'seqs':>5}{'busy':>6}"
          f"{'own cores':>10}{'others':>7}{'(idle cl.)':>11}")
    s = {}
    for lab, rs in res.items():
        s[lab] = x = b_summary(rs, conc)
        recs = log_records(clusters[lab].log_path, {rid for r in rs for rid in r["rids"]})
        pre = recs.get("prefilled", [])
        steps = {r["ms"] / 1e3 for r in pre}  # a step that starts several sequences logs its ms for each
        x["prefill"] = statistics.median(steps) if steps else float("nan")
        x["per_step"] = len(pre) / max(len(steps), 1)
        x["busy"] = sum(steps) / x["wall"]  # share of the rounds' wall time the backbone spent in prefill steps
        print(f"{lab:<22}{x['n']:>7}{x['rps']:>7.2f}{ms(x['lat50']):>11}{ms(x['lat90']):>8}"
              f"{x['enc_ips']:>12.2f}{x['batch']:>11.2f}{x['enc_ms_per_pass']:>8.1f}{x['items']:>6.0f}"
              f"{x['passes']:>7.0f}{ms(x['prefill']):>11}{x['per_step']:>5.1f}{x['busy']:>6.0%}{x['ours']:>10.2f}"
              f"{x['others']:>7.2f}{x['idle']:>11.2f}")
    e2e = s[l8]["rps"] / s[l1]["rps"]
    enc = s[l8]["enc_ips"] / s[l1]["enc_ips"]
    print(f"ratio batch8/batch1 ({runtime}), all rounds: end-to-end req/s {e2e:.2f}, encoder-only items/s {enc:.2f}"
          f"   (targets >= 1.3)")
    print("cores used per process (median over rounds; rest = bench client, audio encoder, supervisor): " + " | ".join(
        f"{lab.split()[0]} " + ", ".join(f"{role} {s[lab][role]:.2f}" for role in ROLES)
        + f", rest {s[lab]['ours'] - sum(s[lab][role] for role in ROLES):.2f}" for lab in res))
    print("per round, req/s (others): " + " | ".join(
        f"{lab.split()[0]} " + " ".join(f"{conc / r['wall']:.2f}({r['others']:.2f})" for r in rs)
        for lab, rs in res.items()))
    quiet = {lab: [r for r in rs if r["others"] <= noisy] for lab, rs in res.items()}
    how = "all rounds: NOISY"
    if all(len(v) >= 2 for v in quiet.values()):
        q = {lab: b_summary(v, conc) for lab, v in quiet.items()}
        e2e, enc = q[l8]["rps"] / q[l1]["rps"], q[l8]["enc_ips"] / q[l1]["enc_ips"]
        how = f"quiet rounds, n={len(quiet[l8])}+{len(quiet[l1])}"
        print(f"quiet rounds only (others <= {noisy}): {len(quiet[l8])} + {len(quiet[l1])} rounds: req/s "
              f"{q[l8]['rps']:.2f} vs {q[l1]['rps']:.2f}, enc items/s {q[l8]['enc_ips']:.2f} vs "
              f"{q[l1]['enc_ips']:.2f}, "
              f"mean batch {q[l8]['batch']:.2f} vs {q[l1]['batch']:.2f}; ratios end-to-end {e2e:.2f}, "
              f"encoder-only {enc:.2f} (the verdicts use these)")
    else:
        print(f"quiet rounds only: too few (< 2 per cluster with others <= {noisy}); the verdicts use all rounds")
    return [(f"B end-to-end req/s batch8/batch1 ({runtime}) >= 1.3", e2e >= 1.3, f"{e2e:.2f} from {how}"),
            (f"B encoder-only items/s batch8/batch1 ({runtime}) >= 1.3", enc >= 1.3, f"{enc:.2f} from {how}")]


def batch_scaling(model_dir: Path, threads: int, batches=(1, 8), reps: int = 5) -> dict[int, float]:
    """In-process torch image encoder: median ms per item at each batch size (calls interleaved), at the workers'
    thread count."""
    import torch

    from encoders.export import example_input
    from encoders.loader import load_runtime
    from models.spec import ModelSpec

    torch.set_num_threads(threads)
    spec = ModelSpec.from_dir(model_dir)
    rt = load_runtime(spec, "image", "torch")
    xs = {b: example_input(spec, "image", b) for b in batches}
    times: dict[int, list[float]] = {b: [] for b in batches}
    for b in batches:
        rt.run(xs[b])
    for _ in range(reps):
        for b in batches:
            t0 = time.perf_counter()
            rt.run(xs[b])
            times[b].append((time.perf_counter() - t0) / b)
    return {b: statistics.median(v) for b, v in times.items()}


# --------------------------------------------------------------------------------------------------------- table C
def table_c(c: Cluster, model: str, pairs: int, warmup: int, max_tokens: int, meter: Meter,
            rng: np.random.Generator, noisy: float, min_quiet: int, max_pairs: int, deadline: float) -> dict:
    def streamed(msgs) -> dict:
        s0 = c.stats()
        b = meter.take([(os.getpid(), False), (c.proc.pid, True)])
        t0 = time.perf_counter()
        ttft, any_chunk = None, None
        stream = c.client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            now = time.perf_counter() - t0
            any_chunk = any_chunk if any_chunk is not None else now
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = now
        total = time.perf_counter() - t0
        a = meter.take([(os.getpid(), False), (c.proc.pid, True)])
        s1 = c.stats()
        return {"ttft": ttft if ttft is not None else any_chunk, "total": total,
                "others": meter.others(b, a, total), "calls": delta(s1, s0, "encoder_calls"),
                "enc_s": delta(s1, s0, "encode_seconds"), "hits": delta(s1, s0, "cache_hits"),
                "misses": delta(s1, s0, "cache_misses")}

    for _ in range(warmup):
        msgs = image_messages(rng)
        streamed(msgs)
        streamed(msgs)
    out = {"cold": [], "hit": []}

    def quiet_pairs() -> int:
        return sum(c["others"] <= noisy and h["others"] <= noisy for c, h in zip(out["cold"], out["hit"]))

    # `pairs`, then more (up to max_pairs) while fewer than min_quiet were quiet; at least 5 and no new pair that
    # would end past `deadline`
    took = 0.0
    while len(out["cold"]) < max_pairs:
        n = len(out["cold"])
        if n >= 5 and time.monotonic() + took > deadline or n >= pairs and quiet_pairs() >= min_quiet:
            break
        t0 = time.monotonic()
        msgs = image_messages(rng)  # a fresh image: the first request is cold, the same request again is a hit
        out["cold"].append(streamed(msgs))
        out["hit"].append(streamed(msgs))
        took = time.monotonic() - t0
    return out


def c_quiet(res: dict, noisy: float) -> float:
    return min(quiet_share([r["others"] for r in v], noisy) for v in res.values())


def print_c(res: dict, noisy: float) -> list[tuple[str, bool, str]]:
    print(f"{'request':<8}{'n':>4}{'TTFT p50 ms':>12}{'p90 ms':>9}{'min ms':>9}{'enc calls/req (min-max)':>25}"
          f"{'cache hit/miss':>16}{'others med':>11}")
    med = {}
    for kind, rs in res.items():
        tt = [r["ttft"] for r in rs]
        med[kind] = statistics.median(tt)
        calls = [r["calls"] for r in rs]
        print(f"{kind:<8}{len(rs):>4}{ms(med[kind]):>12}{ms(pct(tt, 90)).strip():>9}{ms(min(tt)).strip():>9}"
              f"{statistics.mean(calls):>17.2f} ({min(calls):.0f}-{max(calls):.0f})"
              f"{sum(r['hits'] for r in rs):>9.0f}/{sum(r['misses'] for r in rs):<6.0f}"
              f"{statistics.median(r['others'] for r in rs):>11.2f}")
    enc = statistics.median(r["enc_s"] / r["calls"] for r in res["cold"] if r["calls"])
    saved = med["cold"] - med["hit"]
    paired = statistics.median(c["ttft"] - h["ttft"] for c, h in zip(res["cold"], res["hit"]))
    ok = med["hit"] <= med["cold"] - 0.8 * enc
    zero = all(r["calls"] == 0 for r in res["hit"])
    one = all(r["calls"] == 1 for r in res["cold"])
    print(f"median encode time (stats, cold requests): {enc * 1e3:.1f} ms; TTFT saved by a hit: {saved * 1e3:.1f} ms "
          f"({saved / enc:.2f} x encode); median of the per-pair differences {paired * 1e3:.1f} ms")
    print(f"check hit TTFT {med['hit'] * 1e3:.1f} <= cold TTFT {med['cold'] * 1e3:.1f} - 0.8 x {enc * 1e3:.1f} = "
          f"{(med['cold'] - 0.8 * enc) * 1e3:.1f} ms: {'met' if ok else 'NOT met'}")
    print(f"encoder calls: every hit made 0: {'yes' if zero else 'NO'}; every cold request made 1: "
          f"{'yes' if one else 'NO'}")
    qp = [(c, h) for c, h in zip(res["cold"], res["hit"]) if c["others"] <= noisy and h["others"] <= noisy]
    how = "all pairs: NOISY"
    if len(qp) >= 3:
        qc, qh = statistics.median(c["ttft"] for c, _ in qp), statistics.median(h["ttft"] for _, h in qp)
        enc = statistics.median(c["enc_s"] / c["calls"] for c, _ in qp if c["calls"])
        saved, ok, how = qc - qh, qh <= qc - 0.8 * enc, f"quiet pairs, n={len(qp)}"
        print(f"quiet pairs only (others <= {noisy} for both requests, n={len(qp)}): cold {qc * 1e3:.1f} ms, hit "
              f"{qh * 1e3:.1f} ms, encode {enc * 1e3:.1f} ms, saved {saved * 1e3:.1f} ms: "
              f"{'met' if ok else 'NOT met'} (the verdict uses these)")
    else:
        print(f"quiet pairs only: too few (< 3 pairs with others <= {noisy} for both requests); the verdict uses all")
    return [("C hit TTFT <= cold TTFT - 0.8 x encode", ok,
             f"saved {saved * 1e3:.0f} ms vs encode {enc * 1e3:.0f} ms, from {how}"),
            ("C a hit makes zero encoder calls", zero, f"hit calls {[int(r['calls']) for r in res['hit']]}")]


# ------------------------------------------------------------------------------------------------------------ main
def run_table(name: str, fn, quiet_of, noisy: float, meter: Meter, quiet_wait: float):
    """Wait (a while) for other processes to go quiet, then measure; the tables themselves take more samples while
    too few were quiet, as long as their deadline allows."""
    waited = wait_quiet(meter, noisy, quiet_wait)
    if waited > 2.5:
        print(f"  {name}: waited {waited:.0f} s for other processes to calm down", flush=True)
    t0 = time.monotonic()
    res = fn()
    q = quiet_of(res, noisy)
    print(f"  {name}: {time.monotonic() - t0:.0f} s, {q:.0%} of samples quiet (others <= {noisy} core)", flush=True)
    return res, q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tributary-bench/demo-small"),
                   help="demo checkpoint cache (built on first use)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="A: threads of the target row")
    p.add_argument("--a-runs", type=int, default=20, help="A: measured calls per runtime per row")
    p.add_argument("--a-warmup", type=int, default=3)
    p.add_argument("--a-gap-ms", type=float, default=20.0, help="A: pause before each timed call")
    p.add_argument("--concurrency", type=int, default=16, help="B: requests per round, all at once")
    p.add_argument("--rounds", type=int, default=6, help="B: measured rounds per cluster")
    p.add_argument("--max-rounds", type=int, default=12,
                   help="B: more rounds (up to this many per cluster) while either has fewer than 3 quiet ones")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="B: --encoder-max-wait-ms of the batch-8 cluster")
    p.add_argument("--onnx", action="store_true", help="B: also compare two clusters with --encoder-runtime onnx")
    p.add_argument("--pairs", type=int, default=10, help="C: measured cold + hit pairs")
    p.add_argument("--max-pairs", type=int, default=30,
                   help="C: more pairs (up to this many) while fewer than 5 pairs were quiet")
    p.add_argument("--c-max-tokens", type=int, default=4, help="C: tokens per streamed request")
    p.add_argument("--tables", default="ABC", help="which tables to measure (C needs B's clusters)")
    p.add_argument("--noisy", type=float, default=0.15,
                   help="a sample is noisy if other processes used more than this many cores meanwhile")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="before each table, wait up to this long for other processes to go quiet")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="the tables stop adding samples so as to end within about this many seconds")
    p.add_argument("--a-budget-s", type=float, default=75.0, help="A: seconds at most (when B or C follow)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--cluster-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for both clusters (experiments, e.g. OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t_start = time.monotonic()
    budget_end = t_start + args.budget_s
    model_dir = args.model_dir.resolve()
    import torch
    import transformers

    from encoders.export import ensure_onnx
    from encoders.loader import load_preprocessor
    from models.demo import write_demo_model
    from models.spec import ModelSpec

    transformers.logging.set_verbosity_error()
    if not (model_dir / "model.safetensors").exists():
        print(f"building the small demo model in {model_dir} ...", flush=True)
        write_demo_model(model_dir, "small")
    spec = ModelSpec.from_dir(model_dir)
    try:
        for modality in ("image", "audio"):
            load_preprocessor(spec, modality)
    except (KeyError, ValueError, TypeError) as exc:  # a cache written by an older demo (processor config format)
        print(f"the demo model in {model_dir} is stale ({type(exc).__name__}: {exc}); rebuilding it ...", flush=True)
        write_demo_model(model_dir, "small")
        spec = ModelSpec.from_dir(model_dir)
    for modality in ("image", "audio"):  # the clusters and table A share the export (one time, ~10 s each)
        ensure_onnx(spec, modality, progress=lambda line: print(line, flush=True))
    cores = os.cpu_count() or 1
    worker_threads = max(1, cores // 2)
    rows = sorted({args.threads, worker_threads}, reverse=True)
    meter = Meter()
    rng = np.random.default_rng(args.seed)
    verdicts: list[tuple[str, bool, str]] = []

    import onnxruntime

    print(f"encoders bench: model {spec.name} (small), {cores} cores, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; others = cores used by processes outside the measured side", flush=True)

    # ---- A
    tables = args.tables.upper()
    if "A" in tables:
        a_end = min(budget_end, time.monotonic() + args.a_budget_s) if {"B", "C"} & set(tables) else budget_end
        verdicts += run_a(args, model_dir, rows, meter, a_end)
    # ---- B, and C on B's batch-8 cluster
    if {"B", "C"} & set(tables):
        for runtime in ["torch"] + (["onnx"] if args.onnx else []):
            verdicts += run_bc(args, model_dir, spec.name, runtime, tables if runtime == "torch" else "B", meter,
                               rng, budget_end)
    print("\ntargets:")
    for what, ok, detail in verdicts:
        print(f"  {'met    ' if ok else 'MISSED '} {what}  ({detail})")
    print(f"total bench time {time.monotonic() - t_start:.0f} s")
    return 0


def run_a(args, model_dir: Path, rows: list[int], meter: Meter, deadline: float) -> list:
    print("\nA) measuring ORT vs torch in-process ...", flush=True)
    res, q = run_table("A", lambda: table_a(model_dir, rows, args.a_runs, args.a_warmup, args.a_gap_ms / 1e3, meter,
                                            args.seed, args.noisy, deadline), a_quiet, args.noisy, meter,
                       args.quiet_wait)
    n = min(len(r["times"]["torch"]) for r in res["rows"])
    print(f"\nA) ORT vs torch, encoder + projector forward, batch size 1, same input, same threads; median of >= {n} "
          f"alternating calls per runtime after {args.a_warmup} warm-up ({q:.0%} quiet)")
    return print_a(res, args.noisy, args.threads)


def run_bc(args, model_dir: Path, model: str, runtime: str, tables: str, meter: Meter, rng, budget_end: float):
    cores = os.cpu_count() or 1
    worker_threads = max(1, cores // 2)
    verdicts = []
    print(f"\nB) starting two clusters ({runtime}: max-batch 8 / wait {args.max_wait_ms:g} ms, and max-batch 1) ...",
          flush=True)
    cfgs = {f"batch8 wait{args.max_wait_ms:g} {runtime}": ["--encoder-max-batch", "8"],
            f"batch1 {runtime}": ["--encoder-max-batch", "1"]}
    clusters: dict[str, Cluster] = {}
    try:
        for (lab, extra), short in zip(cfgs.items(), ("b8", "b1")):
            clusters[lab] = Cluster(lab, model_dir, ["--encoder-runtime", runtime, *extra, "--encoder-max-wait-ms",
                                                     str(args.max_wait_ms)],
                                    model_dir.parent / f"encoders-bench-{runtime}-{short}.log",
                                    dict(kv.split("=", 1) for kv in args.cluster_env))
        t0 = time.monotonic()
        for c in clusters.values():
            c.wait_ready(time.monotonic() + args.ready_timeout)
        logs = ", ".join(str(c.log_path) for c in clusters.values())
        print(f"  both up in {time.monotonic() - t0:.0f} s (logs {logs})", flush=True)
        if "B" in tables:
            b_end = budget_end - (50 if "C" in tables else 10)
            res, q = run_table(f"B {runtime}", lambda: table_b(clusters, model, args.rounds, 1, args.concurrency,
                                                               meter, rng, args.noisy, 3, args.max_rounds, b_end),
                               b_quiet, args.noisy, meter, args.quiet_wait)
            print(f"\nB) {args.concurrency} concurrent text+image requests per round (fresh 320x240 PNGs, "
                  f"max_tokens=1), rounds alternating between the clusters, 1 warm-up round each ({q:.0%} quiet); "
                  f"encoders {worker_threads} thread(s) each, backbone {cores}")
            verdicts += print_b(res, args.concurrency, args.noisy, runtime, clusters)
            if runtime == "torch":
                sc = batch_scaling(model_dir, worker_threads)
                print(f"in-process torch image encoder at {worker_threads} thread(s), ms per item (median of 5, "
                      "interleaved): "
                      + ", ".join(f"batch {b}: {v * 1e3:.1f}" for b, v in sc.items())
                      + f" -> batch-8 speed-up per item {sc[1] / sc[8]:.2f}x")
        if "C" in tables:
            c8 = next(iter(clusters.values()))
            print(f"\nC) measuring cache hit vs cold on '{c8.label}' ...", flush=True)
            res, q = run_table("C", lambda: table_c(c8, model, args.pairs, 1, args.c_max_tokens, meter, rng,
                                                    args.noisy, 5, args.max_pairs, budget_end - 10),
                               c_quiet, args.noisy, meter, args.quiet_wait)
            print(f"\nC) streamed text+image request (max_tokens={args.c_max_tokens}), cold (fresh image) then the "
                  f"same request again (hit), {len(res['cold'])} pairs after 1 warm-up pair, cluster '{c8.label}' "
                  f"({q:.0%} quiet); TTFT = time to the first content chunk")
            verdicts += print_c(res, args.noisy)
    finally:
        for c in clusters.values():
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGINT)  # tributary up stops its tiers in order
        codes = [stop_cluster(c.proc) for c in clusters.values()]
        print(f"  clusters stopped (exit codes {codes})", flush=True)
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
