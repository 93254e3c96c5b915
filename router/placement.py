"""Capacity-aware uneven pipeline split: which layers each device of a heterogeneous chain should hold.

Why: a pipeline runs at the pace of its slowest stage, so an even split over unequal GPUs leaves the fast ones idle,
and a split by speed alone can overflow a small card. This plans the split from the text config alone (no weights
are read), so it runs before anything is deployed.

Cost model (``dtype`` bytes per element, 1 GiB = 2**30 bytes):

* Stage memory = its layers' weights + its layers' KV + the embedding (first stage) + the final norm and lm_head
  (last stage; with tied embeddings the last stage loads its own copy of the embedding unless it is also the first,
  as ``backbone.loader`` does) + the device's ``reserve_gb`` (activations, CUDA context). It must be <= ``memory_gb``.
* Layer weights: q and o are hidden x heads*head_dim, k and v hidden x kv_heads*head_dim (GQA), with biases where the
  family has them (qkv for qwen2 or attention_bias; o for attention_bias); MLP gate, up, down (hidden x
  intermediate); two RMSNorm vectors.
* Layer KV: 2 (K and V) x kv_heads x head_dim x ``kv_tokens`` (concurrent sequences x their context).
* Stage time per token = FLOPs / (speed x 1e12): 2 FLOPs per matmul weight per layer, plus 2 x vocab x hidden for
  the lm_head on the last stage; the embedding lookup is free. Attention over the context (4 x heads x head_dim per
  cached token, per layer) is the same for every layer and is left out. With ``speed`` in TFLOPS the times read as
  ms per token at full utilisation; with a measured ratio only their ratios mean anything.
* Objective: minimise the slowest stage's time with every stage fitting; among splits with that bottleneck, the one
  with the least total time (one token's latency through the pipe). Both are exact dynamic programs over (devices
  considered, layers placed): O(devices x layers^2).

Devices keep the order given (the i-th stage runs on the i-th device used). A device may be skipped (no layers)
when using it does not help; ``skip=False`` makes every device hold at least one layer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the backbone's --dtype spelling
_DEVICE_KEYS = {"name", "memory_gb", "speed", "reserve_gb"}


class PlacementError(ValueError):
    """Bad input (the message names the field) or a model that cannot fit the devices."""


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    speed: float  # relative throughput: TFLOPS, or a measured ratio
    reserve_gb: float = 0.0
    index: int = 0  # its place in the list given: the N of the cuda:N it runs on (unless its name is a device)

    @property
    def torch_device(self) -> str:
        """The backbone's --device for this device: its name when that is one (cpu, cuda:N), else cuda:<index>."""
        return self.name if re.fullmatch(r"cpu|cuda:\d+", self.name) else f"cuda:{self.index}"


def _number(where: str, value, minimum: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise PlacementError(f"{where}: must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def parse_devices(data) -> list[Device]:
    """Validates a device list (``[{...}]`` or ``{"devices": [...]}``); each error names the bad field."""
    items = data.get("devices") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise PlacementError("devices: must be a non-empty list of {name, memory_gb, speed[, reserve_gb]}")
    out = []
    for i, d in enumerate(items):
        at = f"devices[{i}]"
        if not isinstance(d, dict):
            raise PlacementError(f"{at}: must be an object, got {d!r}")
        if unknown := sorted(set(d) - _DEVICE_KEYS):
            raise PlacementError(f"{at}.{unknown[0]}: unknown field (allowed: {sorted(_DEVICE_KEYS)})")
        for key in ("name", "memory_gb", "speed"):
            if key not in d:
                raise PlacementError(f"{at}.{key}: missing")
        if not isinstance(d["name"], str) or not d["name"].strip():
            raise PlacementError(f"{at}.name: must be a non-empty string, got {d['name']!r}")
        dev = Device(d["name"], _number(f"{at}.memory_gb", d["memory_gb"], 0, True),
                     _number(f"{at}.speed", d["speed"], 0, True),
                     _number(f"{at}.reserve_gb", d.get("reserve_gb", 0.0), 0, False), index=i)
        if dev.reserve_gb >= dev.memory_gb:
            raise PlacementError(f"{at}.reserve_gb: {dev.reserve_gb} leaves nothing of memory_gb {dev.memory_gb}")
        out.append(dev)
    return out


def load_devices(path: str | Path) -> list[Device]:
    """A JSON devices file (YAML is not a dependency)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlacementError(f"devices file {path}: {e}") from None
    return parse_devices(data)


def parse_device_flag(text: str) -> Device:
    """``name:memory_gb:speed[:reserve_gb]``, the flag form of one device (no file needed)."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise PlacementError(f"--device {text!r}: expected name:memory_gb:speed[:reserve_gb]")
    fields = dict(zip(("name", "memory_gb", "speed", "reserve_gb"), parts))
    for key in ("memory_gb", "speed", "reserve_gb"):
        if key in fields:
            try:
                fields[key] = float(fields[key])
            except ValueError:
                raise PlacementError(f"--device {text!r}: {key} must be a number, got {fields[key]!r}") from None
    return parse_devices([fields])[0]


@dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one decoder, from its text config."""

    num_layers: int
    layer_bytes: int  # weights of one layer
    kv_bytes: int  # KV of one layer for kv_tokens
    embed_bytes: int
    head_bytes: int  # lm_head (a separate matrix, or the tied embedding's copy on a later stage)
    norm_bytes: int
    tied: bool
    layer_flops: float  # per token
    head_flops: float

    @classmethod
    def from_text_config(cls, c: dict, dtype: str = "float32", kv_tokens: int = 0) -> ModelCost:
        if dtype not in DTYPE_BYTES:
            raise PlacementError(f"dtype: {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if not isinstance(kv_tokens, int) or kv_tokens < 0:
            raise PlacementError(f"kv_tokens: must be an integer >= 0, got {kv_tokens!r}")
        try:
            h, inter, layers, vocab = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                                       c["vocab_size"])
            heads = c["num_attention_heads"]
        except KeyError as e:
            raise PlacementError(f"text_config.{e.args[0]}: missing") from None
        kv_heads, head_dim = c.get("num_key_value_heads") or heads, c.get("head_dim") or h // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        bias = bool(c.get("attention_bias", False))
        qkv_bias = (q + 2 * kv) if bias or c.get("model_type") == "qwen2" else 0
        matmul = 2 * h * q + 2 * h * kv + 3 * h * inter
        params = matmul + qkv_bias + (h if bias else 0) + 2 * h
        size = DTYPE_BYTES[dtype]
        return cls(layers, params * size, 2 * kv * kv_tokens * size, vocab * h * size, vocab * h * size, h * size,
                   bool(c.get("tie_word_embeddings", False)), 2.0 * matmul, 2.0 * vocab * h)

    def stage_bytes(self, a: int, b: int) -> tuple[int, int]:
        """(weights, KV) of a stage holding layers [a, b), embedding and head included where they belong."""
        weights = (b - a) * self.layer_bytes + (self.embed_bytes if a == 0 else 0)
        if b == self.num_layers:
            weights += self.norm_bytes + (0 if self.tied and a == 0 else self.head_bytes)
        return weights, (b - a) * self.kv_bytes

    def stage_flops(self, a: int, b: int) -> float:
        return (b - a) * self.layer_flops + (self.head_flops if b == self.num_layers else 0.0)


@dataclass(frozen=True)
class Stage:
    device: Device
    layers: tuple[int, int]  # [a, b)
    time_s: float  # per token
    weight_bytes: int
    kv_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + int(self.device.reserve_gb * GIB)

    @property
    def free_bytes(self) -> int:
        return int(self.device.memory_gb * GIB) - self.used_bytes


@dataclass(frozen=True)
class Plan:
    stages: list[Stage]
    skipped: list[Device] = field(default_factory=list)

    @property
    def bottleneck(self) -> Stage:
        return max(self.stages, key=lambda s: s.time_s)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.bottleneck.time_s

    def layer_flags(self, dtype: str = "bfloat16") -> list[str]:
        n, dtype = len(self.stages), DTYPE_NAMES.get(dtype, dtype)
        return [f"tributary backbone --shard {i} --num-shards {n} --layers {s.layers[0]}:{s.layers[1]} "
                f"--device {s.device.torch_device} --dtype {dtype}" for i, s in enumerate(self.stages)]


def _dp(cost: ModelCost, devices: list[Device], skip: bool, stage_time, combine):
    """best[i][j]: the best value placing layers [0, j) on devices [0, i); ``combine(prev, t)`` is a stage's effect
    (None: not allowed). Returns the table and each cell's parent (the previous layer count, or j when skipped)."""
    n, d = cost.num_layers, len(devices)
    best, parent = ([[None] * (n + 1) for _ in range(d + 1)] for _ in range(2))
    best[0][0] = 0.0
    for i in range(1, d + 1):
        for j in range(n + 1):
            if skip and best[i - 1][j] is not None:
                best[i][j], parent[i][j] = best[i - 1][j], j
            for a in range(j):
                t = stage_time(i - 1, a, j) if best[i - 1][a] is not None else None
                value = combine(best[i - 1][a], t) if t is not None else None
                if value is not None and (best[i][j] is None or value < best[i][j]):
                    best[i][j], parent[i][j] = value, a
    return best, parent


def plan(text_config: dict, devices: list[Device], dtype: str = "float32", kv_tokens: int = 0,
         skip: bool = True) -> Plan:
    """The split with the least bottleneck time, then the least total time (see the module docstring)."""
    cost = ModelCost.from_text_config(text_config, dtype, kv_tokens)
    if not devices:
        raise PlacementError("devices: none given")
    if not skip and len(devices) > cost.num_layers:
        raise PlacementError(f"{len(devices)} devices but only {cost.num_layers} layers: allow skipping devices")

    def stage_time(i: int, a: int, b: int) -> float | None:
        dev = devices[i]
        if sum(cost.stage_bytes(a, b)) + dev.reserve_gb * GIB > dev.memory_gb * GIB:
            return None
        return cost.stage_flops(a, b) / (dev.speed * 1e12)

    best, _ = _dp(cost, devices, skip, stage_time, max)
    bound = best[-1][-1]
    if bound is None:
        raise PlacementError(_no_fit(cost, devices, dtype, kv_tokens))
    bound = bound * (1 + 1e-9)
    best, parent = _dp(cost, devices, skip, stage_time, lambda p, t: p + t if t <= bound else None)
    stages, skipped, j = [], [], cost.num_layers
    for i in range(len(devices), 0, -1):
        a = parent[i][j]
        if a == j:
            skipped.insert(0, devices[i - 1])
            continue
        stages.insert(0, Stage(devices[i - 1], (a, j), stage_time(i - 1, a, j), *cost.stage_bytes(a, j)))
        j = a
    return Plan(stages, skipped)


def _no_fit(cost: ModelCost, devices: list[Device], dtype: str, kv_tokens: int) -> str:
    need, have = sum(cost.stage_bytes(0, cost.num_layers)) / GIB, sum(d.memory_gb - d.reserve_gb for d in devices)
    return (f"the model does not fit: {cost.num_layers} layers in {dtype} with KV for {kv_tokens} tokens need "
            f"{need:.2f} GiB (more when split: each layer is whole on one device), the devices offer {have:.2f} "
            f"GiB after reserves; use a smaller dtype, fewer --kv-tokens, or more devices")


def format_plan(p: Plan, dtype: str, kv_tokens: int) -> str:
    """The plan as a table, then the flags each shard's backbone would start with."""
    neck = p.bottleneck
    lines = [(f"{sum(s.layers[1] - s.layers[0] for s in p.stages)} layers, {dtype}, KV for {kv_tokens} tokens: "
              f"bottleneck {neck.device.name} at {neck.time_s * 1e3:.4g} ms/token "
              f"(~{p.tokens_per_s:,.0f} tokens/s through the pipeline)"),
             (f"{'stage':<6}{'device':<14}{'layers':>9}{'n':>5}{'ms/token':>10}{'weights':>10}{'kv':>9}"
              f"{'reserve':>9}{'used':>9}{'free':>9}  (GiB)")]
    for i, s in enumerate(p.stages):
        lines.append(f"{i:<6}{s.device.name[:13]:<14}{f'{s.layers[0]}:{s.layers[1]}':>9}"
                     f"{s.layers[1] - s.layers[0]:>5}{s.time_s * 1e3:>10.4g}{s.weight_bytes / GIB:>10.2f}"
                     f"{s.kv_bytes / GIB:>9.2f}{s.device.reserve_gb:>9.2f}{s.used_bytes / GIB:>9.2f}"
                     f"{s.free_bytes / GIB:>9.2f}" + ("  <- bottleneck" if s is neck else ""))
    skipped = [f"skipped (no gain): {', '.join(d.name for d in p.skipped)}"] if p.skipped else []
    note = ("(each also takes --model and --redis-url, and with several shards one shared --dist-url; cuda:N is the "
            "device's place in the list given, so list one host's GPUs in their CUDA order)")
    return "\n".join(lines + skipped + [""] + p.layer_flags(dtype) + [note])
