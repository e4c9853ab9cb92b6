"""Decode GEMV on packed weights: out[M, N] = x[M, K] @ W[N, K]^T for M = 1..32, with optional fusions.

Fusions (any combination):
- RMSNorm prologue (`norm_weight`): x -> x * rsqrt(mean(x^2) + eps) * norm_weight. Since rstd is one scalar
  per activation row, the kernel multiplies by norm_weight while streaming K and applies rstd to the finished
  dot product; the sum of squares is gathered in the same pass, so x is read once and no program needs a
  separate pre-pass over the whole row.
- gated activation (`gated`): W holds 2F rows [gate; up]; each program computes matching gate and up rows and
  writes act(gate) * up.
- residual epilogue (`residual`): out = residual + result (residual may be out itself: each element is read
  and written by the same program).

Each program owns BLOCK_N weight rows and a K range; it loads each weight tile once, dequantizes it to fp32
in registers, and loops over the M activation rows against it, so the packed weight is read exactly once per
call whatever M is. With M = 1 the inner step is a pure multiply-add reduction over 16-byte weight loads.

Tiles are views of each scale group as [groups, 2, G/2]: a q4 byte holds element i and i + G/2 of its group
in its two nibbles, so the low and high nibbles of a contiguous byte run pair with two contiguous runs of x.
q8 and f16 use the same split (f16 with a pseudo-group of 32), so one kernel body serves all kinds; KIND is
a constexpr and each kind compiles to its own specialized kernel.

When N alone gives too few programs to fill 132 SMs, K is split across programs: each writes fp32 partial
dot products (and partial sums of squares) to a workspace, and a small kernel reduces them in a fixed order
(deterministic) and applies the epilogue. Pass `workspace` (see workspace_numel) to keep the call
allocation-free for CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import gemv_q6k
from ingot.quant.pack import PackedLinear

KIND_IDS = {"q4": 0, "q8": 1, "f16": 2}
GATED_IDS = {None: 0, "silu": 1, "gelu_tanh": 2}
F16_PSEUDO_GROUP = 32
N_SMS = 132  # H100 SXM
MAX_M = 32


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, m_ptr, rows, row_ok, k0, k_end, K,
                  KIND: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights of `rows` x [k0, k0 + BLOCK_K) as (low halves, high halves), each [rows, groups, G/2]."""
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    gi = tl.arange(0, NG)
    ii = tl.arange(0, HALF)
    k_lo = k0 + gi[:, None] * GROUP + ii[None, :]  # [NG, HALF] element index of each low half
    r3 = rows[:, None, None].to(tl.int64)
    ok_lo = row_ok[:, None, None] & (k_lo < k_end)[None, :, :]
    ok_hi = row_ok[:, None, None] & (k_lo + HALF < k_end)[None, :, :]
    if KIND == 2:
        base = qw_ptr + r3 * K + k_lo[None, :, :]
        w_lo = tl.load(base, mask=ok_lo, other=0.0).to(tl.float32)
        w_hi = tl.load(base + HALF, mask=ok_hi, other=0.0).to(tl.float32)
    else:
        if KIND == 0:
            byte = k0 // 2 + gi[:, None] * HALF + ii[None, :]
            b = tl.load(qw_ptr + r3 * (K // 2) + byte[None, :, :], mask=ok_lo, other=0)
            q_lo = (b & 15).to(tl.float32)
            q_hi = (b >> 4).to(tl.float32)
            if not HAS_MIN:
                q_lo -= 8.0
                q_hi -= 8.0
        else:
            base = qw_ptr + r3 * K + k_lo[None, :, :]
            q_lo = tl.load(base, mask=ok_lo, other=0).to(tl.float32)
            q_hi = tl.load(base + HALF, mask=ok_hi, other=0).to(tl.float32)
        g = k0 // GROUP + gi
        s_off = rows[:, None].to(tl.int64) * (K // GROUP) + g[None, :]
        s_ok = row_ok[:, None] & (g * GROUP < k_end)[None, :]
        s = tl.load(s_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)[:, :, None]
        w_lo = s * q_lo
        w_hi = s * q_hi
        if HAS_MIN:
            mn = tl.load(m_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)[:, :, None]
            w_lo += mn
            w_hi += mn
    return w_lo, w_hi


@triton.jit
def _finish(acc, acc_u, ss, mi, cols, M, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
            HAS_NORM: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * rstd[:, None]
        acc_u = acc_u * rstd[:, None]
    if GATED == 1:
        acc = acc / (1.0 + tl.exp(tl.minimum(-acc, 80.0))) * acc_u  # clamped: exp overflow is noise, not signal
    if GATED == 2:
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        tanh = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * inner, 80.0)) + 1.0)  # saturates to +-1, never NaN
        acc = 0.5 * acc * (1.0 + tanh) * acc_u
    ok = (mi < M)[:, None] & (cols < N)[None, :]
    mi64 = mi.to(tl.int64)[:, None]
    if HAS_RES:
        acc += tl.load(res_ptr + mi64 * stride_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + mi64 * stride_om + cols[None, :], acc, mask=ok)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, nw_ptr, res_ptr, out_ptr, part_ptr, ss_ptr,
                 M, N, K, k_split, stride_xm, stride_rm, stride_om, eps,
                 KIND: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_NORM: tl.constexpr,
                 GATED: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    k_begin = pid_k * k_split
    k_end = tl.minimum(K, k_begin + k_split)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    mi = tl.arange(0, BLOCK_M)
    gi = tl.arange(0, NG)
    ii = tl.arange(0, HALF)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ss = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_lo = k0 + gi[:, None] * GROUP + ii[None, :]
        ok_lo = k_lo < k_end
        ok_hi = k_lo + HALF < k_end
        w_lo, w_hi = _dequant_tile(qw_ptr, s_ptr, m_ptr, rows, row_ok, k0, k_end, K, KIND, GROUP, HAS_MIN, BLOCK_K)
        u_lo = w_lo
        u_hi = w_hi
        if GATED != 0:
            u_lo, u_hi = _dequant_tile(qw_ptr, s_ptr, m_ptr, rows + N, row_ok, k0, k_end, K,
                                       KIND, GROUP, HAS_MIN, BLOCK_K)
        n_lo = ok_lo.to(tl.float32)
        n_hi = n_lo
        if HAS_NORM:
            n_lo = tl.load(nw_ptr + k_lo, mask=ok_lo, other=0.0).to(tl.float32)
            n_hi = tl.load(nw_ptr + k_lo + HALF, mask=ok_hi, other=0.0).to(tl.float32)
        # M is a Python int, specialized to a constant when 1, so the single-row loop folds away.
        for m in range(0, M):
            xp = x_ptr + m * stride_xm + k_lo
            x_lo = tl.load(xp, mask=ok_lo, other=0.0).to(tl.float32)
            x_hi = tl.load(xp + HALF, mask=ok_hi, other=0.0).to(tl.float32)
            if HAS_NORM:
                sq = tl.sum(tl.sum(x_lo * x_lo + x_hi * x_hi, axis=1), axis=0)
                x_lo = x_lo * n_lo
                x_hi = x_hi * n_hi
                ss += tl.where(mi == m, sq, 0.0)
            c = tl.sum(tl.sum(w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :], axis=2), axis=1)
            if BLOCK_M == 1:
                acc += c[None, :]
            else:  # registers cannot be indexed by a runtime m: select the row instead
                acc += tl.where((mi == m)[:, None], c[None, :], 0.0)
            if GATED != 0:
                cu = tl.sum(tl.sum(u_lo * x_lo[None, :, :] + u_hi * x_hi[None, :, :], axis=2), axis=1)
                if BLOCK_M == 1:
                    acc_u += cu[None, :]
                else:
                    acc_u += tl.where((mi == m)[:, None], cu[None, :], 0.0)
    if SPLIT:
        # Partials: [split, M, rows of W]; gate columns first, up columns at +N, as in W.
        n_w = N * (2 if GATED != 0 else 1)
        ok = (mi < M)[:, None] & row_ok[None, :]
        p = part_ptr + (pid_k * M + mi.to(tl.int64))[:, None] * n_w + rows[None, :]
        tl.store(p, acc, mask=ok)
        if GATED != 0:
            tl.store(p + N, acc_u, mask=ok)
        if HAS_NORM:
            tl.store(ss_ptr + pid_k * M + mi, ss, mask=(mi < M) & (pid_n == 0))
    else:
        _finish(acc, acc_u, ss, mi, rows, M, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
                HAS_NORM, GATED, HAS_RES)


# ---------------------------------------------------------------- M = 1: int32 words, scales factored out
#
# The byte kernel above spends most of its instructions per weight on dequantization: extract the byte, an
# int -> float conversion (a quarter-rate instruction on sm_90), the -8, the scale multiply (and the min add),
# then the FMA; and every thread holds one weight row, so it reloads x for each 16-byte weight load. The word
# kernel below (M = 1, q4/q8) instead:
# - loads the weight as int32 words, [BLOCK_N, groups, words per group], 16 bytes per thread, several rows per
#   thread (BLOCK_N larger than the warps' row coverage), so each x value a thread loads serves several rows;
# - turns a nibble/byte into fp32 without a conversion instruction: OR it into the mantissa of 2^23 and
#   subtract 2^23 (and the -8 / -128 offset in the same subtraction, exactly: Sterbenz);
# - factors the scale out: per group, t = sum q_i x_i, then acc[n, g] += s[n, g] * t (+ m[n, g] * sum x_i,
#   the group sum of x computed once per program), so no per-weight scale multiply or min add;
# - keeps the accumulator [BLOCK_N, groups] across K steps and reduces over groups once, at the end.
# UNPACK 0 shifts each field down to bit 0 ((w >> s) & mask | 2^23 bits: shift, LOP3, FADD, FFMA per weight).
# UNPACK 1 masks most fields in place ((w & (mask << b)) | 2^23 bits is 2^23 + q * 2^b, exact while b + width
# <= 23) and scales the matching x by 2^-b instead, once per program rather than once per weight row:
# one shift per word, then LOP3, FADD, FFMA per weight.

MAGIC = 0x4B000000  # fp32 bits of 2^23: mantissa bit b has weight 2^b
_TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _word_field(wd, w_hi, magic, SHIFT: tl.constexpr, WIDTH: tl.constexpr, UNPACK: tl.constexpr,
                OFFSET: tl.constexpr, SIGNED: tl.constexpr):
    """fp32 (q - OFFSET) * 2^b of the field at bit SHIFT of each word (b: where UNPACK left it)."""
    MASK: tl.constexpr = (1 << WIDTH) - 1
    if UNPACK == 0:
        f = (wd >> SHIFT) & MASK
        if SIGNED:
            f = f ^ (1 << (WIDTH - 1))
        v = (f | magic).to(tl.float32, bitcast=True)
        return v - (_TWO23 + OFFSET)
    else:
        # Fields that end above bit 23 come from w_hi = w >> 12 (q4) / w >> 16 (q8), where they end at <= 23.
        DOWN: tl.constexpr = 12 if WIDTH == 4 else 16
        B: tl.constexpr = SHIFT - DOWN if SHIFT + WIDTH > 23 else SHIFT
        if SHIFT + WIDTH > 23:
            src = w_hi
        else:
            src = wd
        # One LOP3 (and-or) since `magic` is a register: as an immediate it would take a second LOP3.
        v = ((src & (MASK << B)) | magic).to(tl.float32, bitcast=True)  # signed q8: w was xor-ed with 0x80..
        return v - (_TWO23 + OFFSET * (1 << B))


@triton.jit
def _word_x(x_ptr, nw_ptr, xk, ok, SHIFT: tl.constexpr, WIDTH: tl.constexpr, UNPACK: tl.constexpr,
            HAS_NORM: tl.constexpr):
    """x (times norm_weight) at element indices xk, and the same scaled by 2^-b for the matching field."""
    x = tl.load(x_ptr + xk, mask=ok, other=0.0).to(tl.float32)
    sq = x * x
    if HAS_NORM:
        x = x * tl.load(nw_ptr + xk, mask=ok, other=0.0).to(tl.float32)
    xs = x
    if UNPACK == 1:
        DOWN: tl.constexpr = 12 if WIDTH == 4 else 16
        B: tl.constexpr = SHIFT - DOWN if SHIFT + WIDTH > 23 else SHIFT
        if B > 0:
            xs = x * (1.0 / (1 << B))
    return x, xs, sq


@triton.jit
def _gemv_word_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, nw_ptr, res_ptr, out_ptr, part_ptr, ss_ptr,
                      N, K, k_split, stride_rm, stride_om, eps, magic,
                      WIDTH: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, SIGNED: tl.constexpr,
                      HAS_NORM: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                      UNPACK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    EPW: tl.constexpr = 32 // WIDTH  # elements per int32 word
    WPG: tl.constexpr = GROUP // EPW  # words per group
    HALF: tl.constexpr = GROUP // 2
    # q4 sym: q - 8; q8 signed: (q + 128) after the xor, - 128; unsigned q8 / q4 with mins: q.
    OFFSET: tl.constexpr = (8 if not HAS_MIN else 0) if WIDTH == 4 else (128 if SIGNED else 0)
    k_begin = pid_k * k_split
    k_end = tl.minimum(K, k_begin + k_split)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    gi = tl.arange(0, NG)
    wi = tl.arange(0, WPG)
    # K is a multiple of GROUP: rows start on whole groups of words (the hints let loads be 16-byte vectors).
    words_per_row = tl.multiple_of(K // EPW, WPG)
    # Tiles are [groups, rows, words of a group]: with the groups dimension ahead of the rows, the layout
    # puts a row's consecutive words in neighbouring threads (16 bytes each) and a warp's remaining threads
    # on further rows; each thread then holds BLOCK_N / (4 * num_warps)-ish rows of the same columns.
    acc = tl.zeros((NG, BLOCK_N), tl.float32)
    acc_u = tl.zeros((NG, BLOCK_N), tl.float32)
    ssv = tl.zeros((NG, WPG), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        g_ok = k0 + gi * GROUP < k_end  # K is a multiple of GROUP: groups are whole
        w_ok = tl.broadcast_to(g_ok[:, None], (NG, WPG))  # constant along a group's words: no split vectors
        wcol = gi[:, None] * WPG + wi[None, :]  # [NG, WPG] word index from k0's
        w0 = tl.multiple_of(k0 // EPW, WPG)
        # element index of byte j (q8) / low nibble of byte j (q4) of each word
        e0 = k0 + gi[:, None] * GROUP + wi[None, :] * 4
        # x for each field of a word, in the order of the fields' bit positions.
        if WIDTH == 4:
            x0, xs0, q0 = _word_x(x_ptr, nw_ptr, e0, w_ok, 0, WIDTH, UNPACK, HAS_NORM)
            x1, xs1, q1 = _word_x(x_ptr, nw_ptr, e0 + HALF, w_ok, 4, WIDTH, UNPACK, HAS_NORM)
            x2, xs2, q2 = _word_x(x_ptr, nw_ptr, e0 + 1, w_ok, 8, WIDTH, UNPACK, HAS_NORM)
            x3, xs3, q3 = _word_x(x_ptr, nw_ptr, e0 + 1 + HALF, w_ok, 12, WIDTH, UNPACK, HAS_NORM)
            x4, xs4, q4 = _word_x(x_ptr, nw_ptr, e0 + 2, w_ok, 16, WIDTH, UNPACK, HAS_NORM)
            x5, xs5, q5 = _word_x(x_ptr, nw_ptr, e0 + 2 + HALF, w_ok, 20, WIDTH, UNPACK, HAS_NORM)
            x6, xs6, q6 = _word_x(x_ptr, nw_ptr, e0 + 3, w_ok, 24, WIDTH, UNPACK, HAS_NORM)
            x7, xs7, q7 = _word_x(x_ptr, nw_ptr, e0 + 3 + HALF, w_ok, 28, WIDTH, UNPACK, HAS_NORM)
            xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            sq = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
        else:
            x0, xs0, q0 = _word_x(x_ptr, nw_ptr, e0, w_ok, 0, WIDTH, UNPACK, HAS_NORM)
            x1, xs1, q1 = _word_x(x_ptr, nw_ptr, e0 + 1, w_ok, 8, WIDTH, UNPACK, HAS_NORM)
            x2, xs2, q2 = _word_x(x_ptr, nw_ptr, e0 + 2, w_ok, 16, WIDTH, UNPACK, HAS_NORM)
            x3, xs3, q3 = _word_x(x_ptr, nw_ptr, e0 + 3, w_ok, 24, WIDTH, UNPACK, HAS_NORM)
            xsum = (x0 + x1) + (x2 + x3)
            sq = (q0 + q1) + (q2 + q3)
        if HAS_NORM:
            ssv += sq
        s_off = rows64[None, :] * (K // GROUP) + (k0 // GROUP + gi)[:, None]
        s_ok = row_ok[None, :] & g_ok[:, None]
        for half in tl.static_range(2 if GATED != 0 else 1):
            r_off = half * N
            wrow = qw_ptr + (rows64 + r_off) * words_per_row + w0
            wd = tl.load(wrow[None, :, None] + wcol[:, None, :],
                         mask=row_ok[None, :, None] & w_ok[:, None, :], other=0)
            if UNPACK == 1 and SIGNED:
                wd = wd ^ -2139062144  # 0x80808080: q + 128 in every byte
            wd = wd.to(tl.uint32, bitcast=True)  # logical shifts
            w_hi = wd >> (12 if WIDTH == 4 else 16)
            if WIDTH == 4:
                p = _word_field(wd, w_hi, magic, 0, 4, UNPACK, OFFSET, SIGNED) * xs0[:, None, :]
                p += _word_field(wd, w_hi, magic, 4, 4, UNPACK, OFFSET, SIGNED) * xs1[:, None, :]
                p += _word_field(wd, w_hi, magic, 8, 4, UNPACK, OFFSET, SIGNED) * xs2[:, None, :]
                p += _word_field(wd, w_hi, magic, 12, 4, UNPACK, OFFSET, SIGNED) * xs3[:, None, :]
                p += _word_field(wd, w_hi, magic, 16, 4, UNPACK, OFFSET, SIGNED) * xs4[:, None, :]
                p += _word_field(wd, w_hi, magic, 20, 4, UNPACK, OFFSET, SIGNED) * xs5[:, None, :]
                p += _word_field(wd, w_hi, magic, 24, 4, UNPACK, OFFSET, SIGNED) * xs6[:, None, :]
                p += _word_field(wd, w_hi, magic, 28, 4, UNPACK, OFFSET, SIGNED) * xs7[:, None, :]
            else:
                p = _word_field(wd, w_hi, magic, 0, 8, UNPACK, OFFSET, SIGNED) * xs0[:, None, :]
                p += _word_field(wd, w_hi, magic, 8, 8, UNPACK, OFFSET, SIGNED) * xs1[:, None, :]
                p += _word_field(wd, w_hi, magic, 16, 8, UNPACK, OFFSET, SIGNED) * xs2[:, None, :]
                p += _word_field(wd, w_hi, magic, 24, 8, UNPACK, OFFSET, SIGNED) * xs3[:, None, :]
            t = tl.sum(p, axis=2)
            s = tl.load(s_ptr + r_off * (K // GROUP) + s_off, mask=s_ok, other=0.0).to(tl.float32)
            if HAS_MIN:
                mn = tl.load(m_ptr + r_off * (K // GROUP) + s_off, mask=s_ok, other=0.0).to(tl.float32)
                c = s * t + mn * tl.sum(xsum, axis=1)[:, None]
            else:
                c = s * t
            if half == 0:
                acc += c
            else:
                acc_u += c
    res = tl.sum(acc, axis=0)[None, :]
    res_u = tl.sum(acc_u, axis=0)[None, :]
    ss = tl.sum(tl.sum(ssv, axis=1), axis=0) + tl.zeros((1,), tl.float32)
    mi = tl.arange(0, 1)
    if SPLIT:
        n_w = N * (2 if GATED != 0 else 1)
        p_out = part_ptr + pid_k.to(tl.int64) * n_w + rows
        tl.store(p_out, tl.sum(acc, axis=0), mask=row_ok)
        if GATED != 0:
            tl.store(p_out + N, tl.sum(acc_u, axis=0), mask=row_ok)
        if HAS_NORM:
            tl.store(ss_ptr + pid_k + mi, ss, mask=pid_n == 0)
    else:
        _finish(res, res_u, ss, mi, rows, 1, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
                HAS_NORM, GATED, HAS_RES)


@triton.jit
def _split_reduce_kernel(part_ptr, ss_ptr, res_ptr, out_ptr, M, N, K, n_split, stride_rm, stride_om, eps,
                         HAS_NORM: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mi = tl.arange(0, BLOCK_M)
    ok = (mi < M)[:, None] & (cols < N)[None, :]
    n_w = N * (2 if GATED != 0 else 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ss = tl.zeros((BLOCK_M,), tl.float32)
    for s in range(0, n_split):
        p = part_ptr + (s * M + mi.to(tl.int64))[:, None] * n_w + cols[None, :]
        acc += tl.load(p, mask=ok, other=0.0)
        if GATED != 0:
            acc_u += tl.load(p + N, mask=ok, other=0.0)
        if HAS_NORM:
            ss += tl.load(ss_ptr + s * M + mi, mask=mi < M, other=0.0)
    _finish(acc, acc_u, ss, mi, cols, M, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
            HAS_NORM, GATED, HAS_RES)


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    split: int  # programs along K (1: no split, no workspace)
    num_warps: int = 4
    # "word": the M = 1 int32-word kernel for q4/q8 (other calls fall back to "byte", the general kernel)
    kernel: str = "word"
    unpack: int = 1  # word kernel: 0 shift every field down, 1 mask in place and pre-scale x


def _block_k(kind: str, group: int) -> int:
    # 128 weight bytes per row per step: 8 x 16-byte loads per row, and at least one whole group.
    return max({"q4": 256, "q8": 128, "f16": 64}[kind], group)


def plan(n_out: int, k: int, m: int, kind: str, group: int, gated: bool) -> GemvConfig:
    """Tile sizes by heuristic (no autotune: it benchmarks on first call, which graphs cannot capture).

    Memory bound: H100 moves ~3.35 TB/s with ~0.7 us latency, so ~2.3 MB must be in flight, ~18 KB per SM.
    A 4-warp program with BLOCK_N = 32 rows x 128 bytes issues 4 KB (two 16-byte loads per thread) per
    K step and dequantizes it to 64 fp32 registers per thread, so several programs are resident per SM; the
    grid is sized for >= 4 programs per SM, splitting K when N/BLOCK_N alone is too few (e.g. 4096 x 4096).
    Gated calls load two tiles per step and larger M keeps per-row temporaries, so both halve BLOCK_N.
    """
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} activation rows, got {m}")
    if m == 1 and kind in ("q4", "q8"):
        return _plan_word(n_out, k, kind, group, gated)
    return _plan_byte(n_out, k, m, kind, group, gated)


def _plan_byte(n_out: int, k: int, m: int, kind: str, group: int, gated: bool) -> GemvConfig:
    """The general (byte) kernel's tiles: any M, any kind."""
    block_m = triton.next_power_of_2(m)
    block_k = _block_k(kind, group)
    block_n = 16 if gated or m > 2 else 32
    tiles_n = triton.cdiv(n_out, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(4 * N_SMS, tiles_n), k_tiles // 4))
    split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty splits
    return GemvConfig(block_m, block_n, block_k, split, kernel="byte")


TARGET_PROGRAMS = 320


def _plan_word(n_out: int, k: int, kind: str, group: int, gated: bool) -> GemvConfig:
    """M = 1 word kernel: 128 weight bytes per row per K step (one 16-byte load per thread per row), 128 rows
    per program (64 for gated q4, whose gate and up tiles double the registers), so each thread reuses every
    x value it loads across its rows. K is split until the grid holds ~320 programs (~2.4 per SM): the
    benchmarks/gemv_sweep.py winners on the H100 (2026-11-24) sit there for every shape from 2048x2048 to
    151936x4096, where small shapes are latency-bound and want all their loads in flight at once."""
    block_k = max(256 if kind == "q4" else 128, group)
    block_n = 64 if gated and kind == "q4" else 128
    tiles_n = triton.cdiv(n_out, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(round(TARGET_PROGRAMS / tiles_n), k_tiles))
    split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty splits
    return GemvConfig(1, block_n, block_k, split, num_warps=4, kernel="word", unpack=1)


def _k_split(k: int, cfg: GemvConfig) -> int:
    return triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split) * cfg.block_k


def workspace_numel(w: PackedLinear, m: int, gated: str | None = None, config: GemvConfig | None = None) -> int:
    """fp32 elements the split-K path needs for this call (0 when it does not split)."""
    if w.kind == "q6k":
        return gemv_q6k.workspace_numel(w, m)
    n_out = w.n // 2 if gated else w.n
    cfg = config or plan(n_out, w.k, m, w.kind, w.group, bool(gated))
    splits = triton.cdiv(w.k, _k_split(w.k, cfg))
    return 0 if splits == 1 else splits * m * (w.n + 1)


def linear(x: torch.Tensor, w: PackedLinear, *, out: torch.Tensor | None = None,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
           gated: str | None = None, workspace: torch.Tensor | None = None,
           config: GemvConfig | None = None) -> torch.Tensor:
    """out[M, N] (fp32) = [residual +] x' @ W^T, or act(x' @ Wg^T) * (x' @ Wu^T) with `gated`;
    x' = rms_norm(x, norm_weight, eps) when norm_weight is given. x: fp32 or fp16 [M, K], rows contiguous."""
    if w.kind == "q6k":  # GGML Q6_K at its own 6.56 bits per weight: its own kernel
        return gemv_q6k.linear(x, w, out=out, norm_weight=norm_weight, eps=eps, residual=residual, gated=gated,
                               workspace=workspace)
    m, k = x.shape
    if k != w.k or x.stride(1) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)} (row stride 1 needed) does not match weight k={w.k}")
    if gated not in GATED_IDS:
        raise ValueError(f"unknown activation {gated!r}")
    n_out = w.n // 2 if gated else w.n
    if gated and w.n % 2:
        raise ValueError("a gated weight needs an even number of rows [gate; up]")
    cfg = config or plan(n_out, k, m, w.kind, w.group, bool(gated))
    if cfg.block_m < m:
        raise ValueError(f"config block_m={cfg.block_m} < M={m}")
    if out is None:
        out = torch.empty(m, n_out, device=x.device, dtype=torch.float32)
    assert out.shape == (m, n_out) and out.dtype == torch.float32 and out.stride(1) == 1
    if residual is not None:
        assert residual.shape == (m, n_out) and residual.stride(1) == 1
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    k_split = _k_split(k, cfg)
    splits = triton.cdiv(k, k_split)
    part = ss = out
    if splits > 1:
        need = splits * m * (w.n + 1)
        if workspace is None:
            workspace = torch.empty(need, device=x.device, dtype=torch.float32)
        assert workspace.dtype == torch.float32 and workspace.numel() >= need, "workspace too small"
        part, ss = workspace, workspace[splits * m * w.n:]
    res = residual if residual is not None else out
    if m == 1 and w.kind != "f16" and cfg.kernel == "word":
        assert cfg.block_k % w.group == 0 and w.qweight.is_contiguous()
        flags = dict(HAS_NORM=norm_weight is not None, GATED=GATED_IDS[gated], HAS_RES=residual is not None)
        _gemv_word_kernel[(triton.cdiv(n_out, cfg.block_n), splits)](
            x, w.qweight.view(torch.int32), w.scales, w.mins if w.mins is not None else w.scales,
            norm_weight if norm_weight is not None else x, res, out, part, ss,
            n_out, k, k_split, res.stride(0), out.stride(0), eps, MAGIC,
            WIDTH=4 if w.kind == "q4" else 8, GROUP=w.group, HAS_MIN=w.mins is not None,
            SIGNED=w.qweight.dtype == torch.int8, SPLIT=splits > 1, UNPACK=cfg.unpack,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **flags)
    else:
        _launch_byte(x, w, cfg, out, norm_weight, eps, residual, res, gated, part, ss, m, n_out, k, k_split,
                     splits)
    if splits > 1:
        reduce_n = 128 if cfg.block_m <= 4 else 32
        flags = dict(HAS_NORM=norm_weight is not None, GATED=GATED_IDS[gated], HAS_RES=residual is not None)
        _split_reduce_kernel[(triton.cdiv(n_out, reduce_n),)](
            part, ss, res, out, m, n_out, k, splits, res.stride(0), out.stride(0), eps,
            BLOCK_M=cfg.block_m, BLOCK_N=reduce_n, num_warps=4, **flags)
    return out


def _launch_byte(x, w, cfg, out, norm_weight, eps, residual, res, gated, part, ss, m, n_out, k, k_split, splits):
    group = w.group if w.kind != "f16" else F16_PSEUDO_GROUP
    flags = dict(KIND=KIND_IDS[w.kind], GROUP=group, HAS_MIN=w.mins is not None,
                 HAS_NORM=norm_weight is not None, GATED=GATED_IDS[gated], HAS_RES=residual is not None)
    grid = (triton.cdiv(n_out, cfg.block_n), splits)
    _gemv_kernel[grid](
        x, w.qweight, w.scales if w.scales is not None else w.qweight, w.mins if w.mins is not None else w.qweight,
        norm_weight if norm_weight is not None else x, res, out, part, ss,
        m, n_out, k, k_split, x.stride(0), res.stride(0), out.stride(0), eps,
        SPLIT=splits > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, **flags)


@triton.jit
def _embed_kernel(ids_ptr, qw_ptr, s_ptr, m_ptr, out_ptr, K, stride_om, scale,
                  KIND: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    row = tl.load(ids_ptr + t + tl.arange(0, 1))
    w_lo, w_hi = _dequant_tile(qw_ptr, s_ptr, m_ptr, row, row >= 0, k0, K, K, KIND, GROUP, HAS_MIN, BLOCK_K)
    k_lo = k0 + tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, HALF)[None, :]
    o = out_ptr + t.to(tl.int64) * stride_om + k_lo
    tl.store(o, tl.sum(w_lo, axis=0) * scale, mask=k_lo < K)
    tl.store(o + HALF, tl.sum(w_hi, axis=0) * scale, mask=k_lo + HALF < K)


def embed_rows(ids: torch.Tensor, table: PackedLinear, scale: float = 1.0, *, out: torch.Tensor | None = None,
               block_k: int | None = None) -> torch.Tensor:
    """out[t] = scale * dequantized row ids[t] of the table (fp32 [T, k]); ids stay on the device."""
    if table.kind == "q6k":
        return gemv_q6k.embed_rows(ids, table, scale, out=out)
    (t,) = ids.shape
    if out is None:
        out = torch.empty(t, table.k, device=ids.device, dtype=torch.float32)
    assert out.shape == (t, table.k) and out.dtype == torch.float32 and out.stride(1) == 1
    group = table.group if table.kind != "f16" else F16_PSEUDO_GROUP
    bk = block_k or max(group, 512)
    _embed_kernel[(t, triton.cdiv(table.k, bk))](
        ids, table.qweight, table.scales if table.scales is not None else table.qweight,
        table.mins if table.mins is not None else table.qweight, out, table.k, out.stride(0), float(scale),
        KIND=KIND_IDS[table.kind], GROUP=group, HAS_MIN=table.mins is not None, BLOCK_K=bk, num_warps=4)
    return out
