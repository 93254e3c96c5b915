"""A capacity model of a Tributary deployment (``tributary plan --workload FILE --rates FILE``).

From a **workload** (requests/s, the share carrying an image or audio, image tensor rows, audio seconds, prompt and
output tokens, the share of media already cached) and **service rates** measured on the target devices
(``bench/capacity.py`` writes them: encoder seconds per item, backbone prefill tokens/s and decode step
times, Redis MB/s), it gives for each tier the work offered (busy replicas, ``a = lambda * D``), the replicas that
keep utilization at or under a target, the queueing delay at that size, the Redis traffic and memory, the predicted
mean time to first token, and the bottleneck: what saturates first as the load grows.

The model, stated so its errors can be judged:

* Encoders: each replica is one server with a service time ``D`` per item (measured at the batch sizes the load
  gives); arrivals are Poisson, so a tier of ``c`` replicas is M/M/c and its mean wait is Erlang C's. Only cache
  misses reach the encoders; a hit costs one Redis read.
* Backbone: continuous batching shares a replica between its sequences (processor sharing), so a request's prefill
  is slowed by ``1 / (1 - rho)``; its busy time per request is its prompt over the prefill rate plus its output
  tokens times the step time at the batch the load keeps running, divided by that batch.
* Redis: per image or audio miss, the media bytes written and read once and the tensor written once; per part of
  every request, the tensor read once by the backbone; plus small stream entries. Memory: the distinct tensors
  written within their TTL (an upper bound: repeats do not add).
* TTFT: the gateway's time, plus for a request with media its parts' waits and encodes (misses only; an image and
  an audio part encode in parallel, the model adds them: an upper bound), plus the prefill slowed by sharing.
* Replicas: the smallest count with utilization <= ``target_utilization``. ``autoscaler_replicas`` is where
  ``tributary up --autoscale``'s policy (router/autoscale.py: queued + in flight over ``target_ongoing``) would
  settle for the same load, by Little's law on the M/M/c numbers.

Pure: no Redis, no clock; tests/unit/test_capacity.py checks it against closed forms.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MB = 1e6


class CapacityError(ValueError):
    pass


@dataclass(frozen=True)
class Workload:
    requests_per_s: float
    image_share: float = 0.0  # share of requests carrying one image
    audio_share: float = 0.0  # share of requests carrying one audio clip
    repeat_share: float = 0.0  # share of media parts already cached (a chat about the same pictures)
    prompt_tokens: int = 100  # text tokens per request (media rows come on top)
    output_tokens: int = 128
    image_rows: int = 576  # tensor rows per image (LLaVA-1.5: 576)
    audio_seconds: float = 10.0
    audio_rows_per_s: float = 25.0  # tensor rows per second of audio (Qwen2-Audio: 25)
    hidden_size: int = 4096  # the backbone's hidden size: a tensor row's width
    wire_bytes: int = 2  # bytes per value on the wire (bf16: 2, fp32: 4)
    image_bytes: int = 200_000  # the media as sent (a JPEG)
    audio_bytes_per_s: int = 32_000  # 16 kHz 16-bit WAV
    tensor_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.requests_per_s < 0:
            raise CapacityError("requests_per_s must be >= 0")
        for name in ("image_share", "audio_share", "repeat_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise CapacityError(f"{name} must be within [0, 1]")


@dataclass(frozen=True)
class Rates:
    image_s_per_item: float  # one image encoder replica's busy seconds per image
    audio_s_per_item: float  # one audio encoder replica's busy seconds per clip of the workload's length
    prefill_tokens_per_s: float  # one backbone replica, prompt tokens (text and media rows)
    decode_step_s: dict[int, float]  # running sequences -> seconds per decode step (one token each)
    max_running: int = 16  # the backbone's --max-running
    redis_write_MBps: float = 1000.0
    redis_read_MBps: float = 1000.0
    gateway_s: float = 0.0  # the gateway's own time per request (parsing, tokenizing, Redis round trips)
    machine: str = ""

    def step_s(self, running: float) -> float:
        """Decode step time at ``running`` sequences, linear between the measured points (flat past the ends)."""
        points = sorted((int(k), v) for k, v in self.decode_step_s.items())
        if not points:
            raise CapacityError("rates: decode_step_s needs at least one measurement")
        if running <= points[0][0]:
            return points[0][1]
        for (n0, s0), (n1, s1) in zip(points, points[1:]):
            if running <= n1:
                return s0 + (s1 - s0) * (running - n0) / (n1 - n0)
        return points[-1][1]


@dataclass
class Tier:
    name: str
    arrivals_per_s: float  # items (or requests) reaching the tier
    service_s: float  # busy seconds of one replica per item
    replicas: int
    utilization: float
    wait_s: float  # mean queueing delay at ``replicas``
    autoscaler_replicas: int
    offered: float = 0.0  # lambda * D: replicas kept busy


@dataclass
class CapacityPlan:
    tiers: list[Tier]
    redis_write_MBps: float
    redis_read_MBps: float
    redis_memory_MB: float
    redis_primaries: int  # for the traffic, at the target utilization of one primary's measured rate
    ttft_s: float  # predicted mean time to first token
    bottleneck: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def erlang_c_wait(arrivals: float, service_s: float, servers: int) -> float:
    """Mean wait in queue of M/M/c (inf when the load reaches the servers)."""
    if arrivals <= 0 or service_s <= 0:
        return 0.0
    a = arrivals * service_s  # offered load
    if a >= servers:
        return math.inf
    term, total = 1.0, 1.0  # a^k / k!, summed for k < c
    for k in range(1, servers):
        term *= a / k
        total += term
    last = term * a / servers / (1 - a / servers)  # a^c / c! / (1 - rho)
    p_wait = last / (total + last)
    return p_wait * service_s / (servers - a)


def replicas_for(offered: float, target: float) -> int:
    return max(1, math.ceil(offered / target - 1e-9))


def autoscaler_replicas(arrivals: float, service_s: float, target_ongoing: float, cap: int = 64) -> int:
    """Where router/autoscale.py's *load* rule settles: the fewest replicas ``c`` whose queued + in-flight count
    (Little's law, M/M/c) over ``target_ongoing`` asks for no more than ``c``."""
    for c in range(1, cap + 1):
        wait = erlang_c_wait(arrivals, service_s, c)
        if math.isinf(wait):
            continue
        in_system = arrivals * (wait + service_s)
        if math.ceil(in_system / target_ongoing - 1e-9) <= c:
            return c
    return cap


def plan_capacity(w: Workload, r: Rates, target_utilization: float = 0.7, target_ongoing: float = 8.0,
                  replicas: dict[str, int] | None = None) -> CapacityPlan:
    """``replicas``: evaluate these counts (tier name -> replicas) instead of sizing those tiers (what a deployment
    that exists will see)."""
    fixed = replicas or {}
    if not 0 < target_utilization < 1:
        raise CapacityError("target_utilization must be within (0, 1)")
    lam = w.requests_per_s
    miss = 1 - w.repeat_share
    image_misses, audio_misses = lam * w.image_share * miss, lam * w.audio_share * miss
    tiers = []
    for name, arrivals, service in (("encoder:image", image_misses, r.image_s_per_item),
                                    ("encoder:audio", audio_misses, r.audio_s_per_item)):
        if service <= 0 and arrivals > 0:
            raise CapacityError(f"rates: no service time for {name}")
        offered = arrivals * service
        c = fixed.get(name) or replicas_for(offered, target_utilization)
        tiers.append(Tier(name, arrivals, service, c, offered / c, erlang_c_wait(arrivals, service, c),
                          autoscaler_replicas(arrivals, service, target_ongoing), offered))
    # Backbone: prompt rows of every request (text + media), prefilled; output tokens decoded at the batch the load
    # keeps running (Little: arrivals x time decoding, at most max_running per replica).
    image_rows = w.image_rows
    audio_rows = w.audio_seconds * w.audio_rows_per_s
    prompt = w.prompt_tokens + w.image_share * image_rows + w.audio_share * audio_rows
    prefill_s = prompt / r.prefill_tokens_per_s
    running = 1.0
    for _ in range(50):  # fixed point: the batch sets the step time, the step time sets how many run at once
        decode_s = w.output_tokens * r.step_s(running)
        running = min(r.max_running, max(1.0, lam * decode_s))
    step = r.step_s(running)
    busy = prefill_s + w.output_tokens * step / running  # one replica's busy seconds per request
    offered = lam * busy
    c = fixed.get("backbone") or replicas_for(offered, target_utilization)
    rho = offered / c
    backbone_slowdown = 1 / (1 - rho) if rho < 1 else math.inf
    tiers.append(Tier("backbone", lam, busy, c, rho, prefill_s * (backbone_slowdown - 1),
                      autoscaler_replicas(lam, busy, 16.0), offered))
    # Redis: bytes per second each way.
    image_tensor = image_rows * w.hidden_size * w.wire_bytes
    audio_tensor = audio_rows * w.hidden_size * w.wire_bytes
    audio_media = w.audio_seconds * w.audio_bytes_per_s
    write = image_misses * (w.image_bytes + image_tensor) + audio_misses * (audio_media + audio_tensor)
    read = (image_misses * w.image_bytes + audio_misses * audio_media
            + lam * (w.image_share * image_tensor + w.audio_share * audio_tensor))
    memory = (image_misses * image_tensor + audio_misses * audio_tensor) * w.tensor_ttl_s
    write_MBps, read_MBps = write / MB, read / MB
    redis_util = write_MBps / r.redis_write_MBps + read_MBps / r.redis_read_MBps
    primaries = replicas_for(redis_util, target_utilization)
    # TTFT: the gateway, the slower encoder part (a miss waits and is encoded; a hit is read), then the prefill.
    enc = {t.name: t for t in tiers}
    media_s = 0.0
    for name, share in (("encoder:image", w.image_share), ("encoder:audio", w.audio_share)):
        t = enc[name]
        media_s += share * miss * (t.wait_s + t.service_s)  # a request carries one part of a modality at most
    ttft = r.gateway_s + media_s + prefill_s * backbone_slowdown
    # Bottleneck: the tier (or Redis) with the least headroom per replica, i.e. the largest utilization at one
    # replica each (what a fixed one-replica-per-tier deployment hits first).
    load = {t.name: t.offered for t in tiers}
    load["redis"] = redis_util
    bottleneck = max(load, key=load.get) if lam > 0 else "none"
    notes = []
    if any(math.isinf(t.wait_s) for t in tiers):
        notes.append("a tier is over capacity at the replicas given")
    if memory / MB > 0:
        notes.append(f"Redis memory is an upper bound: {memory / MB:.0f} MB of tensors written within their TTL "
                     "(maxmemory with volatile-lru evicts the least recently used first)")
    return CapacityPlan(tiers, write_MBps, read_MBps, memory / MB, primaries, ttft, bottleneck, notes)


def load_json(path: Path, cls):
    """A Workload or Rates from a JSON file; unknown fields are refused by name."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CapacityError(f"{path}: {exc}") from None
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CapacityError(f"{path}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise CapacityError(f"{path}: {exc}") from None


def format_capacity(p: CapacityPlan, w: Workload) -> str:
    lines = [f"workload: {w.requests_per_s:g} requests/s ({w.image_share:.0%} with an image, {w.audio_share:.0%} "
             f"with audio, {w.repeat_share:.0%} of media cached), {w.prompt_tokens} prompt + {w.output_tokens} "
             "output tokens", "",
             f"{'tier':15s} {'arrivals/s':>10s} {'busy s/item':>11s} {'offered':>8s} {'replicas':>8s} "
             f"{'util':>5s} {'wait ms':>8s} {'autoscaler':>10s}"]
    for t in p.tiers:
        wait = "inf" if math.isinf(t.wait_s) else f"{t.wait_s * 1e3:.1f}"
        lines.append(f"{t.name:15s} {t.arrivals_per_s:10.2f} {t.service_s:11.4f} {t.offered:8.2f} {t.replicas:8d} "
                     f"{t.utilization:5.2f} {wait:>8s} {t.autoscaler_replicas:10d}")
    lines += ["", f"redis: writes {p.redis_write_MBps:.1f} MB/s, reads {p.redis_read_MBps:.1f} MB/s, cached tensors "
              f"<= {p.redis_memory_MB:.0f} MB; primaries for the traffic: {p.redis_primaries}",
              f"predicted mean TTFT: {p.ttft_s * 1e3:.0f} ms", f"bottleneck: {p.bottleneck}"]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
