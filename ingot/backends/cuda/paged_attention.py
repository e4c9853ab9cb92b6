"""Decode attention over a paged KV cache: one new query per sequence, keys and values read through the
sequence's block table.

Cache layout per layer: k_cache, v_cache [n_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks]
(row b's position p is in block block_tables[b, p // block_size], row p % block_size); seq_lens [B] counts
the positions of each sequence, its query being the last. One program per (sequence, KV head) walks the
sequence one block at a time with an online softmax, all the KV head's query heads (GQA) together, so each
key and value is read once. Key p is visible iff p < seq_len and, with a window, seq_len - 1 - p < window.

This is the first, unsplit form: a long sequence is one program's work. The contiguous cache's decode
kernel (attention.py) splits sequences across programs for batch-1 speed; the paged one will do the same
once the CUDA backend runs its batched steps over blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# stride_tb is the widest block table of the step: it grows with the sequences, and a specialization on its
# value (1, a multiple of 16) would recompile the kernel mid-stream, seconds of one request's latency.
@triton.jit(do_not_specialize=["window", "stride_tb"])
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_tb, stride_ob, stride_oh, scale_log2, window,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(lens_ptr + b)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    heads = h * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None],
                other=0.0).to(tl.float32)
    lo = 0
    if window > 0:
        lo = tl.maximum(n - window, 0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    # every block in [lo // BS, cdiv(n, BS)) holds at least one visible key, so the running max stays finite
    for j in range(lo // BS, tl.cdiv(n, BS)):
        blk = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        p = j * BS + t
        visible = (p < n) & (p >= lo)
        k = tl.load(k_ptr + blk * stride_kb + t[:, None] * stride_kt + h * stride_kh + d[None, :],
                    mask=visible[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale_log2
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        e = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        v = tl.load(v_ptr + blk * stride_vb + t[:, None] * stride_vt + h * stride_vh + d[None, :],
                    mask=visible[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(e[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g < G)[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float, window: int = 0,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] (the query at position seq_lens[b] - 1 of each sequence) -> attention output [B, Hq, D]."""
    B, hq, D = q.shape
    _, bs, hkv, dk = k_cache.shape
    if dk != D or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if D & (D - 1) or bs & (bs - 1):
        raise ValueError(f"head_dim ({D}) and block_size ({bs}) must be powers of two")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    g = hq // hkv
    out = torch.empty_like(q) if out is None else out
    _paged_decode_kernel[(B, hkv)](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), scale * LOG2E, window, G=g, GP=max(triton.next_power_of_2(g), 1), D=D, BS=bs)
    return out
