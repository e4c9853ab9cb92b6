"""Decode attention over a paged KV cache: one new query per sequence, keys and values read through the
sequence's block table.

Cache layout per layer: k_cache, v_cache [n_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks]
(row b's position p is in block block_tables[b, p // block_size], row p % block_size); seq_lens [B] counts
the positions of each sequence, its query being the last. Programs per (sequence, KV head, part) walk one
part of the sequence's blocks, one block at a time with an online softmax, all the KV head's query heads
(GQA) together, so each key and value is read once. Key p is visible iff p < seq_len and, with a window,
seq_len - 1 - p < window.

A sequence is split into parts (flash-decoding) when sequences x KV heads alone are too few programs to
keep the GPU's memory system busy: one stream of Llama-3.2-1B is 8 programs, each walking its whole
sequence. Each part leaves its running max, sum and unnormalized output in a workspace, and a second
kernel merges the parts in part order (deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# stride_tb is the widest block table of the step and parts follows it (parts_for): both grow with the
# sequences, and a specialization on their values (1, a multiple of 16) or a constexpr would recompile the
# kernel mid-stream, seconds of one request's latency. SPLIT (parts > 1) is the only compile-time choice.
@triton.jit(do_not_specialize=["window", "stride_tb", "parts"])
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, ws_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_tb, stride_ob, stride_oh, scale_log2, window, parts,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         SPLIT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)
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
    # Every block in [lo // BS, cdiv(n, BS)) holds at least one visible key, so the running max of a part
    # with blocks stays finite; the blocks are shared out in runs of `per`, the last parts possibly empty.
    j_lo, j_hi = lo // BS, tl.cdiv(n, BS)
    per = tl.cdiv(j_hi - j_lo, parts)
    j_end = tl.minimum(j_lo + (part + 1) * per, j_hi)
    for j in range(j_lo + part * per, j_end):
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
    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])
    else:
        # workspace [B, Hq, parts, D + 2]: the part's unnormalized output, then its max and its sum
        row = ws_ptr + ((b * tl.num_programs(1) * G + heads) * parts + part).to(tl.int64)[:, None] * (D + 2)
        tl.store(row + d[None, :], acc, mask=(g < G)[:, None])
        tl.store(row + D + tl.arange(0, 2)[None, :],
                 tl.where(tl.arange(0, 2)[None, :] == 0, m_i[:, None], l_i[:, None]), mask=(g < G)[:, None])


@triton.jit(do_not_specialize=["parts"])
def _paged_merge_kernel(ws_ptr, out_ptr, stride_ob, stride_oh, n_heads, parts,
                        D: tl.constexpr, PP: tl.constexpr):
    """out[b, head] from the head's `parts` partial results (PP >= parts: one compile for every count):
    rescaled to their common max, summed in part order. An empty part (max -inf, sum 0) weighs 0."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, PP)
    d = tl.arange(0, D)
    base = ws_ptr + ((b * n_heads + head) * parts).to(tl.int64) * (D + 2)
    p_ok = p < parts
    m = tl.load(base + p * (D + 2) + D, mask=p_ok, other=float("-inf"))
    l = tl.load(base + p * (D + 2) + D + 1, mask=p_ok, other=0.0)
    acc = tl.load(base + p[:, None] * (D + 2) + d[None, :], mask=p_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_all), 0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float, window: int = 0,
                           out: torch.Tensor | None = None, parts: int | None = None) -> torch.Tensor:
    """q [B, Hq, D] (the query at position seq_lens[b] - 1 of each sequence) -> attention output [B, Hq, D].
    parts: how many parts each sequence is split into (default: parts_for the shapes)."""
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
    parts = parts or parts_for(B * hkv, block_tables.shape[1])
    # a captured step allocates its workspace once, from the graph's pool; unsplit, the kernel reads none
    ws = torch.empty(B * hq * parts * (D + 2), device=q.device, dtype=torch.float32) if parts > 1 else out
    _paged_decode_kernel[(B, hkv, parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, ws,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), scale * LOG2E, window, parts, G=g, GP=max(triton.next_power_of_2(g), 1), D=D, BS=bs,
        SPLIT=parts > 1)
    if parts > 1:
        _paged_merge_kernel[(B, hq)](ws, out, out.stride(0), out.stride(1), hq, parts, D=D,
                                     PP=triton.next_power_of_2(max(parts, MAX_PARTS)))
    return out


TARGET_PROGRAMS = 264  # two per SM of an H100/H200
MIN_BLOCKS_PER_PART = 4
# INGOT_PAGED_PARTS=1 keeps every sequence in one program (the unsplit kernel), for an A/B
MAX_PARTS = int(os.environ.get("INGOT_PAGED_PARTS", "16"))


def parts_for(programs: int, table_blocks: int) -> int:
    """Parts per sequence for `programs` (sequence, KV head) pairs over tables of `table_blocks` blocks:
    enough for about TARGET_PROGRAMS programs, none shorter than MIN_BLOCKS_PER_PART blocks. A function of
    the shapes only, so a captured step keeps its split."""
    want = triton.cdiv(TARGET_PROGRAMS, max(programs, 1))
    return max(1, min(want, table_blocks // MIN_BLOCKS_PER_PART, MAX_PARTS))
