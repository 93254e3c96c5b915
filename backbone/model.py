"""The decoder-only language model (Llama / Qwen2 family), written out so that a shard holds exactly its layers
and its own KV cache, and one forward runs a ragged batch: prefill chunks and decode steps of many sequences at once.

Math is the reference's (transformers' Llama/Qwen2: RMSNorm in fp32, rotary in fp32 with the checkpoint's rope
type: "default", or a static scaling (``linear``, ``llama3`` as Llama 3.x ships, ``yarn``) whose frequencies
transformers' own init functions compute, GQA attention with scale head_dim ** -0.5, SiLU-gated MLP), so greedy
outputs match transformers' ``generate`` token for token (fp32; batching changes float summation order only).
Every layer runs once over every new token of the step: the linear layers over the [T, H] rows, attention in one call
over every sequence through the paged KV pool (backbone/attention.py, backbone/kv.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backbone.attention import Segment, StepMeta, backend_for
from backbone.kernels import ops_for, rms_norm
from backbone.kv import BLOCK_SIZE, KVPool
from backbone.sampling import Drawn, fused_race_ok
from models.spec import ModelError

log = logging.getLogger(__name__)

__all__ = ["DecoderConfig", "DecoderShard", "Segment", "rms_norm"]

SUPPORTED = ("llama", "qwen2", "mistral")
# Rope types whose frequencies do not depend on the sequence length ("dynamic" and "longrope" do).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str  # one of ROPE_TYPES
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    source: dict = field(default_factory=dict, compare=False, repr=False)  # the text config (for scaled rope)

    @classmethod
    def from_text_config(cls, c: dict) -> "DecoderConfig":
        model_type = c.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise ModelError(f"language model type {model_type!r} is not supported (supported: {SUPPORTED})")
        # transformers 5 keeps rope in rope_parameters (type + theta); a raw transformers-4 config in rope_scaling.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if c.get("use_sliding_window") or (model_type == "mistral" and c.get("sliding_window")):
            raise ModelError("sliding-window attention is not supported yet")
        if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias"):
            raise ModelError("only SiLU-gated MLPs without bias are supported")
        heads = c["num_attention_heads"]
        bias = bool(c.get("attention_bias", False))
        return cls(
            model_type=model_type, hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab_size=c["vocab_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_type=rope_type,
            max_position=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bias or model_type == "qwen2", o_bias=bias, source=dict(c),
        )


def fuse_layer(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors with q/k/v fused into one ``qkv`` projection (and its bias, where the family has
    them) and gate/up into one ``gate_up``: two matmuls per layer fewer, each reading one larger weight. The parts
    are popped from ``w`` as they are fused (loading never holds every layer twice)."""
    parts = [w.pop(f"self_attn.{p}_proj.weight") for p in "qkv"]
    w["qkv.weight"] = torch.cat(parts)
    biases = [w.pop(f"self_attn.{p}_proj.bias", None) for p in "qkv"]
    if any(b is not None for b in biases):
        w["qkv.bias"] = torch.cat([b if b is not None else parts[i].new_zeros(parts[i].shape[0])
                                   for i, b in enumerate(biases)])
    w["gate_up.weight"] = torch.cat([w.pop("mlp.gate_proj.weight"), w.pop("mlp.up_proj.weight")])
    return w


class Rotary:
    def __init__(self, cfg: DecoderConfig):
        dim = cfg.head_dim
        self.scale = 1.0  # yarn scales cos and sin ("attention factor"); the others leave them
        if cfg.rope_type == "default":
            self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        else:  # transformers' own arithmetic for the scaled types, from the checkpoint's text config
            from transformers import CONFIG_MAPPING
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            hf = CONFIG_MAPPING[cfg.model_type].from_dict({k: v for k, v in cfg.source.items() if k != "model_type"})
            inv_freq, self.scale = ROPE_INIT_FUNCTIONS[cfg.rope_type](hf, torch.device("cpu"))
            self.inv_freq = inv_freq.float()

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim] (computed in fp32, as the reference does)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


class DecoderShard:
    """Layers [first_layer, first_layer + len(layers)) of the model; the embedding if it is the first shard, the
    final norm and lm_head if it is the last; the paged KV pool of its layers once :meth:`allocate_pool` ran."""

    def __init__(self, cfg: DecoderConfig, layers: list[dict[str, torch.Tensor]], first_layer: int,
                 embed: torch.Tensor | None, norm: torch.Tensor | None, lm_head: torch.Tensor | None,
                 attention: str = "auto"):
        self.cfg, self.first_layer = cfg, first_layer
        self.embed_weight, self.norm_weight, self.lm_head_weight = embed, norm, lm_head
        self.rotary = Rotary(cfg)
        some = next(iter(layers[0].values())) if layers else (embed if embed is not None else norm)
        self.dtype, self.device = some.dtype, some.device
        # On a GPU (launch-bound at small batch) fuse q/k/v and gate/up; on a CPU keep the checkpoint's tensors, which
        # stay file-backed pages shared by every process reading the file (a fused copy would be private memory).
        self.layers = [fuse_layer(w) for w in layers] if self.device.type == "cuda" else layers
        self.attention = backend_for(self.device, attention, self.dtype)
        self.ops = ops_for(self.device, self.dtype)  # residual add + RMSNorm, SiLU-and-mul (fused on CUDA)
        if self.device.type == "cuda" and lm_head is not None:
            fused_race_ok(self.device)  # the sampler's fused kernel built and checked now, not on a first request
        self.pool: KVPool | None = None
        self.graphs = None  # backbone/graphs.DecodeGraphs once :meth:`capture_graphs` ran (CUDA only)

    @property
    def is_first(self) -> bool:
        return self.embed_weight is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head_weight is not None

    def block_bytes(self, block_size: int = BLOCK_SIZE) -> int:
        """Bytes one KV block takes across this shard's layers."""
        return KVPool.block_bytes(len(self.layers), block_size, self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype)

    def allocate_pool(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> KVPool:
        self.graphs = None  # captured over the old pool's memory
        self.pool = None  # the old pool's memory goes first
        self.pool = KVPool(len(self.layers), num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim,
                           self.dtype, self.device)
        return self.pool

    def capture_graphs(self, max_batch: int, max_context: int) -> dict | None:
        """CUDA graphs of decode steps up to ``max_batch`` sequences (backbone/graphs.py), when this shard runs on
        a GPU with the Triton attention kernel; returns what the capture took (None: it runs eagerly)."""
        from backbone.attention import TritonAttention
        from backbone.graphs import DecodeGraphs

        if self.device.type != "cuda" or not isinstance(self.attention, TritonAttention):
            return None
        try:
            graphs = DecodeGraphs(self, max_batch, max_context)
            took = graphs.capture()  # includes a replay-vs-eager check
        except Exception as exc:  # a driver or capture fault: serve eagerly rather than not at all
            log.error("CUDA graph capture failed; decode steps run eagerly", extra={"error": f"{type(exc).__name__}: "
                                                                                              f"{exc}"})
            return None
        self.graphs = graphs
        return took

    def decode(self, segments: list[Segment], ids: list[int] | None = None, hidden: torch.Tensor | None = None,
               params: list[tuple[float, float, int, int]] | None = None) -> torch.Tensor | Drawn | None:
        """A decode step through a graph: hidden [B, H], or with ``params`` (every row's sampling parameters, as
        :func:`backbone.sampling.sample_params` takes them) on the last shard its draws from the head's graph too
        (:class:`backbone.sampling.Drawn`, on the device); None when the step cannot replay one (no graphs, a
        prefill chunk, a batch beyond the largest bucket) and must run eagerly."""
        if self.graphs is None or not self.graphs.fits(segments):
            return None
        return self.graphs.run(segments, ids, hidden, params)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_weight)  # [..., H]

    def prepare(self, segments: list[Segment]) -> StepMeta:
        """The step's device-side description (positions, KV slots, the attention backend's tables)."""
        return self.attention.prepare(segments, self.pool.block_size, self.device)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, segments: list[Segment], meta: StepMeta | None = None) -> torch.Tensor:
        """hidden [T, H] (the segments' new tokens, concatenated in order) -> hidden [T, H] after this shard's
        layers. Writes each new token's K/V into the pool at its slot (a rerun of the same segment writes the same
        slots), then attends once per layer over every segment through the block tables."""
        meta = meta if meta is not None else self.prepare(segments)
        cos, sin = self.rotary(meta.positions, hidden.dtype)
        eps, ops = self.cfg.rms_norm_eps, self.ops
        if not self.layers:
            return hidden
        # Each residual add is fused with the RMSNorm after it (the next layer's input norm included).
        h = rms_norm(hidden, self.layers[0]["input_layernorm.weight"], eps)
        for i, w in enumerate(self.layers):
            h, hidden = ops.add_rms_norm(self._attention(i, w, h, meta, cos, sin), hidden,
                                         w["post_attention_layernorm.weight"], eps)
            if "gate_up.weight" in w:
                gate, up = F.linear(h, w["gate_up.weight"]).chunk(2, dim=-1)
            else:
                gate, up = F.linear(h, w["mlp.gate_proj.weight"]), F.linear(h, w["mlp.up_proj.weight"])
            mlp = F.linear(ops.silu_mul(gate, up), w["mlp.down_proj.weight"])
            if i + 1 < len(self.layers):
                h, hidden = ops.add_rms_norm(mlp, hidden, self.layers[i + 1]["input_layernorm.weight"], eps)
            else:
                hidden = hidden + mlp
        return hidden

    def _attention(self, i: int, w: dict, h: torch.Tensor, meta: StepMeta, cos, sin) -> torch.Tensor:
        cfg = self.cfg
        if "qkv.weight" in w:
            q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = F.linear(h, w["qkv.weight"], w.get("qkv.bias")).split([q_width, kv_width, kv_width], dim=-1)
        else:
            q, k, v = (F.linear(h, w[f"self_attn.{p}_proj.weight"], w.get(f"self_attn.{p}_proj.bias")) for p in "qkv")
        t = h.shape[0]
        q = q.view(t, cfg.num_heads, cfg.head_dim)  # [T, Hq, D] (views of the fused projection's rows)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)  # [T, Hkv, D]
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        k_flat, v_flat = self.pool.flat(i)  # [slots, Hkv, D]
        q = self.ops.rope_cache(q, k, v, cos, sin, meta.slots, k_flat, v_flat)  # q, k rotated; k, v into the pool
        o = self.attention(q, k_flat, v_flat, meta, cfg.head_dim ** -0.5)  # [T, Hq, D]
        return F.linear(o.reshape(-1, cfg.num_heads * cfg.head_dim), w["self_attn.o_proj.weight"],
                        w.get("self_attn.o_proj.bias"))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] (one row per sequence) -> logits [B, V] in fp32."""
        h = rms_norm(hidden, self.norm_weight, self.cfg.rms_norm_eps)
        return F.linear(h, self.lm_head_weight).float()
