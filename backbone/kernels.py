"""Elementwise ops of a decoder layer, fused on CUDA ([cuda-graphs]).

Three ops, each with a torch version (CPUs, and the reference) and a Triton version (CUDA, one launch each):

* ``add_rms_norm(x, residual, weight, eps)`` -> (normed, residual + x): the residual add that ends one half of a layer
  and the RMSNorm that starts the next, in one pass over the row. In torch that is four to six kernels, each reading
  and writing the [T, H] activations.
* ``silu_mul(gate, up)`` -> silu(gate) * up: the SiLU-gated MLP's activation, in one pass. ``gate`` and ``up`` may be
  the two halves of the fused ``gate_up`` projection (row-strided views).
* ``rope_cache(q, k, v, cos, sin, slots, k_cache, v_cache)`` -> the rotated q: the rotary embedding of q and k and the
  write of k and v into the paged KV pool at each new token's slot. In torch that is twelve kernels (each rotation
  slices, negates, concatenates, multiplies twice and adds; then two index copies); at batch 1 each is a few
  microseconds of fixed cost on the GPU for almost no bytes, which, per layer, cost more than the layer's reads.
  ``q``, ``k``, ``v`` may be the thirds of the fused ``qkv`` projection (row-strided views).

The Triton versions round where torch rounds: the sum to the activations' dtype before it is normalized, the
normalized row to the dtype before the weight multiplies it, SiLU to the dtype before the product; the rotation
computes in fp32 from the same (rounded) cos and sin and rounds once, where torch rounds each product. They differ from
torch only in reduction order and ``rsqrt``'s last bits. At start-up, like the attention kernel, ``ops_for`` runs
them once against the torch versions and falls back to torch, with an error in the log, if they cannot be built or
deviate. On the CPU the tests run them under Triton's interpreter.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's RMSNorm (Llama / Qwen2): normalized in fp32, cast back, then scaled."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class TorchOps:
    name = "torch"

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return rms_norm(residual, weight, eps), residual

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    @staticmethod
    def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k, v [T, Hkv, D], cos, sin [T, 1, D], slots [T] -> q rotated; k rotated and v written into
        the caches [slots, Hkv, D] at ``slots``."""
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        return q


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_KERNELS = None


def _kernels():
    """The two Triton kernels, compiled on first use."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, n, eps, stride_x, stride_r, stride_o, stride_s,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
        s = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # the residual, rounded as torch's add rounds it
        tl.store(res_ptr + row * stride_s + cols, s, mask=ok)
        f = s.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(f * f, 0) / n + eps)
        h = (f * inv).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask=ok)

    @triton.jit
    def silu_mul(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
        row, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # SiLU, rounded as torch's silu rounds it
        tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)

    # The slots are a view into a step's staged inputs, at an offset that changes with the batch size: alignment
    # is not specialized on (each new one would compile a variant mid-serving).
    @triton.jit(do_not_specialize_on_alignment=["slots_ptr"])
    def rope_cache(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, stride_q,
                   stride_k, stride_v, stride_c, stride_o, stride_cache, HQ: tl.constexpr, HALF: tl.constexpr,
                   BLOCK: tl.constexpr):
        t, h = tl.program_id(0), tl.program_id(1)  # one new token, one query head (h < HQ) or one KV head
        i = tl.arange(0, BLOCK)
        ok = i < HALF
        c = tl.load(cos_ptr + t * stride_c + i, mask=ok, other=0.0).to(tl.float32)  # cos = cat(f, f): one half
        s = tl.load(sin_ptr + t * stride_c + i, mask=ok, other=0.0).to(tl.float32)
        if h < HQ:
            src = q_ptr + t * stride_q + h * 2 * HALF
            dst = q_out_ptr + t * stride_o + h * 2 * HALF
        else:
            j = h - HQ
            slot = tl.load(slots_ptr + t)
            src = k_ptr + t * stride_k + j * 2 * HALF
            dst = k_cache_ptr + slot * stride_cache + j * 2 * HALF
            vdst = v_cache_ptr + slot * stride_cache + j * 2 * HALF
            vsrc = v_ptr + t * stride_v + j * 2 * HALF
            tl.store(vdst + i, tl.load(vsrc + i, mask=ok), mask=ok)
            tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i, mask=ok), mask=ok)
        x1 = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst + i, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF + i, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=ok)

    _KERNELS = (add_rms_norm, silu_mul, rope_cache)
    return _KERNELS


class TritonOps:
    name = "triton"

    @staticmethod
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, H] (rows contiguous) -> normed [T, H], residual + x [T, H]."""
        t, n = x.shape
        if x.stride(1) != 1 or residual.stride(1) != 1:
            x, residual = x.contiguous(), residual.contiguous()
        out, res = torch.empty_like(x), torch.empty_like(x)
        _kernels()[0][(t,)](x, residual, weight, out, res, n, eps, x.stride(0), residual.stride(0), out.stride(0),
                            res.stride(0), BLOCK=max(16, 1 << (n - 1).bit_length()))
        return out, res

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [T, I] (rows contiguous; the halves of ``gate_up`` are fine) -> silu(gate) * up [T, I]."""
        t, n = gate.shape
        if gate.stride(1) != 1 or up.stride(1) != 1:
            gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty((t, n), dtype=gate.dtype, device=gate.device)
        block = 1024
        _kernels()[1][(t, -(-n // block))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                           BLOCK=block)
        return out


    @staticmethod
    def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """As :meth:`TorchOps.rope_cache`, in one launch (heads contiguous in each row of q, k, v)."""
        t, hq, d = q.shape
        hkv = k.shape[1]
        if d % 2 or any(x.stride(2) != 1 or x.stride(1) != d for x in (q, k, v)) or k_cache.stride(1) != d:
            return TorchOps.rope_cache(q, k, v, cos, sin, slots, k_cache, v_cache)
        cos, sin = cos.reshape(t, d), sin.reshape(t, d)
        out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
        if t:
            _kernels()[2][(t, hq + hkv)](q, k, v, cos, sin, slots, out, k_cache, v_cache, q.stride(0), k.stride(0),
                                         v.stride(0), cos.stride(0), out.stride(0), k_cache.stride(0), HQ=hq,
                                         HALF=d // 2, BLOCK=max(16, 1 << (d // 2 - 1).bit_length()))
        return out


OPS_TOL = 2e-2  # bf16 keeps 8 bits of mantissa: a row that rounds one way in torch may round the other here


def ops_check(ops, device: torch.device, dtype: torch.dtype) -> float:
    """``ops`` on small rows on ``device`` against :class:`TorchOps` in fp32: the largest deviation (raises if they
    cannot run)."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 96, generator=g), torch.randn(3, 96, generator=g) * 2
    w = torch.rand(96, generator=g) + 0.5
    gate_up = torch.randn(3, 2 * 80, generator=g) * 3
    ref_norm, ref_res = TorchOps.add_rms_norm(x, r, w, 1e-6)
    ref_mlp = TorchOps.silu_mul(gate_up[:, :80], gate_up[:, 80:])
    # Rotary + KV write: 3 tokens, 4 query heads over 2 KV heads of 64, q/k/v the thirds of one qkv row, 8 slots.
    qkv = torch.randn(3, (4 + 2 + 2) * 64, generator=g)
    angles = torch.rand(3, 1, 32, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.tensor([5, 0, 7])
    caches = [torch.zeros(8, 2, 64) for _ in range(2)]

    def rope(o, qkv, cos, sin, slots, k_cache, v_cache):
        q, k, v = qkv.split([256, 128, 128], dim=-1)
        out = o.rope_cache(q.view(3, 4, 64), k.view(3, 2, 64), v.view(3, 2, 64), cos, sin, slots, k_cache, v_cache)
        return out, k_cache, v_cache

    ref_rope = rope(TorchOps, qkv, cos, sin, slots, *caches)
    x, r, w, gate_up, qkv, cos, sin = (t.to(device, dtype) for t in (x, r, w, gate_up, qkv, cos, sin))
    norm, res = ops.add_rms_norm(x, r, w, 1e-6)
    mlp = ops.silu_mul(gate_up[:, :80], gate_up[:, 80:])
    got_rope = rope(ops, qkv, cos, sin, slots.to(device), *(torch.zeros(8, 2, 64, dtype=dtype, device=device)
                                                           for _ in range(2)))
    return max(float((got.float().cpu() - ref).abs().max() / max(1.0, float(ref.abs().max())))
               for got, ref in ((norm, ref_norm), (res, ref_res), (mlp, ref_mlp), *zip(got_rope, ref_rope)))


def ops_for(device: torch.device, dtype: torch.dtype):
    """The Triton ops on CUDA once they passed :func:`ops_check` there, else the torch ones."""
    if device.type != "cuda":
        return TorchOps()
    try:
        err = ops_check(TritonOps(), device, dtype)
        if err <= OPS_TOL:
            return TritonOps()
        why = f"they deviate from the reference by {err:.3g}"
    except Exception as exc:  # a Triton or driver that cannot build them
        why = f"{type(exc).__name__}: {exc}"
    log.error("the fused Triton norm/activation/rotary kernels failed their self-check; using torch ops",
              extra={"error": why})
    return TorchOps()
