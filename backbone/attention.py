"""Attention over the paged KV cache: one call per layer for every sequence of a step, prefill chunks and decodes
together, K and V read through the block tables.

Two backends behind one interface (as the encoder runtimes are), picked by the device:

* ``TorchAttention`` (CPUs, and the reference): gathers each sequence's context through its block table into a
  padded batch and runs ONE ``scaled_dot_product_attention`` with a causal + length mask.
* ``TritonAttention`` (CUDA): a Triton kernel in this file (Triton ships with torch; nothing else is installed). One
  program per (tile of ``BLOCK_M`` new tokens of one sequence, query head) walks that sequence's blocks with an
  online softmax (flash-attention style), reading K/V straight from the pool: no gather, no padding to the longest
  context. ``pytest -m gpu`` checks it against ``TorchAttention``; on a CPU the tests run it under Triton's
  interpreter (``TRITON_INTERPRET=1``).

A step is described on the host by its segments (block table, first position, new tokens); :meth:`prepare` turns
that into device tensors once per step, from one small asynchronous host-to-device copy, and every layer reuses
them: positions (for the rotary embedding) and slots (where each new token's K/V go) included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backbone.staging import to_device

log = logging.getLogger(__name__)


@dataclass
class Segment:
    """One sequence's share of a step: ``length`` new tokens at positions start .. start + length - 1, stored in
    the blocks of ``blocks`` (which covers at least start + length positions)."""

    blocks: list[int]
    start: int
    length: int


@dataclass
class StepMeta:
    """What every layer of one step needs, on the device."""

    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64: flat pool slot of each new token's K/V
    extra: dict  # the backend's own tensors and sizes


class TorchAttention:
    """Reference backend: one SDPA over the step's sequences padded to (longest chunk, longest context)."""

    name = "torch-sdpa"

    def prepare(self, segments: list[Segment], block_size: int, device: torch.device) -> StepMeta:
        base = _base(segments, block_size, device)
        b, t = len(segments), base["t"]
        q_max, ctx_max = max(s.length for s in segments), max(s.start + s.length for s in segments)
        starts, lengths, offsets, tables, seg_of = (base[k] for k in ("starts", "lengths", "offsets", "tables",
                                                                      "seg_of"))
        qi = torch.arange(q_max, device=device)
        valid_q = qi[None, :] < lengths[:, None]  # [B, Qmax]
        q_index = torch.where(valid_q, offsets[:, None] + qi[None, :], t)  # T: the zero row padding reads
        kpos = torch.arange(ctx_max, device=device)
        ctx_slots = tables[:, kpos // block_size] * block_size + kpos % block_size  # [B, Lmax]
        # Past a sequence's own end (up to the step's longest context) its row would read the padding columns of
        # its table (block 0: another sequence's) and the stale slots of its last block (a former owner's). They are
        # masked, but a masked V still multiplies: 0 x NaN is NaN, so one request's non-finite K/V (a float16
        # overflow) failed the others in its step, and later ones reusing its blocks (an outside auditor's). They
        # read the sequence's own first slot instead, written by itself.
        ctx_slots = torch.where(kpos[None, :] < (starts + lengths)[:, None], ctx_slots, ctx_slots[:, :1])
        qpos = starts[:, None] + qi[None, :]  # [B, Qmax]
        # A padding row (beyond its chunk) still sees position 0, so no row is all -inf (SDPA would give NaN).
        mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < (starts + lengths)[:, None, None])
        j = torch.arange(t, device=device) - offsets[seg_of]
        out_index = seg_of * q_max + j  # each new token's row in the flattened [B * Qmax] output
        return StepMeta(base["positions"], base["slots"], {
            "b": b, "q_max": q_max, "q_index": q_index.reshape(-1), "ctx_slots": ctx_slots,
            "mask": mask[:, None], "out_index": out_index})

    def __call__(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: StepMeta,
                 scale: float) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D], attending to the pool's K/V (the step's own already written)."""
        x = meta.extra
        b, q_max = x["b"], x["q_max"]
        t, hq, d = q.shape
        qp = torch.cat([q, q.new_zeros(1, hq, d)])[x["q_index"]].view(b, q_max, hq, d).transpose(1, 2)
        k = k_flat[x["ctx_slots"]].transpose(1, 2)  # [B, Hkv, Lmax, D]
        v = v_flat[x["ctx_slots"]].transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=x["mask"], scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * q_max, hq, d)[x["out_index"]]


def _base(segments: list[Segment], block_size: int, device: torch.device) -> dict:
    """The per-step tensors both backends share, from one host-to-device copy of the segments' description."""
    b = len(segments)
    width = max(max(len(s.blocks) for s in segments), 1)
    lengths = [s.length for s in segments]
    offsets, t = [], 0
    for n in lengths:
        offsets.append(t)
        t += n
    host = [s.start for s in segments] + lengths + offsets
    for s in segments:
        host += s.blocks + [0] * (width - len(s.blocks))
    staged = to_device(host, torch.long, device)
    starts, lengths_d, offsets_d = staged[:b], staged[b : 2 * b], staged[2 * b : 3 * b]
    tables = staged[3 * b :].view(b, width)
    seg_of = torch.repeat_interleave(torch.arange(b, device=device), lengths_d, output_size=t)  # [T]
    positions = starts[seg_of] + torch.arange(t, device=device) - offsets_d[seg_of]
    slots = tables[seg_of, positions // block_size] * block_size + positions % block_size
    return {"t": t, "starts": starts, "lengths": lengths_d, "offsets": offsets_d, "tables": tables,
            "seg_of": seg_of, "positions": positions, "slots": slots}


# ---- Triton ------------------------------------------------------------------------------------------------------

_KERNEL = None


def _kernel():
    """The Triton kernel, compiled on first use (importing Triton is not free, and CPUs never need it)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    # The integer inputs' pointers and the table's row stride (the step's widest block table) change from step to
    # step: left to Triton, each new divisibility-by-16 or 16-byte alignment would compile a new variant, hundreds
    # of milliseconds in the middle of serving (a stream stalls for it).
    #
    # ``GROUPED`` (a decode-only step: one new token per sequence): one program per (sequence, KV head) holds the
    # query heads that share that KV head as its tile's rows, so each KV block is read once per KV head, not once
    # per query head (4x less K/V traffic for Llama-3-style GQA with 32 query over 8 KV heads), and a 16-row tile
    # carries GROUP rows of work instead of 1. Otherwise one program per (tile of BLOCK_M new tokens, query head).
    @triton.jit(do_not_specialize=["stride_tb"],
                do_not_specialize_on_alignment=["tables_ptr", "starts_ptr", "lengths_ptr", "offsets_ptr",
                                                "tile_seg_ptr", "tile_off_ptr"])
    def paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, starts_ptr, lengths_ptr, offsets_ptr,
                        tile_seg_ptr, tile_off_ptr, scale, stride_qt, stride_qh, stride_ks, stride_kh, stride_ot,
                        stride_oh, stride_tb, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                        GROUPED: tl.constexpr):
        tile, pid_head = tl.program_id(0), tl.program_id(1)
        seg = tl.load(tile_seg_ptr + tile)
        start = tl.load(starts_ptr + seg)
        qbase = tl.load(offsets_ptr + seg)
        i = tl.arange(0, BLOCK_M)
        if GROUPED:  # rows: the group's query heads, all at the sequence's one new token
            kv_head = pid_head
            heads = kv_head * GROUP + i
            row_ok = i < GROUP
            qrows = qbase + i * 0
            qpos = start + i * 0
            end = start + 1
        else:  # rows: the tile's new tokens, all of one query head
            off = tl.load(tile_off_ptr + tile)
            length = tl.load(lengths_ptr + seg)
            kv_head = pid_head // GROUP
            heads = pid_head + i * 0
            row_ok = off + i < length
            qrows = qbase + off + i
            qpos = start + off + i
            end = start + tl.minimum(off + BLOCK_M, length)  # one past the tile's last position: keys < end
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + qrows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for j in range(0, tl.cdiv(end, BLOCK_N)):
            block = tl.load(tables_ptr + seg * stride_tb + j)
            kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
            slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_off = slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # Slots past the sequence's end (its last block's stale ones, a former owner's) read as 0: their weight
            # is 0, but 0 x NaN is NaN (one request's non-finite K/V failed the later owners of its blocks).
            v = tl.load(v_ptr + kv_off, mask=(kpos < end)[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + qrows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    _KERNEL = paged_attention
    return _KERNEL


class TritonAttention:
    """CUDA backend: the paged kernel above; a step that only decodes runs it ``GROUPED`` (one program per sequence
    and KV head, its query heads together; ``grouped`` False: per query head), any other tiles of 16 new tokens when
    its chunks are short, of 64 when it prefills."""

    name = "triton-paged"

    def __init__(self, grouped: bool = True):
        self.grouped = grouped

    def prepare(self, segments: list[Segment], block_size: int, device: torch.device) -> StepMeta:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"the Triton kernel needs a power-of-two block size >= 16, got {block_size}")
        base = _base(segments, block_size, device)
        block_m = 16 if max(s.length for s in segments) <= 16 else 64
        tile_seg, tile_off = [], []
        for i, s in enumerate(segments):
            for off in range(0, s.length, block_m):
                tile_seg.append(i)
                tile_off.append(off)
        tiles = to_device(tile_seg + tile_off, torch.long, device)
        n = len(tile_seg)
        return StepMeta(base["positions"], base["slots"], {
            "tables": base["tables"], "starts": base["starts"], "lengths": base["lengths"],
            "offsets": base["offsets"], "tile_seg": tiles[:n], "tile_off": tiles[n:], "block_m": block_m,
            "block_size": block_size, "decode": all(s.length == 1 for s in segments)})

    def __call__(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: StepMeta,
                 scale: float) -> torch.Tensor:
        x = meta.extra
        q = q.contiguous()
        t, hq, d = q.shape
        hkv = k_flat.shape[1]
        out = torch.empty_like(q)
        tables = x["tables"]
        grouped = self.grouped and x.get("decode")  # one tile per sequence, one program per KV head
        _kernel()[(x["tile_seg"].shape[0], hkv if grouped else hq)](
            q, k_flat, v_flat, out, tables, x["starts"], x["lengths"], x["offsets"], x["tile_seg"], x["tile_off"],
            scale, q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), out.stride(0), out.stride(1),
            tables.stride(0), GROUP=hq // hkv,
            BLOCK_M=max(16, 1 << (hq // hkv - 1).bit_length()) if grouped else x["block_m"],
            BLOCK_N=x["block_size"], HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", GROUPED=bool(grouped))
        return out


class LoopAttention:
    """What [paged-attention] replaced, kept to measure against (``--attention loop``): one SDPA call per sequence
    per layer over that sequence's context, gathered through its block table."""

    name = "per-sequence-loop"

    def prepare(self, segments: list[Segment], block_size: int, device: torch.device) -> StepMeta:
        base = _base(segments, block_size, device)
        slots = [[s.blocks[p // block_size] * block_size + p % block_size for p in range(s.start + s.length)]
                 for s in segments]
        flat = to_device([x for row in slots for x in row], torch.long, device)
        bounds, at = [], 0
        for row in slots:
            bounds.append((at, at + len(row)))
            at += len(row)
        return StepMeta(base["positions"], base["slots"], {"segments": segments, "ctx": flat, "bounds": bounds})

    def __call__(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: StepMeta,
                 scale: float) -> torch.Tensor:
        out, offset = [], 0
        for s, (a, b) in zip(meta.extra["segments"], meta.extra["bounds"]):
            ctx = meta.extra["ctx"][a:b]
            qs = q[offset : offset + s.length].transpose(0, 1)  # [Hq, n, D]
            mask = None
            if s.length > 1:
                mask = (torch.arange(b - a, device=q.device)[None, :]
                        <= torch.arange(s.start, s.start + s.length, device=q.device)[:, None])
            o = F.scaled_dot_product_attention(qs, k_flat[ctx].transpose(0, 1), v_flat[ctx].transpose(0, 1),
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            out.append(o.transpose(0, 1))
            offset += s.length
        return torch.cat(out)


BACKENDS = ("auto", "torch", "triton", "loop")


SELF_CHECK_TOL = 3e-2  # bf16 keeps 8 bits of mantissa; a wrong kernel is off by O(1)


def self_check(backend, device: torch.device, dtype: torch.dtype) -> float:
    """Run ``backend`` on ``device`` on two small steps, a mixed one (a decode, a chunk mid-prompt, a whole prompt;
    GQA; shuffled blocks) and a decode-only one (the Triton kernel's two tile sizes, so both are compiled at
    start-up, not by a request), and return the largest deviation from the torch backend in fp32 (raises if it
    cannot run)."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 4, 2, 64, 16
    k, v = (torch.randn(8 * bs, hkv, d, generator=g) for _ in range(2))
    cpu, err = torch.device("cpu"), 0.0
    for segments in ([Segment([5, 2], 20, 1), Segment([7, 0, 3], 16, 20), Segment([1, 6], 0, 17)],
                     [Segment([5, 2], 20, 1), Segment([4], 3, 1)]):
        q = torch.randn(sum(s.length for s in segments), hq, d, generator=g)
        ref = TorchAttention()(q, k, v, TorchAttention().prepare(segments, bs, cpu), d ** -0.5)
        got = backend(*(t.to(device, dtype) for t in (q, k, v)), backend.prepare(segments, bs, device), d ** -0.5)
        err = max(err, float((got.float().cpu() - ref).abs().max()))
    return err


def backend_for(device: torch.device, name: str = "auto", dtype: torch.dtype = torch.float32):
    """``auto``: Triton on CUDA (once it passed :func:`self_check` on this device, else torch's SDPA, with an
    error in the log), torch's SDPA elsewhere; ``torch``, ``triton`` or ``loop`` (the per-sequence loop, for
    comparison) to force one."""
    if name == "auto" and device.type == "cuda":
        for grouped in (True, False):  # the grouped decode failing alone leaves the per-head one
            try:
                err = self_check(TritonAttention(grouped), device, dtype)
                if err <= SELF_CHECK_TOL:
                    return TritonAttention(grouped)
                why = f"it deviates from the reference by {err:.3g}"
            except Exception as exc:  # a Triton or driver that cannot build the kernel
                why = f"{type(exc).__name__}: {exc}"
            log.error("the Triton attention kernel failed its self-check" + (
                "; decoding with the general kernel" if grouped else "; using torch SDPA"),
                extra={"error": why, "decode_kernel": grouped})
        return TorchAttention()
    if name == "auto":
        name = "torch"
    if name == "triton":
        return TritonAttention()
    if name == "torch":
        return TorchAttention()
    if name == "loop":
        return LoopAttention()
    raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
