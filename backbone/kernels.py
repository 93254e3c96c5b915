"""Elementwise ops of a decoder layer, fused on CUDA ([cuda-graphs]).

Two ops, each with a torch version (CPUs, and the reference) and a Triton version (CUDA, one launch each):

* ``add_rms_norm(x, residual, weight, eps)`` -> (normed, residual + x): the residual add that ends one half of a layer
  and the RMSNorm that starts the next, in one pass over the row. In torch that is four to six kernels, each reading
  and writing the [T, H] activations.
* ``silu_mul(gate, up)`` -> silu(gate) * up: the SiLU-gated MLP's activation, in one pass. ``gate`` and ``up`` may be
  the two halves of the fused ``gate_up`` projection (row-strided views).

The Triton versions round where torch rounds: the sum to the activations' dtype before it is normalized, the
normalized row to the dtype before the weight multiplies it, SiLU to the dtype before the product. They differ from
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

    _KERNELS = (add_rms_norm, silu_mul)
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
    x, r, w, gate_up = (t.to(device, dtype) for t in (x, r, w, gate_up))
    norm, res = ops.add_rms_norm(x, r, w, 1e-6)
    mlp = ops.silu_mul(gate_up[:, :80], gate_up[:, 80:])
    return max(float((got.float().cpu() - ref).abs().max() / max(1.0, float(ref.abs().max())))
               for got, ref in ((norm, ref_norm), (res, ref_res), (mlp, ref_mlp)))


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
    log.error("the fused Triton norm/activation kernels failed their self-check; using torch ops", extra={"error": why})
    return TorchOps()
