"""Recovery under chaos: what a client sees while Redis pauses or restarts empty, while a backbone replica is killed,
past a gateway's admission bound, and over a long soak. Figures are printed, never asserted (tests/e2e/test_chaos.py
asserts the behaviour).

    .venv/bin/python bench/recovery.py                                # ~65 s on 2 cores (no soak)
    .venv/bin/python bench/recovery.py --scenarios soak --soak 3000   # the soak alone

One run starts its own embedded Redis and one ``tributary up`` cluster (the tiny demo model, written to a temporary
directory; ``--backbone-replicas 2``; its own ``--prefix``). Load comes from the official ``openai`` SDK in threads:
a mixed workload (text, image, audio, image + audio; streamed and not; temperature 0, ``ignore_eos``, 24 tokens),
``--requests`` of them, ``--concurrency`` in flight. An undisturbed reference run of the same workload comes first:
"answered in full" means the same text and finish reason as there.

1. ``pause``: Redis SIGSTOPped for ``--pause-s`` seconds under load. A prober sends a tiny request every 50 ms
   (httpx, 10 s timeout) and records status and latency: the 503 window, how fast the 503s come back, the recovery
   time (SIGCONT to the first 200 of a probe sent after it), Retry-After and error codes; and the load's outcomes.
2. ``restart``: Redis stopped and started empty on the same port under load; the same figures.
3. ``kill``: kill -9 one backbone replica under load: outcomes, migrations (``/ready``), and the longest gap between
   two streamed chunks (the migration stall) against the reference run's.
4. ``overload``: a second gateway (``--max-inflight 8``) on the same cluster gets ``--burst`` concurrent requests:
   200 vs 503 ``server_overloaded``, their latencies, Retry-After.
5. ``soak`` (``--soak N``): N requests, ``--concurrency`` in flight, every other pass over the workload with fresh
   images and clips: answered / errors / lost, and the RSS of every process of the cluster before, half-way, after.

Each tier logs JSON lines to ``<tmp>/cluster.log``; requests that hung, were cut or answered differently are
printed with their log lines (matched by the server's request id). ``--keep-logs`` keeps the directory (it is kept
anyway when something like that happened).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import httpx  # noqa: E402
import openai  # noqa: E402
import redis  # noqa: E402
from openai import OpenAI  # noqa: E402

from cache.embedded import EmbeddedRedis, die_with_parent, free_port  # noqa: E402
from cache.keys import BACKBONE_GROUP, ENCODER_GROUP, Keys  # noqa: E402
from tests.media import b64, data_url, png_bytes, wav_bytes  # noqa: E402

CLIENT_TIMEOUT_S = 150.0  # far past every bound the gateway keeps: a request that reaches it has hung
PROBE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 10.0
REPLICAS = 2
SCENARIOS = ("pause", "restart", "kill", "overload", "soak")


# ----------------------------------------------------------------------------------------------------- workload
def workload(n: int, variant: int = 0) -> list[dict]:
    """Mixed requests as tests/e2e/test_chaos.py sends them: text, image, audio and image + audio; streamed and not.
    ``variant`` > 0: the same requests with other images and clips (the text-only ones are unchanged)."""
    out, v = [], 1000 * variant
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"request {i}: tell me what you notice"}]
        if i % 4 == 1:
            content.append({"type": "image_url", "image_url": {"url": data_url(png_bytes(24 + i % 7, 20,
                                                                                         seed=i % 9 + v))}})
        elif i % 4 == 2:
            content.append({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(0.3, seed=i % 5 + v)),
                                                                   "format": "wav"}})
        elif i % 8 == 3:
            content.append({"type": "image_url", "image_url": {"url": data_url(png_bytes(30, 30, seed=50 + i + v))}})
            content.append({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(0.2, seed=60 + i + v)),
                                                                   "format": "wav"}})
        out.append({"messages": [{"role": "user", "content": content}], "stream": i % 2 == 0})
    return out


def has_media(req: dict) -> bool:
    return len(req["messages"][0]["content"]) > 1


@dataclass
class Outcome:
    kind: str = "lost"  # ok | error (a clear HTTP or stream error) | hung (client timeout) | cut | lost (no return)
    text: str | None = None
    finish: str | None = None
    error: str | None = None  # "<status> <code>" or a description
    status: int | None = None
    code: str | None = None
    retry_after: str | None = None
    rid: str | None = None  # the server's request id
    started: float = 0.0  # monotonic
    latency: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival times of streamed content chunks (monotonic)


def _rid(completion_id: str | None) -> str | None:
    return completion_id.removeprefix("chatcmpl-") if completion_id else None


def ask(client: OpenAI, model: str, req: dict, max_tokens: int, first_token: threading.Semaphore | None = None
        ) -> Outcome:
    o = Outcome(started=time.monotonic())
    try:
        if req["stream"]:
            text, finish = "", None
            stream = client.chat.completions.create(model=model, messages=req["messages"], stream=True,
                                                    temperature=0, max_tokens=max_tokens,
                                                    extra_body={"ignore_eos": True})
            for chunk in stream:
                o.rid = o.rid or _rid(chunk.id)
                if chunk.choices:
                    delta = chunk.choices[0].delta.content or ""
                    if delta:
                        o.chunks.append(time.monotonic())
                        if first_token is not None:
                            first_token.release()
                            first_token = None
                    text += delta
                    finish = chunk.choices[0].finish_reason or finish
            if finish is None:
                o.kind, o.error, o.text = "cut", "the stream ended without a finish reason", text
            else:
                o.kind, o.text, o.finish = "ok", text, finish
        else:
            resp = client.chat.completions.create(model=model, messages=req["messages"], temperature=0,
                                                  max_tokens=max_tokens, extra_body={"ignore_eos": True})
            o.rid = _rid(resp.id)
            o.kind, o.text, o.finish = "ok", resp.choices[0].message.content, resp.choices[0].finish_reason
    except openai.APIStatusError as exc:  # an HTTP error status before the stream started
        err = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else {}
        o.kind, o.status = "error", exc.status_code
        o.code = err.get("code") if isinstance(err, dict) else None
        o.retry_after = exc.response.headers.get("retry-after")
        o.rid = o.rid or exc.response.headers.get("x-request-id")
        o.error = f"{exc.status_code} {o.code}"
    except openai.APITimeoutError:
        o.kind, o.error = "hung", f"no answer within the client timeout ({CLIENT_TIMEOUT_S:g} s)"
    except openai.APIConnectionError as exc:
        o.kind, o.error = "cut", f"connection error: {exc.__cause__!r}"
    except openai.APIError as exc:  # an error event inside a started stream
        o.kind = "error"
        o.code = exc.body.get("code") if isinstance(exc.body, dict) else None
        o.error = f"stream {o.code}"
    except Exception as exc:  # noqa: BLE001 -- anything else is a finding to print, not a crash of the bench
        o.kind, o.error = "cut", f"{type(exc).__name__}: {exc}"
    o.latency = time.monotonic() - o.started
    if first_token is not None and o.kind != "ok":
        first_token.release()  # a refused request must not hold up the chaos forever
    return o


class Load:
    """``concurrency`` threads sending requests through the SDK in the background. Request ``i`` is
    ``reqs[i % len(reqs)]`` (so its answer is compared with ``reference[i % len]``); the load ends after ``total``
    requests, or, with ``total=None``, once :meth:`stop` is called (each thread finishes the request in hand). A
    thread whose request got a 503 with Retry-After waits that long (at most 2 s) before its next one, as a client
    that honours the header would: a refused client does not spin."""

    def __init__(self, client: OpenAI, model: str, reqs: list[dict], concurrency: int, max_tokens: int,
                 total: int | None = None):
        self.client, self.model, self.reqs, self.max_tokens, self.total = client, model, reqs, max_tokens, total
        self.first_token = threading.Semaphore(0)
        self.outcomes: dict[int, Outcome] = {}
        self.answered = 0
        self._next = iter(range(total if total is not None else 10**12))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.t0 = time.monotonic()
        self.wall = 0.0
        n = max(1, min(concurrency, total if total is not None else concurrency))
        self.threads = [threading.Thread(target=self._run, name=f"load-{k}", daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i = next(self._next, None)
                if i is None:
                    return
                self.outcomes[i] = Outcome(started=time.monotonic())  # "lost" until answered
            req = self.reqs[i % len(self.reqs)]
            o = ask(self.client, self.model, req, self.max_tokens, self.first_token if req["stream"] else None)
            with self._lock:
                self.outcomes[i] = o
                self.answered += 1
            if o.status == 503 and o.retry_after:
                self._stop.wait(min(float(o.retry_after), 2.0))

    def wait_first_tokens(self, n: int, timeout: float = 60.0) -> int:
        deadline, got = time.monotonic() + timeout, 0
        while got < n and time.monotonic() < deadline:
            got += self.first_token.acquire(timeout=0.5)
            if not any(t.is_alive() for t in self.threads):
                break
        return got

    def stop(self) -> None:
        self._stop.set()

    def results(self) -> list[Outcome]:
        """Every request's outcome, in order. Each request has its own 150 s bound, the whole load that once more
        (plus the time the requests take when ``total`` is given)."""
        deadline = time.monotonic() + CLIENT_TIMEOUT_S + 60
        if self.total is not None:
            deadline += 3600
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self.wall = time.monotonic() - self.t0
        with self._lock:
            return [self.outcomes[i] for i in sorted(self.outcomes)]


# ------------------------------------------------------------------------------------------------------- prober
@dataclass
class Probe:
    sent: float
    latency: float = 0.0
    status: int | str = "?"  # HTTP status, or "timeout" / "conn"
    code: str | None = None
    retry_after: str | None = None


class Prober:
    """A tiny request (text, 1 token) every 50 ms, each in its own thread so that a slow answer delays no probe."""

    def __init__(self, base_url: str, model: str):
        self.url = f"{base_url}/v1/chat/completions"
        self.body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1,
                     "temperature": 0}
        self.http = httpx.Client(timeout=PROBE_TIMEOUT_S, limits=httpx.Limits(max_connections=512,
                                                                               max_keepalive_connections=64))
        self.pool = ThreadPoolExecutor(int(PROBE_TIMEOUT_S / PROBE_EVERY_S) + 56, thread_name_prefix="probe")
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, name="prober", daemon=True)

    def start(self) -> Prober:
        self._loop.start()
        return self

    def _run(self) -> None:
        t0, k = time.monotonic(), 0
        while not self._stop.is_set():
            try:
                self.pool.submit(self._one)
            except RuntimeError:  # the pool was shut down (the bench is stopping)
                return
            k += 1
            self._stop.wait(max(0.0, t0 + k * PROBE_EVERY_S - time.monotonic()))

    def _one(self) -> None:
        sent = time.monotonic()
        status, code, retry_after = "?", None, None
        try:
            r = self.http.post(self.url, json=self.body)
            status, retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code >= 400:
                try:
                    code = r.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "unparsed"
        except httpx.TimeoutException:
            status = "timeout"
        except httpx.HTTPError as exc:
            status, code = "conn", type(exc).__name__
        # Appended whole, once answered: the loop reading it meanwhile never sees a half-filled probe.
        self.probes.append(Probe(sent, time.monotonic() - sent, status, code, retry_after))

    def first_200_after(self, t: float) -> float | None:
        """When the first probe sent at or after ``t`` that got a 200 was answered (monotonic)."""
        done = [p.sent + p.latency for p in list(self.probes) if p.sent >= t and p.status == 200]
        return min(done) if done else None

    def stop(self) -> list[Probe]:
        self._stop.set()
        self._loop.join(5)
        self.pool.shutdown(wait=True)  # each probe is bounded by its 10 s timeout
        self.http.close()
        return sorted(self.probes, key=lambda p: p.sent)


# ---------------------------------------------------------------------------------------------------- the cluster
def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Bench:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.prefix = f"recov{os.getpid()}"
        self.keys = Keys(self.prefix)
        self.redis_server: EmbeddedRedis | None = None
        self.up: subprocess.Popen | None = None
        self.gw2: subprocess.Popen | None = None
        self.log_path = tmp / "cluster.log"
        self.base_url = ""
        self.model = ""
        self.model_dir = tmp / "demo-tiny"
        self.anomalies = 0
        self.active: list[Load | Prober] = []  # stopped first when the bench stops early

    # ------------------------------------------------------------------------------------------- start and stop
    def start(self) -> None:
        from models.demo import write_demo_model

        write_demo_model(self.model_dir, "tiny")
        self.redis_server = EmbeddedRedis(maxmemory="256mb").start()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self._log = self.log_path.open("wb")
        self.up = subprocess.Popen(
            [sys.executable, "-m", "tributary.cli", "up", "--model", str(self.model_dir), "--port", str(port),
             "--redis-url", self.redis_server.url, "--prefix", self.prefix, "--backbone-replicas", str(REPLICAS)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # a terminal's Ctrl-C reaches the bench, which stops the cluster in order
            preexec_fn=die_with_parent)
        self.wait_ready(300, "the cluster did not become ready")
        self.model = httpx.get(f"{self.base_url}/v1/models", timeout=5).json()["data"][0]["id"]
        self.client = OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0,
                             timeout=CLIENT_TIMEOUT_S)

    def stop(self) -> None:
        for x in self.active:  # an interrupted scenario: no more requests while the cluster stops
            x.stop()
        if self.redis_server and self.redis_server.proc and self.redis_server.proc.poll() is None:
            os.kill(self.redis_server.proc.pid, signal.SIGCONT)  # in case we stopped while it was paused
        children = self.ours() if self.up else []
        for proc, wait_s in ((self.gw2, 30), (self.up, 90)):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                print(f"!! pid {proc.pid} did not stop in {wait_s} s after SIGINT; killing it", flush=True)
                proc.kill()
                proc.wait(10)
        deadline = time.monotonic() + 10
        while (left := [p for p in children if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)  # the supervisor's children get SIGTERM when it exits (parent-death signal)
        for pid in left:
            print(f"!! cluster process {pid} ({cmdline(pid)[:80]}) left behind; killing it", flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.redis_server:
            self.redis_server.stop()
        if getattr(self, "_log", None):
            self._log.close()

    def ours(self, marker: str = "tributary.cli") -> list[int]:
        """This cluster's processes whose command line holds ``marker`` (found by ``--prefix <ours>``)."""
        out = []
        for proc in Path("/proc").glob("[0-9]*"):
            pid = int(proc.name)
            line = cmdline(pid)
            if marker in line and f"--prefix {self.prefix} " in line and alive(pid):
                out.append(pid)
        return sorted(out)

    def backbones(self) -> list[int]:
        return self.ours("tributary.cli backbone")

    def ready_body(self) -> tuple[int, dict]:
        try:
            r = httpx.get(f"{self.base_url}/ready", timeout=5)
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            return 0, {"error": repr(exc)}

    def wait_ready(self, timeout: float, what: str, backbones: int = REPLICAS) -> float:
        """Seconds until /ready is 200 with ``backbones`` live backbone workers; SystemExit past ``timeout``."""
        t0 = time.monotonic()
        while True:
            if self.up.poll() is not None:
                raise SystemExit(f"tributary up exited with {self.up.returncode}; see {self.log_path}:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
            status, body = self.ready_body()
            if status == 200 and body.get("workers", {}).get("backbone", 0) >= backbones:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"{what} after {timeout:g} s: {body}")
            time.sleep(0.3)  # polling the readiness probe (workers import torch on a restart)

    def queues(self, r: redis.Redis) -> dict[str, tuple[int, int]]:
        streams = {self.keys.gen(): BACKBONE_GROUP, self.keys.jobs("image"): ENCODER_GROUP,
                   self.keys.jobs("audio"): ENCODER_GROUP}
        out = {}
        for s, g in streams.items():
            try:
                out[s] = (r.xpending(s, g)["pending"], r.xlen(s)) if r.exists(s) else (0, 0)
            except redis.ResponseError:  # the stream without its group (just recreated)
                out[s] = (0, r.xlen(s))
        return out

    def settle(self, timeout: float = 120) -> tuple[float, float | None, dict]:
        """Back to ready (every backbone replica live) and every queue drained: (ready s, drained s or None)."""
        ready_s = self.wait_ready(timeout, "the cluster was not ready again")
        r = redis.Redis.from_url(self.redis_server.url, socket_timeout=5)
        t0, state = time.monotonic(), {}
        try:
            while time.monotonic() - t0 < 60:
                state = self.queues(r)
                if all(v == (0, 0) for v in state.values()):
                    return ready_s, time.monotonic() - t0, state
                time.sleep(0.5)  # polling Redis state the workers change
        finally:
            r.close()
        return ready_s, None, state

    # ------------------------------------------------------------------------------------------------- logs
    def log_records(self, since_wall: float = 0.0, until_wall: float = float("inf"), path: Path | None = None
                    ) -> list[dict]:
        out = []
        for line in (path or self.log_path).read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and since_wall <= rec.get("ts", 0) <= until_wall:
                out.append(rec)
        return out

    def show_request(self, o: Outcome, what: str) -> None:
        """Print a suspicious request and its log lines (matched by the server's request id)."""
        self.anomalies += 1
        print(f"   !! {what}: rid {o.rid} {o.error or ''} text={o.text!r:.80} after {o.latency:.1f} s", flush=True)
        if not o.rid:
            return
        for rec in [r for r in self.log_records() if r.get("request_id") == o.rid][:25]:
            extra = {k: v for k, v in rec.items() if k not in ("ts", "level", "logger", "msg", "tier", "pid",
                                                               "request_id", "exc")}
            print(f"      {rec['ts']:.3f} {rec.get('tier', '?'):<14} {rec['level']:<7} {rec['msg']} {extra}")

    # --------------------------------------------------------------------------------------------- reporting
    def outcome_rows(self, outs: list[Outcome], refs: list[Outcome | None] | None = None) -> list[tuple[str, str]]:
        """Request ``i`` against the reference answer of ``reqs[i % len(reqs)]``, or ``refs[i]``: where that is None
        (media no reference run saw), "in full" means all ``--max-tokens`` tokens (finish "length", some text)."""
        n = len(outs)
        ref = refs if refs is not None else [self.ref[i % len(self.ref)] for i in range(n)]

        def same(o: Outcome, r: Outcome | None) -> bool:
            return (o.text, o.finish) == (r.text, r.finish) if r is not None else o.finish == "length" and bool(o.text)

        full = [o for o, r in zip(outs, ref) if o.kind == "ok" and same(o, r)]
        differ = [(o, r or Outcome(finish="length")) for o, r in zip(outs, ref) if o.kind == "ok" and not same(o, r)]
        errors = [o for o in outs if o.kind == "error"]
        hung = [o for o in outs if o.kind in ("hung", "lost")]
        cut = [o for o in outs if o.kind == "cut"]
        for o, r in differ[:3]:
            self.show_request(o, f"answer differs from the reference ({r.text!r:.60}, {r.finish})")
        for o in (hung + cut)[:3]:
            self.show_request(o, o.kind)
        codes = Counter(o.error for o in errors)
        label_full = "answered in full (= reference)" if refs is None else "answered in full (= reference / length)"
        return [(label_full, f"{len(full)}/{n} ({len(full) / max(n, 1):.2f})"),
                ("answered, but text differs", f"{len(differ)}"),
                ("clear errors", f"{len(errors)} ({fmt_counter(codes, 5)})" if errors else "0"),
                ("hung (no answer in 150 s) / cut", f"{len(hung)} / {len(cut)}")]

    def probe_rows(self, probes: list[Probe], t_down: float, t_up: float, noun: str) -> list[tuple[str, str]]:
        before = [p for p in probes if p.sent < t_down]
        during = [p for p in probes if t_down <= p.sent < t_up]
        after = [p for p in probes if p.sent >= t_up]
        base = [p.latency for p in before if p.status == 200]
        base_med = statistics.median(base) if base else float("nan")
        r503 = [p for p in probes if p.status == 503]
        rows = [("probes sent (before / during / after)", f"{len(before)} / {len(during)} / {len(after)}"),
                ("probe statuses during the outage", fmt_counter(Counter(label(p) for p in during))),
                ("probe statuses after it", fmt_counter(Counter(label(p) for p in after)))]
        if r503:
            first = min(p.sent for p in r503) - t_down
            last = max(p.sent for p in r503) - t_down
            lat = sorted(p.latency for p in r503)
            rows += [(f"503 window (probe sent, from the {noun})",
                      f"{first:+.2f} s .. {last:+.2f} s ({last - first:.2f} s; outage {t_up - t_down:.2f} s)"),
                     ("503 latency median / max",
                      f"{ms(statistics.median(lat))} / {ms(lat[-1])} ms (x{statistics.median(lat) / base_med:.2f} / "
                      f"x{lat[-1] / base_med:.2f} the median 200 before the outage, {ms(base_med)} ms)"),
                     ("503s with Retry-After", f"{sum(p.retry_after is not None for p in r503)}/{len(r503)}"),
                     ("503 codes", fmt_counter(Counter(str(p.code) for p in r503))),
                     ("every 503: Retry-After and redis_unavailable",
                      "yes" if all(p.retry_after and p.code == "redis_unavailable" for p in r503) else "no")]
        else:
            rows.append(("503 window", "no probe got a 503"))
        slow = [p for p in during if p.status != 503]
        if slow:
            rows.append(("probes of the outage not refused: max latency",
                         f"{max(p.latency for p in slow):.2f} s ({len(slow)} of them)"))
        first200 = min((p.sent + p.latency for p in after if p.status == 200), default=None)
        rows.append((f"recovery: {'SIGCONT' if noun == 'SIGSTOP' else 'restart'} -> first 200 of a later probe",
                     f"{first200 - t_up:.2f} s" if first200 is not None else "none within the probe window"))
        last_bad = max((p.sent - t_up for p in after if p.status != 200), default=None)
        if last_bad is not None:
            rows.append(("last non-200 probe sent after it", f"+{last_bad:.2f} s"))
        return rows

    def report(self, title: str, rows: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows) + 2
        print(f"\n== {title}", flush=True)
        for k, v in rows:
            print(f"   {k:<{width}}{v}", flush=True)

    def log_summary(self, since_wall: float) -> str:
        c = Counter(r["msg"] for r in self.log_records(since_wall) if r.get("level") in ("warning", "error"))
        return fmt_counter(c, 6) if c else "none"

    # --------------------------------------------------------------------------------------------- scenarios
    def run_reference(self) -> None:
        self.reqs = workload(self.args.requests)
        print(f".. reference run: {len(self.reqs)} requests, {self.args.concurrency} in flight", flush=True)
        load = Load(self.client, self.model, self.reqs, self.args.concurrency, self.args.max_tokens,
                    total=len(self.reqs))
        self.active = [load]
        self.ref = load.results()
        self.ref_wall = load.wall
        bad = [o for o in self.ref if o.kind != "ok" or o.finish != "length"]
        for o in bad[:3]:
            self.show_request(o, "the undisturbed reference run failed a request")
        gaps = [g for o in self.ref for g in chunk_gaps(o)]
        self.ref_gaps = gaps
        lat = [o.latency for o in self.ref]
        self.report("reference (undisturbed)", [
            ("requests ok / all", f"{len(self.ref) - len(bad)}/{len(self.ref)}"),
            ("wall, requests/s", f"{load.wall:.1f} s, {len(self.ref) / load.wall:.1f}/s"),
            ("latency median / p99", f"{ms(statistics.median(lat))} / {ms(pct(lat, 99))} ms"),
            ("gap between streamed chunks median / max", f"{ms(statistics.median(gaps))} / {ms(max(gaps))} ms"
             if gaps else "no streamed chunks")])

    def chaos_under_load(self, title: str, noun: str, down, up) -> None:
        """Run the workload, ``down()`` once it is under way, ``up()`` after; probe all along."""
        wall0 = time.time()
        load = Load(self.client, self.model, self.reqs, self.args.concurrency, self.args.max_tokens)
        load.wait_first_tokens(8)
        prober = Prober(self.base_url, self.model).start()
        self.active = [load, prober]
        time.sleep(1.5)  # probes of the healthy cluster under load: the latency baseline
        t_down = time.monotonic()
        try:
            down()
        finally:
            up()
        t_up = time.monotonic()
        deadline = t_up + 60
        while time.monotonic() < deadline:
            first = prober.first_200_after(t_up)
            if first is not None and time.monotonic() > first + 2:
                break
            time.sleep(0.1)
        load.stop()
        probes = prober.stop()
        outs = load.results()
        rows = self.probe_rows(probes, t_down, t_up, noun)
        rows.append(("load: requests sent", f"{len(outs)} in {load.wall:.1f} s, {self.args.concurrency} in flight "
                                            "(after a 503 with Retry-After a thread waits it out)"))
        rows += [("load: " + k, v) for k, v in self.outcome_rows(outs)]
        ready_s, drained_s, state = self.settle()
        rows += [("log warnings/errors meanwhile", self.log_summary(wall0)),
                 ("back to ready / queues drained after the load",
                  f"{ready_s:.1f} s / {f'{drained_s:.1f} s' if drained_s is not None else f'NOT drained: {state}'}")]
        if drained_s is None:
            self.anomalies += 1
        self.report(title, rows)

    def scenario_pause(self) -> None:
        pid = self.redis_server.proc.pid

        def down():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(self.args.pause_s)

        self.chaos_under_load(f"1. Redis paused (SIGSTOP) {self.args.pause_s:g} s under load", "SIGSTOP", down,
                              lambda: os.kill(pid, signal.SIGCONT))

    def scenario_restart(self) -> None:
        port = self.redis_server.port

        def down():
            self.redis_server.stop()

        self.chaos_under_load("2. Redis restarted empty under load", "stop", down,
                              lambda: self.redis_server.start(port=port))

    def scenario_kill(self) -> None:
        wall0 = time.time()
        _, body = self.ready_body()
        migrations0 = body.get("migrations", 0)
        load = Load(self.client, self.model, self.reqs, self.args.concurrency, self.args.max_tokens,
                    total=len(self.reqs))
        self.active = [load]
        load.wait_first_tokens(8)
        victim = self.backbones()[0]
        wall_kill = time.time()
        os.kill(victim, signal.SIGKILL)
        outs = load.results()
        _, body = self.ready_body()
        migrations1 = body.get("migrations", migrations0)
        recs = self.log_records(wall0)
        migrated = {r["request_id"] for r in recs if r.get("msg") == "migrating request" and r.get("request_id")}
        first_mig = min((r["ts"] for r in recs if r.get("msg") == "migrating request"), default=None)
        restarts = sum(r.get("msg") == "restarting" for r in recs)
        gaps = [(max(chunk_gaps(o)), o) for o in outs if chunk_gaps(o)]
        worst, worst_o = max(gaps, key=lambda x: x[0]) if gaps else (float("nan"), None)
        mig_gaps = [g for g, o in gaps if o.rid in migrated]
        ref_max = max(self.ref_gaps) if self.ref_gaps else float("nan")
        ref_med = statistics.median(self.ref_gaps) if self.ref_gaps else float("nan")
        rows = [(f"load: {k}", v) for k, v in self.outcome_rows(outs)]
        rows += [("migrations (/ready before -> after)",
                  f"{migrations0} -> {migrations1} (+{migrations1 - migrations0})"),
                 ("requests migrated (log) / of them streamed with chunks", f"{len(migrated)} / {len(mig_gaps)}"),
                 ("kill -> first migration (log)", f"{first_mig - wall_kill:.2f} s" if first_mig else "none"),
                 ("longest chunk gap: this run / reference",
                  f"{ms(worst)} / {ms(ref_max)} ms (x{worst / ref_max:.1f})")]
        if mig_gaps:
            rows.append(("  ... of a migrated request", f"{ms(max(mig_gaps))} ms (x{max(mig_gaps) / ref_max:.1f} the "
                                                        f"reference's longest, x{max(mig_gaps) / ref_med:.0f} its "
                                                        "median gap)"))
        if worst_o is not None:
            rows.append(("  the longest gap's request", f"{worst_o.rid} "
                                                        f"({'' if worst_o.rid in migrated else 'not '}migrated)"))
        rows += [("load wall: this run / reference", f"{load.wall:.1f} / {self.ref_wall:.1f} s "
                                                     f"(x{load.wall / self.ref_wall:.2f})"),
                 ("supervisor restarts (log)", str(restarts))]
        _, drained_s, state = self.settle()  # until the replacement replica is live
        back = min((r["ts"] for r in self.log_records(wall_kill) if r.get("msg") == "backbone ready"), default=None)
        drained = f"{drained_s:.1f} s" if drained_s is not None else f"NOT drained: {state}"
        rows += [("log warnings/errors meanwhile", self.log_summary(wall0)),
                 ("kill -> replacement replica ready (log) / queues drained after the load",
                  f"{back - wall_kill:.1f} s / {drained}" if back else f"not within the settle wait / {drained}")]
        if drained_s is None:
            self.anomalies += 1
        self.report(f"3. kill -9 one backbone replica (pid {victim}) under load", rows)

    def scenario_overload(self) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = (self.tmp / "overload-gateway.log").open("wb")
        self.gw2 = subprocess.Popen(
            [sys.executable, "-m", "tributary.cli", "gateway", "--model", str(self.model_dir), "--redis-url",
             self.redis_server.url, "--prefix", self.prefix, "--port", str(port), "--max-inflight", "8"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True, preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + 120
            while True:
                if self.gw2.poll() is not None:
                    raise SystemExit(f"the second gateway exited with {self.gw2.returncode}: "
                                     + (self.tmp / "overload-gateway.log").read_text(errors="replace")[-2000:])
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the second gateway was not ready after 120 s")
                time.sleep(0.3)  # polling its readiness probe while it imports
            n = self.args.burst
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=CLIENT_TIMEOUT_S)
            reqs = [self.reqs[i % len(self.reqs)] for i in range(n)]
            refs = [self.ref[i % len(self.ref)] for i in range(n)]
            gate = threading.Barrier(n + 1)

            def one(req):
                try:
                    gate.wait(60)
                except threading.BrokenBarrierError:
                    pass  # some threads did not start within 60 s: send anyway
                return ask(client, self.model, req, self.args.max_tokens)

            with ThreadPoolExecutor(n, thread_name_prefix="burst") as pool:
                futures = [pool.submit(one, r) for r in reqs]
                try:
                    gate.wait(60)
                except threading.BrokenBarrierError:
                    pass
                t0 = time.monotonic()
                wait(futures, timeout=CLIENT_TIMEOUT_S + 60)
                outs = [f.result() if f.done() else Outcome(kind="lost", error="never returned") for f in futures]
                burst_wall = time.monotonic() - t0
            ok = [o for o in outs if o.kind == "ok"]
            over = [o for o in outs if o.status == 503 and o.code == "server_overloaded"]
            other = [o for o in outs if o.kind != "ok" and not (o.status == 503 and o.code == "server_overloaded")]
            l_ok, l_over = sorted(o.latency for o in ok), sorted(o.latency for o in over)
            full = sum(o.kind == "ok" and (o.text, o.finish) == (r.text, r.finish) for o, r in zip(outs, refs))
            spread = max(o.started for o in outs) - min(o.started for o in outs)
            others = f" ({fmt_counter(Counter(o.error for o in other))})" if other else ""
            rows = [("burst", f"{n} concurrent requests against --max-inflight 8 (sent within {spread:.2f} s)"),
                    ("200 / 503 server_overloaded / other", f"{len(ok)} / {len(over)} / {len(other)}{others}"),
                    ("admitted answered in full (= reference)", f"{full}/{len(ok)}")]
            if l_ok and l_over:
                m_over, m_ok = statistics.median(l_over), statistics.median(l_ok)
                rows += [("latency of the 503s median / p99", f"{ms(m_over)} / {ms(pct(l_over, 99))} ms"),
                         ("latency of the 200s median / p99", f"{ms(m_ok)} / {ms(pct(l_ok, 99))} ms"),
                         ("503 / 200 latency (median, p99)", f"{m_over / m_ok:.3f}, "
                                                             f"{pct(l_over, 99) / pct(l_ok, 99):.3f}")]
            values = f" (values {fmt_counter(Counter(o.retry_after for o in over))})" if over else ""
            rows += [("503s with Retry-After", f"{sum(o.retry_after is not None for o in over)}/{len(over)}{values}"),
                     ("burst wall", f"{burst_wall:.1f} s")]
            for o in [o for o in outs if o.kind in ("hung", "lost", "cut")][:3]:
                self.show_request(o, o.kind)
            # The gateway logs "request" once the body is read and parsed: a refusal after it came from the
            # admission check after parsing, not the one on arrival.
            recs = self.log_records(path=self.tmp / "overload-gateway.log")
            parsed = {r.get("request_id") for r in recs if r.get("msg") == "request"}
            late = sum(o.rid in parsed for o in over)
            rows.append(("503s refused only after the body was read and parsed (log)", f"{late}/{len(over)}"))
            rows += self.lone_refusal(url, client)
            self.report("4. overload: a burst against a second gateway with --max-inflight 8", rows)
        finally:
            if self.gw2.poll() is None:
                self.gw2.send_signal(signal.SIGINT)
                try:
                    self.gw2.wait(30)
                except subprocess.TimeoutExpired:
                    self.gw2.kill()
                    self.gw2.wait(10)
            log.close()

    def lone_refusal(self, url: str, client: OpenAI) -> list[tuple[str, str]]:
        """The burst's latencies include 200 client threads sharing 2 cores with the cluster. Here one request at a
        time: the tiny probe on the idle second gateway (200s), then while 8 long streams hold every slot (503s)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1,
                "temperature": 0}

        def lone(k: int, stop_early=lambda: False) -> list[tuple[int, float, httpx.Response]]:
            out = []
            with httpx.Client(timeout=PROBE_TIMEOUT_S) as http:
                for _ in range(k):
                    if stop_early():
                        break
                    t = time.monotonic()
                    r = http.post(f"{url}/v1/chat/completions", json=body)
                    out.append((r.status_code, time.monotonic() - t, r))
                    time.sleep(0.05)
            return out

        idle = [lat for status, lat, _ in lone(10) if status == 200]
        hold_req = {"messages": [{"role": "user", "content": "hold this slot"}], "stream": True}
        with ThreadPoolExecutor(8, thread_name_prefix="hold") as pool:
            holds = [pool.submit(ask, client, self.model, hold_req, 600) for _ in range(8)]
            # Until the gateway counts 8 in flight, or its count stops growing (the holds that were let in).
            deadline, peak, since = time.monotonic() + 30, 0, time.monotonic()
            while time.monotonic() < deadline and peak < 8:
                try:
                    n = httpx.get(f"{url}/ready", timeout=2).json().get("inflight", 0)
                except (httpx.HTTPError, ValueError):
                    n = 0
                if n > peak:
                    peak, since = n, time.monotonic()
                elif peak and time.monotonic() - since > 1.0:
                    break
                time.sleep(0.05)  # polling the gateway's own count of requests in flight
            running = [f for f in holds if not f.done()]
            full = lone(20, stop_early=lambda: any(f.done() for f in running))
            wait(holds, timeout=CLIENT_TIMEOUT_S + 10)
        held = [f.result() for f in holds]
        rows = [("8 long streams sent at once: admitted / refused",
                 (f"{sum(o.kind == 'ok' for o in held)} / {sum(o.status == 503 for o in held)} "
                 f"(peak /ready inflight {peak} of --max-inflight 8)"))]
        refused = [(lat, r) for status, lat, r in full if status == 503]
        if not (idle and refused):
            return rows + [("lone request on a full gateway", (f"not measured: {len(idle)} idle 200s, statuses "
                                                              f"{fmt_counter(Counter(st for st, _, _ in full))}"))]
        med_idle, med_ref = statistics.median(idle), statistics.median(lat for lat, _ in refused)
        codes = Counter(r.json().get("error", {}).get("code") for _, r in refused)
        return rows + [
            ("lone tiny request: 200 on the idle gateway, median", f"{ms(med_idle)} ms ({len(idle)} sent)"),
            ("lone tiny request: 503 while the streams hold it, median / max",
             (f"{ms(med_ref)} / {ms(max(lat for lat, _ in refused))} ms ({len(refused)}/{len(full)} refused, "
             f"{fmt_counter(codes)}; x{med_ref / med_idle:.2f} the idle 200)"))]

    def processes(self) -> dict[int, str]:
        """pid -> role, for every process of the cluster: supervisor, gateway, encoders, backbones, Redis."""
        out = {self.up.pid: "supervisor (tributary up)", self.redis_server.proc.pid: "redis"}
        for pid in self.ours():
            line = cmdline(pid)
            if self.gw2 is not None and pid == self.gw2.pid:
                continue
            for role in ("gateway", "encoder", "backbone"):
                if f"tributary.cli {role}" in line:
                    if role == "encoder":
                        role += ":" + line.split("--modality ", 1)[1].split()[0]
                    out[pid] = role
        return out

    def scenario_soak(self) -> None:
        n, c = self.args.soak, self.args.concurrency
        procs = self.processes()
        before = {pid: rss_mb(pid) for pid in procs}
        # Every other pass over the workload carries fresh images and clips (the encoders work, the tensor cache
        # grows); the other passes, and the text-only requests, are compared with the reference run.
        w, reqs, refs = len(self.reqs), [], []
        for k in range((n + w - 1) // w):
            batch = self.reqs if k % 2 == 0 else workload(w, variant=k)
            reqs += batch
            refs += [r if k % 2 == 0 or not has_media(q) else None for q, r in zip(batch, self.ref)]
        reqs, refs = reqs[:n], refs[:n]
        print(f".. soak: {n} requests, {c} in flight; {refs.count(None)} of them with media no earlier run saw",
              flush=True)
        wall0 = time.time()
        load = Load(self.client, self.model, reqs, c, self.args.max_tokens, total=n)
        self.active = [load]
        mid = None  # RSS once half the requests are answered: growth after it is not warm-up
        while any(t.is_alive() for t in load.threads) and mid is None:
            if load.answered >= n // 2:
                mid = {pid: rss_mb(pid) for pid in procs}
            time.sleep(0.2)  # polling the load's progress
        outs = load.results()
        _, drained_s, state = self.settle()
        time.sleep(2)  # let the last replies be freed before reading RSS
        after = {pid: rss_mb(pid) for pid in procs}
        mid = mid or after
        lost = sum(o.kind in ("hung", "lost", "cut") for o in outs)
        rows = self.outcome_rows(outs, refs)
        rows += [("lost (hung, cut or never returned)", str(lost)),
                 ("wall, requests/s", f"{load.wall:.1f} s, {n / load.wall:.1f}/s (reference run "
                                      f"{len(self.ref) / self.ref_wall:.1f}/s)"),
                 ("queues drained after", f"{drained_s:.1f} s" if drained_s is not None else f"NOT: {state}"),
                 ("log warnings/errors meanwhile", self.log_summary(wall0)),
                 ("RSS (MB): before -> half-way -> after", "after - before (x after/before); after - half-way")]
        tot = [0.0, 0.0, 0.0]
        for pid, role in sorted(procs.items(), key=lambda kv: kv[1]):
            b, m, a = before[pid], mid[pid], after[pid]
            if b is None or m is None or a is None:
                rows.append((f"  {role} (pid {pid})", f"{b} -> {m} -> {a}: the process is gone (restarted?)"))
                continue
            tot = [tot[0] + b, tot[1] + m, tot[2] + a]
            rows.append((f"  {role} (pid {pid})", f"{b:7.1f} -> {m:7.1f} -> {a:7.1f}   {a - b:+7.1f} "
                                                  f"(x{a / b:.3f}); {a - m:+7.1f}"))
        b, m, a = tot
        rows.append(("  all", f"{b:7.1f} -> {m:7.1f} -> {a:7.1f}   {a - b:+7.1f} (x{a / max(b, 1e-9):.3f}); "
                              f"{a - m:+7.1f}  = {(a - m) * 1024 / max(n - n // 2, 1):.1f} kB per request in the "
                              "second half"))
        self.report(f"5. soak: {n} mixed requests, {c} in flight", rows)


# ------------------------------------------------------------------------------------------------------ helpers
def label(p: Probe) -> str:
    return f"{p.status} {p.code}" if p.code else str(p.status)


def chunk_gaps(o: Outcome) -> list[float]:
    return [b - a for a, b in zip(o.chunks, o.chunks[1:])]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def ms(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x * 1e3:.0f}"


def fmt_counter(c: Counter, n: int = 8) -> str:
    return ", ".join(f"{k}: {v}" for k, v in c.most_common(n)) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pause-s", type=float, default=5.0, help="how long Redis is paused (SIGSTOP)")
    p.add_argument("--burst", type=int, default=200, help="concurrent requests against the --max-inflight 8 gateway")
    p.add_argument("--soak", type=int, default=0, help="requests of the soak (0: skip it)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight in the load and the soak")
    p.add_argument("--requests", type=int, default=120, help="requests of the workload (reference and each chaos)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--scenarios", default=None,
                   help=f"comma list of {','.join(SCENARIOS)} (default: all but soak, and soak too when --soak > 0)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with the cluster's logs")
    args = p.parse_args(argv)
    if args.scenarios is None:
        chosen = [s for s in SCENARIOS if s != "soak" or args.soak > 0]
    else:
        chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    if "soak" in chosen and args.soak <= 0:
        p.error("--scenarios soak needs --soak N (N > 0)")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tributary-recovery-"))
    bench = Bench(args, tmp)
    keep, finished = args.keep_logs, False
    try:
        print(f".. starting Redis and the cluster (tiny demo model, {REPLICAS} backbone replicas, prefix "
              f"{bench.prefix}, log {bench.log_path})", flush=True)
        bench.start()
        print(f".. ready after {time.monotonic() - t_start:.0f} s; {os.cpu_count()} cores", flush=True)
        bench.run_reference()
        for name in SCENARIOS:
            if name in chosen:
                bench.settle()
                print(f".. scenario {name}", flush=True)
                getattr(bench, f"scenario_{name}")()
        finished = True
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the cluster", flush=True)
    finally:
        bench.stop()
        keep = keep or bench.anomalies > 0 or not finished
        if keep:
            print(f"\nlogs kept in {tmp}" + (f" ({bench.anomalies} anomalies above)" if bench.anomalies else ""))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal bench time {time.monotonic() - t_start:.0f} s; figures from one run on a shared machine: "
          "compare ratios, not absolute times")
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
