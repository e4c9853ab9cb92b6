"""Attention over the fp16 KV cache: flash-decoding for one new token per sequence, flash-attention for a
prefill chunk. Both handle GQA, causality and a sliding window (key p is visible from query t iff p <= t and,
with a window, t - p < window).

Cache layout per layer: k_cache, v_cache float16 [max_batch, max_ctx, Hkv, D].
Scores are kept in the log2 domain (scale * log2(e) folded in) so the softmax uses exp2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import pdl
from ingot.backends.cuda.rope import _rope_heads

LOG2E = 1.4426950408889634

# H100 defaults, chosen from ptxas register/spill counts for sm_90a (to be confirmed by timing on the H100).
# Decode is bandwidth bound and its nested, data-dependent loops are not software-pipelined, so loads are kept
# in flight by occupancy: the tiles below keep ~32-96 KiB of K/V loads per SM outstanding without spills.
# Groups of one (no tl.dot) hold K/V as fp32 in registers and want smaller tiles.
#   (head_dim, uses tl.dot): (BLOCK_N, num_warps, num_stages)
DECODE_CONFIGS = {
    (64, True): (64, 4, 2), (128, True): (64, 4, 2), (256, True): (32, 4, 2),
    (64, False): (64, 8, 2), (128, False): (32, 4, 2), (256, False): (32, 4, 2),
    # Gemma 4's global heads: D = 512 halves the tile again (ptxas for sm_90a: 216 registers at G = 8, 152 at G = 1,
    # no spills; untimed)
    (512, True): (16, 4, 2), (512, False): (16, 4, 2),
}
# Prefill is tensor-core bound (wgmma): 128-query tiles amortise each K/V tile over many rows with 8 warps
# (two warpgroups) and 3 stages, no spills at D=64 (4 bytes at D=128). D=256's [128, 256] fp32 accumulator
# alone is half the register file: 16-key tiles and 2 stages keep the spill small (~100 bytes).
#   head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages)
# D = 512 (Gemma 4's global heads): 32-query tiles over 8 warps, 214 registers and no spills for sm_90a
# (benchmarks/kernel_regs.py-style ptxas check only; untimed).
PREFILL_CONFIGS = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (128, 16, 8, 2), 512: (32, 16, 8, 2)}

CHUNK = 128  # keys per split: a few K/V tiles, small enough that short rows still spread over many SMs
MAX_PROGRAMS = 64  # decode programs per (row, KV head) at most: bounds the grid and the scratch
TARGET_PROGRAMS = 1024  # enough programs to fill 132 SMs several times over at batch 1


class DecodeScratch(NamedTuple):
    """Partial results of the decode programs, one entry per program: [max_batch, Hq, programs(, D)]."""

    acc: torch.Tensor  # fp32, unnormalised sum of p * v
    m: torch.Tensor  # fp32, max of the (log2-domain) scores
    l: torch.Tensor  # fp32, sum of exp2(score - m)
    chunk: int  # keys per split
    # int32 [max_batch, Hq], zero between launches: per (row, KV head), how many programs have stored their
    # partials in the current launch (the last one merges them and puts the counter back to zero).
    count: torch.Tensor | None = None


class DecodeRope(NamedTuple):
    """Decode attention straight from the QKV projection: q is then the qkv rows [B, (Hq + 2 Hkv) * D], and
    the kernel does what rope.qk_norm_rope_store does for one token per row (per-head q/k RMSNorm when the
    weights are given, half-split RoPE at position seq_len - 1, the fp16 K/V write into the cache), so a decode
    step needs no separate launch for it. kv_in_row and v_norm as in rope.qk_norm_rope_store: with kv_in_row
    0 the rows hold q alone and the kernel writes nothing (the cache given is the layer's KV source's)."""

    inv_freq: torch.Tensor  # float32 [D / 2]
    q_norm: torch.Tensor | None = None  # [D]
    k_norm: torch.Tensor | None = None  # [D]
    eps: float = 1e-6
    kv_in_row: int = 2
    v_norm: bool = False


def decode_scratch(max_batch: int, n_heads: int, head_dim: int, max_ctx: int, device, chunk: int = CHUNK,
                   programs: int = MAX_PROGRAMS) -> DecodeScratch:
    """Buffers for decode_attention, allocated once for every batch size up to max_batch."""
    programs = max(1, min(programs, triton.cdiv(max_ctx, chunk)))
    f32 = dict(device=device, dtype=torch.float32)
    return DecodeScratch(
        torch.empty(max_batch, n_heads, programs, head_dim, **f32),
        torch.empty(max_batch, n_heads, programs, **f32),
        torch.empty(max_batch, n_heads, programs, **f32),
        chunk,
        torch.zeros(max_batch, n_heads, device=device, dtype=torch.int32),
    )


def _check_cache(k_cache, v_cache, d):
    if k_cache.dtype != torch.float16 or v_cache.dtype != torch.float16:
        raise TypeError("the KV cache must be float16")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[3] != d:
        raise ValueError(f"K/V caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not match head dim {d}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the KV cache's head dim must be contiguous")
    if d not in (16, 32, 64, 128, 256, 512):
        raise ValueError(f"head dim {d} is not supported (16..512, a power of two)")


# ---------------------------------------------------------------------------------------------------------
# decode
#
# The KV range of a row is cut into CHUNK-key splits; the grid has P programs per (row, KV head), fixed at
# launch, and program p takes splits p, p+P, p+2P, ... that hold visible keys (P is the number of splits when
# max_ctx is short, so each program then has one split). Which programs have work is recomputed from seq_len
# on the device, so nothing depends on host values and the launch replays in a CUDA graph.
#
# Single launch (the default): a program that finds itself the only one with work (the row fits in one split:
# every short context) normalises and writes the output directly, with no scratch traffic at all. Otherwise
# each program stores its partial (m, l, acc), bumps a per-(row, KV head) counter, and the last to arrive
# merges all partials of its G heads, always in split order (so the result does not depend on which program
# finished last), and resets the counter for the next launch.
# Two launches (fused=False, the previous scheme): every program stores a partial; _decode_reduce_kernel
# merges them.


@triton.jit
def _split_range(seq_len, window, CHUNK: tl.constexpr):
    """First visible key, and the half-open range of splits that hold visible keys."""
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    return lo, lo // CHUNK, (seq_len + CHUNK - 1) // CHUNK


@triton.jit
def _merge_partials(acc_ptr, m_ptr, l_ptr, base, s_lo, s_end, n_progs, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Normalised output [D] of one head from the partials of splits s_lo..s_end-1 (entry base + split % P);
    zeros when there are none."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    mx = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(s_lo, s_end, BLOCK_S):
        sp = s0 + offs_s
        mx = tl.maximum(mx, tl.load(m_ptr + base + sp % n_progs, mask=sp < s_end, other=float("-inf")))
    m_all = tl.max(mx, 0)

    den = tl.zeros([BLOCK_S], tl.float32)
    num = tl.zeros([BLOCK_S, D], tl.float32)
    for s0 in range(s_lo, s_end, BLOCK_S):
        sp = s0 + offs_s
        ok = sp < s_end
        e = base + sp % n_progs
        w = tl.where(ok, tl.exp2(tl.load(m_ptr + e, mask=ok, other=float("-inf")) - m_all), 0.0)
        den += w * tl.load(l_ptr + e, mask=ok, other=0.0)
        num += w[:, None] * tl.load(acc_ptr + e[:, None].to(tl.int64) * D + offs_d[None, :], mask=ok[:, None],
                                    other=0.0)
    total = tl.sum(den, 0)
    return tl.sum(num, 0) / tl.where(total > 0, total, 1.0)  # an empty row (seq_len 0) comes out as zeros


@triton.jit
def _merge_group(acc_ptr, m_ptr, l_ptr, base, s_lo, s_end, n_progs, n_entries,
                 G: tl.constexpr, RG: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Normalised outputs [RG, D] of the G heads at entries base + g * n_entries + split % P, from the
    partials of splits s_lo..s_end-1 (at least one), merged for all heads at once in split order: one pass,
    each step loading m, l and acc together (one L2 round trip per BLOCK_S splits; .cg: never a stale L1)."""
    offs_g = tl.arange(0, RG)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    m_run = tl.full([RG], float("-inf"), tl.float32)
    den = tl.zeros([RG], tl.float32)
    num = tl.zeros([RG, D], tl.float32)
    for s0 in range(s_lo, s_end, BLOCK_S):
        sp = s0 + offs_s
        ok = g_ok[:, None] & (sp < s_end)[None, :]
        e = base + offs_g[:, None] * n_entries + (sp % n_progs)[None, :]
        m = tl.load(m_ptr + e, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + e, mask=ok, other=0.0, cache_modifier=".cg")
        a = tl.load(acc_ptr + e[:, :, None].to(tl.int64) * D + offs_d[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded heads only: keeps them NaN-free
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new[:, None])
        den = den * alpha + tl.sum(w * l, 1)
        num = num * alpha[:, None] + tl.sum(w[:, :, None] * a, 1)
        m_run = m_new
    return num / tl.where(den > 0, den, 1.0)[:, None]


@triton.jit
def _rope_q_and_store_kv(row_ptr, k_base, v_base, stride_kt, stride_vt, inv_freq_ptr, qn_ptr, kn_ptr, eps, pos,
                         heads, g_ok, n_heads, n_kv_heads, kvh, WRITER, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         Q_NORM: tl.constexpr, K_NORM: tl.constexpr, KV_ROW: tl.constexpr, V_NORM: tl.constexpr):
    """From one qkv row: the G query heads normalised and rotated ([BLOCK_G, D] fp32). The program that owns
    the last split (WRITER) also writes this row's new key and value at `pos` and, after a block barrier,
    reads them back with the rest of its split; no other program's keys include `pos`."""
    HALF: tl.constexpr = D // 2
    offs = tl.arange(0, HALF)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs)
    c = tl.cos(angle)
    sn = tl.sin(angle)
    src = row_ptr + heads[:, None] * D + offs[None, :]
    q1 = tl.load(src, mask=g_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(src + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
    y1, y2 = _rope_heads(q1, q2, qn_ptr, c, sn, offs, offs < HALF, D, eps, Q_NORM, HALF)
    if KV_ROW > 0:  # a layer that reads another's cache writes none
        if WRITER:
            k_src = row_ptr + (n_heads + kvh) * D + offs[None, :]
            v_src = row_ptr + (n_heads + (KV_ROW - 1) * n_kv_heads + kvh) * D + offs  # k's own row when KV_ROW 1
            k1, k2 = _rope_heads(tl.load(k_src).to(tl.float32), tl.load(k_src + HALF).to(tl.float32), kn_ptr, c, sn,
                                 offs, offs < HALF, D, eps, K_NORM, HALF)
            p64 = pos.to(tl.int64)
            k_dst = k_base + p64 * stride_kt + offs[None, :]
            tl.store(k_dst, k1.to(k_base.dtype.element_ty))
            tl.store(k_dst + HALF, k2.to(k_base.dtype.element_ty))
            v1 = tl.load(v_src).to(tl.float32)
            v2 = tl.load(v_src + HALF).to(tl.float32)
            if V_NORM:  # an unweighted RMSNorm over the head
                inv = tl.rsqrt((tl.sum(v1 * v1, axis=0) + tl.sum(v2 * v2, axis=0)) / D + eps)
                v1, v2 = v1 * inv, v2 * inv
            v_dst = v_base + p64 * stride_vt + offs
            tl.store(v_dst, v1.to(v_base.dtype.element_ty))
            tl.store(v_dst + HALF, v2.to(v_base.dtype.element_ty))
            tl.debug_barrier()  # the block's later loads of position pos see these stores
    # [BLOCK_G, HALF] x 2 -> [BLOCK_G, D]: the halves side by side along the head dim
    return tl.reshape(tl.permute(tl.join(y1, y2), (0, 2, 1)), (BLOCK_G, D))


# Window and lengths stay runtime values: specialising on 1 would turn them into constants.
@triton.jit(do_not_specialize=["window"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, slots_ptr, acc_ptr, m_ptr, l_ptr, out_ptr, count_ptr,
    inv_freq_ptr, qn_ptr, kn_ptr, eps,
    qk_scale, window, n_heads, n_kv_heads, n_entries, n_progs,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, USE_DOT: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, FUSED: tl.constexpr, RG: tl.constexpr, BLOCK_S: tl.constexpr,
    ROPE: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr, KV_ROW: tl.constexpr, V_NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    prog = tl.program_id(2)
    pdl.wait(PDL)
    seq_len = tl.load(seq_lens_ptr + b)
    slot = tl.load(slots_ptr + b).to(tl.int64)  # issued together with seq_len: one round trip, not two
    lo, s_lo, s_hi = _split_range(seq_len, window, CHUNK)
    n_active = tl.minimum(s_hi - s_lo, n_progs)  # programs with visible keys: 0 .. n_active-1 (mod P)
    first = prog + (tl.maximum(s_lo - prog, 0) + n_progs - 1) // n_progs * n_progs
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    g_ok = offs_g < G
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if first >= s_hi:  # nothing visible for this program at this row's length
        if FUSED:
            if (n_active <= 0) & (prog == 0):  # an empty row (seq_len 0) comes out as zeros
                tl.store(out_ptrs, tl.zeros([BLOCK_G, D], tl.float32).to(out_ptr.dtype.element_ty),
                         mask=g_ok[:, None])
        return

    k_base = k_ptr + slot * stride_kb + kvh * stride_kh
    v_base = v_ptr + slot * stride_vb + kvh * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    if ROPE:
        q = _rope_q_and_store_kv(q_ptr + b * stride_qb, k_base, v_base, stride_kt, stride_vt, inv_freq_ptr, qn_ptr,
                                 kn_ptr, eps, seq_len - 1, heads, g_ok, n_heads, n_kv_heads, kvh,
                                 prog == (s_hi - 1) % n_progs, BLOCK_G, D, Q_NORM, K_NORM, KV_ROW, V_NORM)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None],
                    other=0.0)
    # G query heads share this KV head: one pass over K/V serves all of them (tl.dot needs >= 16 rows, so
    # groups are padded to 16; a group of one uses plain fp32 dot products instead).
    if USE_DOT:
        q = q.to(tl.float16)
    else:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for split in range(first, s_hi, n_progs):
        start = tl.maximum(split * CHUNK, lo)
        end = tl.minimum(split * CHUNK + CHUNK, seq_len)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            ok = pos < end
            # Masked keys read as 0, never as whatever stale (possibly NaN) data sits in the cache.
            k = tl.load(k_base + pos[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_base + pos[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.sum(k.to(tl.float32) * q, axis=1)[None, :]
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            # Every tile holds at least one visible key, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_DOT:
                pv = tl.dot(p.to(tl.float16), v)
            else:
                pv = tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    if FUSED and n_active == 1:  # the only program with work: the output is this program's alone
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        entry = (b * n_heads + heads) * n_entries + prog
        tl.store(acc_ptr + entry[:, None].to(tl.int64) * D + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(m_ptr + entry, m_i, mask=g_ok)
        tl.store(l_ptr + entry, l_i, mask=g_ok)
        if FUSED:
            # All threads' partial stores precede the (one-thread) release of the ticket; the last arrival
            # acquires everyone's partials and reads them from L2 (.cg), never from a stale L1 line.
            tl.debug_barrier()
            counter = count_ptr + b * n_heads + kvh
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == n_active - 1:
                tl.store(counter, 0)  # the next launch (stream-ordered after this one) starts from zero
                s_end = tl.minimum(s_hi, s_lo + n_progs)
                offs_r = tl.arange(0, RG)
                o = _merge_group(acc_ptr, m_ptr, l_ptr, (b * n_heads + kvh * G) * n_entries, s_lo, s_end,
                                 n_progs, n_entries, G, RG, D, BLOCK_S)
                tl.store(out_ptr + b * stride_ob + (kvh * G + offs_r)[:, None] * stride_oh + offs_d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=(offs_r < G)[:, None])


@triton.jit(do_not_specialize=["window"])
def _decode_reduce_kernel(
    acc_ptr, m_ptr, l_ptr, seq_lens_ptr, out_ptr,
    window, n_heads, n_entries, n_progs, stride_ob, stride_oh,
    D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    lo, s_lo, s_hi = _split_range(seq_len, window, CHUNK)
    # The programs that had work own splits s_lo .. s_lo+P-1 (mod P), or fewer when the row is short.
    s_end = tl.minimum(s_hi, s_lo + n_progs)
    o = _merge_partials(acc_ptr, m_ptr, l_ptr, (b * n_heads + h) * n_entries, s_lo, s_end, n_progs, D, BLOCK_S)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + tl.arange(0, D), o.to(out_ptr.dtype.element_ty))


def _rope_args(rope: DecodeRope | None, q: torch.Tensor):
    """inv_freq, q_norm, k_norm, eps for the kernel (any tensor stands in for the ones it will not read)."""
    if rope is None:
        return q, q, q, 0.0
    return (rope.inv_freq, rope.q_norm if rope.q_norm is not None else rope.inv_freq,
            rope.k_norm if rope.k_norm is not None else rope.inv_freq, float(rope.eps))


def decode_attention(q, k_cache, v_cache, seq_lens, slots, *, scale: float, window: int = 0, out=None,
                     scratch: DecodeScratch | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, fused: bool = True,
                     rope: DecodeRope | None = None, n_heads: int | None = None):
    """Attention of one new token per row: q [B, Hq, D] (fp32/fp16) against the cache slots[b], positions
    0..seq_lens[b]-1 (seq_lens and slots int32 on device). Returns out [B, Hq, D] (fp32 unless out says).

    With `rope`, q is instead the QKV projection's rows [B, (Hq + 2 Hkv) * D] (give n_heads = Hq): the kernel
    normalises and rotates q and k itself and writes the new key and value at position seq_lens[b] - 1.
    fused (default): one launch, merging split partials in the last-arriving program (needs scratch.count,
    zero between launches, as decode_scratch makes it); fused=False: split kernel plus reduce kernel."""
    d = k_cache.shape[3] if k_cache.dim() == 4 else -1
    if rope is not None:
        width = None if n_heads is None else (n_heads + rope.kv_in_row * k_cache.shape[2]) * d
        if rope.kv_in_row not in (0, 1, 2) or q.dim() != 2 or q.shape[1] != width:
            raise ValueError(f"with rope, q must be the qkv rows [B, (n_heads + {rope.kv_in_row} * kv_heads) * "
                             f"{d}], got {tuple(q.shape)} and n_heads={n_heads}")
        if rope.inv_freq.shape != (d // 2,) or rope.inv_freq.dtype != torch.float32:
            raise ValueError(f"inv_freq must be float32 [{d // 2}]")
        for w in (rope.q_norm, rope.k_norm):
            if w is not None and (w.shape != (d,) or not w.is_contiguous()):
                raise ValueError(f"q/k norm weights must be contiguous [{d}]")
        B, hq = q.shape[0], n_heads
        q_strides = (q.stride(0), d)
    else:
        B, hq, d = q.shape
        q_strides = (q.stride(0), q.stride(1))
    _check_cache(k_cache, v_cache, d)
    max_ctx, hkv = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if q.stride(-1) != 1:
        raise ValueError("q's head dim must be contiguous")
    if scratch is None:
        scratch = decode_scratch(B, hq, d, max_ctx, q.device)
    n_entries = scratch.m.shape[2]
    if scratch.m.shape[0] < B or scratch.m.shape[1] != hq or scratch.acc.shape[3] != d:
        raise ValueError("decode scratch is too small for this batch, or made for other heads")
    if fused and (scratch.count is None or scratch.count.shape[0] < B or scratch.count.shape[1] < hkv):
        raise ValueError("the single-launch decode needs the scratch's counters (make it with decode_scratch)")
    if out is None:
        out = torch.empty(B, hq, d, device=q.device, dtype=torch.float32)
    if out.shape != (B, hq, d) or out.stride(2) != 1:
        raise ValueError(f"out must be [{B}, {hq}, {d}] with a contiguous head dim")

    g = hq // hkv
    # Big batches already fill the GPU with rows; fewer programs per row then keep empty ones off the grid.
    n_progs = min(n_entries, triton.cdiv(max_ctx, scratch.chunk), max(1, triton.cdiv(TARGET_PROGRAMS, B * hkv)))
    dn, dw, ds = DECODE_CONFIGS.get((d, g > 1), (32, 4, 2))
    block_n = block_n or min(dn, scratch.chunk)
    count = scratch.count if scratch.count is not None else scratch.m  # unused when not fused
    # The last program merges [G, splits, D] partials in steps of merge_s splits (~32 fp32 a thread at 4 warps).
    rg = triton.next_power_of_2(g)
    merge_s = max(1, min(triton.next_power_of_2(n_progs), 4096 // (rg * d)))
    _decode_split_kernel[(B, hkv, n_progs)](
        q, k_cache, v_cache, seq_lens, slots, scratch.acc, scratch.m, scratch.l, out, count,
        *_rope_args(rope, q),
        scale * LOG2E, window, hq, hkv, n_entries, n_progs,
        *q_strides,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        G=g, BLOCK_G=1 if g == 1 else max(16, triton.next_power_of_2(g)), USE_DOT=g > 1, D=d, CHUNK=scratch.chunk,
        BLOCK_N=block_n, FUSED=fused, RG=rg, BLOCK_S=merge_s, num_warps=num_warps or dw, num_stages=num_stages or ds,
        ROPE=rope is not None, Q_NORM=rope is not None and rope.q_norm is not None,
        K_NORM=rope is not None and rope.k_norm is not None, KV_ROW=rope.kv_in_row if rope is not None else 2,
        V_NORM=rope is not None and rope.v_norm, **pdl.LAUNCH,
    )
    if not fused:
        _decode_reduce_kernel[(B, hq)](
            scratch.acc, scratch.m, scratch.l, seq_lens, out,
            window, hq, n_entries, n_progs, out.stride(0), out.stride(1),
            D=d, CHUNK=scratch.chunk, BLOCK_S=16, num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# prefill


@triton.jit
def _prefill_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, lo, hi, kv_end, window,
                   MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        kpos = n0 + offs_n
        if MASKED:
            ok = kpos < kv_end
            k = tl.load(k_base + kpos[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_base + kpos[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + kpos[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + kpos[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            vis = (kpos[None, :] <= qpos[:, None]) & ok[None, :]
            vis &= ((qpos[:, None] - kpos[None, :]) < window) | (window == 0)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row may see nothing in a boundary tile yet: keep its max at -inf without producing NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T", "max_ctx", "window"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, span_ptr,
    qk_scale, T, max_ctx, window, G,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The start position and the real row count come from device memory, so one captured launch (its grid
    # sized for T rows) replays for any start and any count <= T. Rows past the count, and positions past
    # the cache, are never computed.
    start = tl.load(span_ptr)
    count = tl.minimum(tl.minimum(tl.load(span_ptr + 1), T), max_ctx - start)
    # Heads vary fastest so the heads sharing a KV head run together and hit the same K/V in L2; query tiles
    # run last-first because the last ones see the most keys.
    h = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    if m0 >= count:  # a tile of padding rows only
        return
    kvh = h // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < count
    # The softmax scale rides on q (once per row) rather than on every score.
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(tl.float16)
    qpos = start + offs_m
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh

    kv_end = start + count
    q_first = start + m0
    q_last = q_first + BLOCK_M - 1
    hi = tl.minimum(q_last + 1, kv_end)  # causal: no key after the tile's last query
    lo = tl.where(window > 0, tl.maximum(q_first - window + 1, 0), 0) // BLOCK_N * BLOCK_N
    # Key tiles in [full_lo, full_hi) are visible to every query of the tile and need no mask.
    full_lo = tl.where(window > 0, (tl.maximum(q_last - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, 0)
    full_hi = (q_first + 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, lo, full_lo,
                                   kv_end, window, True, D, BLOCK_N)
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, full_lo, full_hi,
                                   kv_end, window, False, D, BLOCK_N)
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, full_hi, hi,
                                   kv_end, window, True, D, BLOCK_N)
    # Every real row sees at least its own key; only padding rows can have l_i == 0.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(q, k_cache, v_cache, slot: int, span, *, scale: float, window: int = 0, out=None,
                      block_m: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None):
    """Causal attention of the queries q [T, Hq, D] (fp16/fp32) at positions start, start+1, ... against the
    cache at `slot`, whose positions up to the last query's are filled. Returns out [T, Hq, D] (fp32 unless
    out says).

    span: the start position as an int (all T rows real), or an int32 device tensor [2] holding (start,
    count): only the first count rows are real and computed (the rest of out is left as it was), and
    neither value is baked into the launch, so a CUDA graph of it replays for any start and count <= T. The
    caller keeps start + count within the cache (the kernel computes no row past it)."""
    T, hq, d = q.shape
    _check_cache(k_cache, v_cache, d)
    max_ctx, hkv = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if isinstance(span, torch.Tensor):
        if span.shape != (2,) or span.dtype != torch.int32 or span.device != q.device:
            raise ValueError(f"span must be an int32 [2] tensor (start, count) on {q.device}, "
                             f"got {span.dtype} {tuple(span.shape)} on {span.device}")
    else:
        if span < 0 or span + T > max_ctx:
            raise ValueError(f"positions {span}..{span + T - 1} are outside the cache's {max_ctx}")
        span = torch.tensor([span, T], dtype=torch.int32, device=q.device)
    if q.stride(2) != 1:
        raise ValueError("q's head dim must be contiguous")
    if out is None:
        out = torch.empty(T, hq, d, device=q.device, dtype=torch.float32)
    if out.shape != (T, hq, d) or out.stride(2) != 1:
        raise ValueError(f"out must be [{T}, {hq}, {d}] with a contiguous head dim")
    if T == 0:
        return out
    k, v = k_cache[slot], v_cache[slot]
    bm, bn, nw, ns = PREFILL_CONFIGS.get(d, (64, 64, 4, 2))
    block_m, block_n = block_m or bm, block_n or bn
    grid = (hq, triton.cdiv(T, block_m))
    _prefill_kernel[grid](
        q, k, v, out, span,
        scale * LOG2E, T, max_ctx, window, hq // hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps or nw, num_stages=num_stages or ns,
    )
    return out
