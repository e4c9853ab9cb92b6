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
- norm handoff (M = 1 word kernel: `norm_out` on a residual call, `norm_parts` on the next): the call that
  writes a residual row also writes it times the next norm's weight and its sums of squares in parts, so the
  next call reads one pre-normed row instead of x and the norm weight (see linear).

Each program owns BLOCK_N weight rows and a K range; it loads each weight tile once, dequantizes it to fp32
in registers, and loops over the M activation rows against it, so the packed weight is read exactly once per
call whatever M is. With M = 1 the inner step is a pure multiply-add reduction over 16-byte weight loads.

Tiles are views of each scale group as [groups, 2, G/2]: a q4 byte holds element i and i + G/2 of its group
in its two nibbles, so the low and high nibbles of a contiguous byte run pair with two contiguous runs of x.
q8 and f16 use the same split (f16 with a pseudo-group of 32), so one kernel body serves all kinds; KIND is
a constexpr and each kind compiles to its own specialized kernel. M = 1 with q4/q8 weights has two faster
kernels below (GemvConfig.kernel): "word" (fp32 x, int32 weight words) and "dp4a" (x quantized to int8 per
program, integer dot products; opt-in, see DECODE_KERNEL: faster alone, slower inside the decode step on
the q4 models and less accurate, as measured in benchmarks/README.md).

When N alone gives too few programs to fill 132 SMs, K is split across programs, still in one launch: each
program writes its fp32 partial dot products (and partial sum of squares) to a workspace and takes a ticket
from its column tile's int32 counter; the program that draws the last ticket sums all splits' partials in
split order (deterministic, whichever program comes last), applies the epilogue and puts the counter back to
0 for the next call. Pass `workspace` (see workspace_numel; it must start zeroed, e.g. torch.zeros, and the
counters stay zero between calls) to keep the call allocation-free for CUDA graphs.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import pdl
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
            b = tl.load(qw_ptr + r3 * (K // 2) + byte[None, :, :], mask=ok_lo, other=0).to(tl.int32)
            # nibble -> fp32 without a conversion (I2F is quarter rate on sm_90): 2^23 + q from its mantissa
            # bits, minus 2^23 (and the 8 of a symmetric q4) in one exact subtraction
            off = _TWO23 + (0.0 if HAS_MIN else 8.0)
            q_lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - off
            q_hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - off
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
    return acc


@triton.jit
def _split_finish(acc, acc_u, ss, mi, rows, pid_n, pid_k, n_split, M, N, K, eps, part_ptr, ss_ptr, cnt_ptr,
                  res_ptr, stride_rm, out_ptr, stride_om,
                  HAS_NORM: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr):
    """Split-K: store this program's partials; the column tile's last program reduces them and finishes.

    Partials: [split, M, rows of W] (gate columns first, up at +N, as in W); sums of squares: [tile, split, M]
    (every tile's programs compute the same ones, but only its own are ordered before its counter).
    Returns (what _finish stored, whether this program finished; zeros where it did not).
    """
    n_w = N * (2 if GATED != 0 else 1)
    ok = (mi < M)[:, None] & (rows < N)[None, :]
    p = part_ptr + (pid_k * M + mi.to(tl.int64))[:, None] * n_w + rows[None, :]
    tl.store(p, acc, mask=ok)
    if GATED != 0:
        tl.store(p + N, acc_u, mask=ok)
    ss_tile = ss_ptr + pid_n * n_split * M
    if HAS_NORM:
        tl.store(ss_tile + pid_k * M + mi, ss, mask=mi < M)
    # Every thread's stores happen before the barrier, the barrier before the (one-thread) release.
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    done = ticket == n_split - 1
    y = tl.zeros_like(acc)
    if done:
        acc = tl.zeros_like(acc)
        acc_u = tl.zeros_like(acc_u)
        ss = tl.zeros_like(ss)
        for s in range(0, n_split):
            # .cg: from L2, where the other SMs' partials are; this SM's L1 may hold a stale neighbour line.
            p = part_ptr + (s * M + mi.to(tl.int64))[:, None] * n_w + rows[None, :]
            acc += tl.load(p, mask=ok, other=0.0, cache_modifier=".cg")
            if GATED != 0:
                acc_u += tl.load(p + N, mask=ok, other=0.0, cache_modifier=".cg")
            if HAS_NORM:
                ss += tl.load(ss_tile + s * M + mi, mask=mi < M, other=0.0, cache_modifier=".cg")
        y = _finish(acc, acc_u, ss, mi, rows, M, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
                    HAS_NORM, GATED, HAS_RES)
        tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call / graph replay
    return y, done


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, nw_ptr, res_ptr, out_ptr, part_ptr, ss_ptr, cnt_ptr,
                 M, N, K, k_split, n_split, stride_xm, stride_rm, stride_om, eps,
                 KIND: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_NORM: tl.constexpr,
                 GATED: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    k_begin = pid_k * k_split
    k_end = tl.minimum(K, k_begin + k_split)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    pdl.wait(PDL)
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
        _split_finish(acc, acc_u, ss, mi, rows, pid_n, pid_k, n_split, M, N, K, eps, part_ptr, ss_ptr, cnt_ptr,
                      res_ptr, stride_rm, out_ptr, stride_om, HAS_NORM, GATED, HAS_RES)
    else:
        _finish(acc, acc_u, ss, mi, rows, M, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
                HAS_NORM, GATED, HAS_RES)


@triton.jit
def _row_epilogue(acc, acc_u, ss, rows, pid_n, pid_k, n_split, N, K, eps, part_ptr, ss_ptr, cnt_ptr, res_ptr,
                  stride_rm, out_ptr, stride_om, HAS_NORM: tl.constexpr, GATED: tl.constexpr,
                  HAS_RES: tl.constexpr, SPLIT: tl.constexpr):
    """M = 1 kernels: per-(group, row) accumulators [groups, rows] -> the row results, then finish or split.
    Returns (the finished [1, rows] values, whether this program finished them), as _split_finish."""
    res = tl.sum(acc, axis=0)[None, :]
    res_u = tl.sum(acc_u, axis=0)[None, :]
    ss1 = ss + tl.zeros((1,), tl.float32)
    mi = tl.arange(0, 1)
    if SPLIT:
        y, done = _split_finish(res, res_u, ss1, mi, rows, pid_n, pid_k, n_split, 1, N, K, eps, part_ptr, ss_ptr,
                                cnt_ptr, res_ptr, stride_rm, out_ptr, stride_om, HAS_NORM, GATED, HAS_RES)
    else:
        y = _finish(res, res_u, ss1, mi, rows, 1, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om,
                    HAS_NORM, GATED, HAS_RES)
        done = pid_k == 0  # (always: one program per column tile) as a tensor, like the split path's
    return y, done


@triton.jit
def _handed_rstd(ssi_ptr, n_parts, K, eps, PARTS_BLOCK: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of a row handed on pre-normed, from its n_parts sums of squares."""
    pi = tl.arange(0, PARTS_BLOCK)
    return 1.0 / tl.sqrt(tl.sum(tl.load(ssi_ptr + pi, mask=pi < n_parts, other=0.0), axis=0) / K + eps)


@triton.jit
def _handed_scale(acc, acc_u, ssi_ptr, n_parts, K, eps, NORMED: tl.constexpr, PARTS_BLOCK: tl.constexpr):
    """acc and acc_u times the rstd of a row handed on pre-normed (NORMED: x came times the norm weight, its
    sum of squares in parts), else as they are. rstd is one scalar per row: it scales the partial sums rather
    than every x element."""
    if NORMED:
        rstd = _handed_rstd(ssi_ptr, n_parts, K, eps, PARTS_BLOCK)
        acc = acc * rstd
        acc_u = acc_u * rstd
    return acc, acc_u


def handed_args(norm_parts: torch.Tensor | None, placeholder: torch.Tensor) -> tuple:
    """(sums-of-squares pointer, their count, dict(NORMED=, PARTS_BLOCK=)) of a kernel that may read a row
    handed on pre-normed (_handed_rstd); placeholder: any tensor, never read, where there is none."""
    n_parts = 0 if norm_parts is None else norm_parts.numel()
    flags = dict(NORMED=norm_parts is not None, PARTS_BLOCK=max(16, triton.next_power_of_2(n_parts)))
    return (norm_parts if norm_parts is not None else placeholder), n_parts, flags


def norm_out_args(norm_out: "NormOut | None", placeholder: torch.Tensor) -> tuple:
    """The (next norm weight, xn, sums of squares) pointers of a kernel that may hand its row on (_norm_out);
    placeholder: any tensor, never touched, where it does not."""
    return (norm_out.weight, norm_out.xn, norm_out.ss) if norm_out is not None else (placeholder,) * 3


@triton.jit
def _norm_out(y, done, rows, N, nwo_ptr, xn_ptr, sso_ptr):
    """Hand a finished residual row [1, rows] on pre-normed (linear's norm_out): y times the next norm's
    weight, and the tile's part of the row's sum of squares; nothing where this program did not finish."""
    ok = (rows < N) & done
    nwo = tl.load(nwo_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(xn_ptr + rows[None, :], y * nwo[None, :], mask=ok[None, :])
    part = tl.sum(tl.sum(tl.where(ok[None, :], y * y, 0.0), axis=1), axis=0)
    tl.store(sso_ptr + tl.arange(0, 1), part + tl.zeros((1,), tl.float32), mask=done)


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


# UNPACK 2 (q4 only) does the products in fp16 pairs: one LOP3 turns two nibbles (bits b and 16 + b of a word,
# b = 0 or 4) into the fp16 pair 1024 + q * 2^b (0x6400 is 1024, whose ulp is 1), one HSUB2 removes 1024 and the
# offset exactly, one HFMA2 multiplies by the matching x pair: three instructions for two weights against six.
# A word's eight products are summed in fp16 (per lane, then the two lanes in fp32), so each word costs ~1e-3
# relative error. x enters scaled by 2^-8 (undone per group in fp32) so the fp16 sums stay far from 65504.
_HALF2_X_SCALE = tl.constexpr(1.0 / 256)


@triton.jit
def _half2(lo, hi, ASM: tl.constexpr):
    """fp32 pairs as fp16x2 words, lo in bits 0-15 (without ASM, for the interpreter, in plain ops)."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo16 | (hi16 << 16)


@triton.jit
def _half_lane(xp, HI: tl.constexpr):
    """fp32 of the fp16 in bits 16-31 (HI) or 0-15 of fp16x2 words."""
    bits = (xp >> 16) & 0xFFFF if HI else xp & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q4_half2_dot(wd, xp0, xp1, xp2, xp3, HAS_MIN: tl.constexpr, ASM: tl.constexpr):
    """fp32 sum of the 8 products (q - offset) * x of each q4 word, the x as _half2 made them from the
    _x_prescaled x of the fields at bits 0|16, 4|20, 8|24 and 12|28."""
    if ASM:
        op: tl.constexpr = _HALF2_DOT_MIN if HAS_MIN else _HALF2_DOT_SYM
        return tl.inline_asm_elementwise(op, "=f,r,r,r,r,r", [wd, xp0, xp1, xp2, xp3], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        off: tl.constexpr = 0.0 if HAS_MIN else 8.0
        t = tl.zeros(wd.shape, tl.float32)
        for i in tl.static_range(4):
            if i == 0:
                xp = xp0
            elif i == 1:
                xp = xp1
            elif i == 2:
                xp = xp2
            else:
                xp = xp3
            lane: tl.constexpr = 1.0 if i % 2 == 0 else 16.0  # the bit-4 nibbles' x came in / 16
            q_lo = ((wd >> (4 * i)) & 15).to(tl.float32) - off
            q_hi = ((wd >> (16 + 4 * i)) & 15).to(tl.float32) - off
            t += (q_lo * lane) * _half_lane(xp, False) + (q_hi * lane) * _half_lane(xp, True)
        return t


_HALF2_DOT = """{
.reg .b32 a, b, c, d, h, s;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
lop3.b32 a, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 h, $1, 8;
lop3.b32 c, h, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 d, h, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 s, SUB_LO;
sub.rn.f16x2 a, a, s;
sub.rn.f16x2 c, c, s;
mov.b32 s, SUB_HI;
sub.rn.f16x2 b, b, s;
sub.rn.f16x2 d, d, s;
mul.rn.f16x2 a, a, $2;
fma.rn.f16x2 a, b, $3, a;
fma.rn.f16x2 a, c, $4, a;
fma.rn.f16x2 a, d, $5, a;
mov.b32 {lo, hi}, a;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}"""
# what HSUB2 takes off each pair: 1024 + 8 (0x6408) and 1024 + 16 * 8 (0x6480) for symmetric q4, 1024 with mins
_HALF2_DOT_SYM = tl.constexpr(_HALF2_DOT.replace("SUB_LO", "0x64086408").replace("SUB_HI", "0x64806480"))
_HALF2_DOT_MIN = tl.constexpr(_HALF2_DOT.replace("SUB_LO", "0x64006400").replace("SUB_HI", "0x64006400"))


@triton.jit
def _word_x2(x_ptr, nw_ptr, xk, ok, SHIFT_A: tl.constexpr, SHIFT_B: tl.constexpr, WIDTH: tl.constexpr,
             UNPACK: tl.constexpr, HAS_NORM: tl.constexpr, X_PAIRS: tl.constexpr):
    """x (times norm_weight), the same pre-scaled for its field (_x_prescaled) and x^2, for elements xk (field at
    SHIFT_A) and xk + 1 (at SHIFT_B). With X_PAIRS (fp32 x and norm weight,
    xk even) each pair is one 8-byte load: the x loads of every weight row a thread holds go through L1,
    and at one 4-byte load a field they, not the weights, bound the big q4 GEMVs (ncu on the H200: L1 82% busy
    at 29% of DRAM bandwidth, Qwen3-8B gate_up)."""
    if X_PAIRS:
        pair = tl.load(x_ptr.to(tl.pointer_type(tl.int64)) + xk // 2, mask=ok, other=0)
        va = pair.to(tl.int32).to(tl.float32, bitcast=True)
        vb = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        if HAS_NORM:
            npair = tl.load(nw_ptr.to(tl.pointer_type(tl.int64)) + xk // 2, mask=ok, other=0)
            na = npair.to(tl.int32).to(tl.float32, bitcast=True)
            nb = (npair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        va = tl.load(x_ptr + xk, mask=ok, other=0.0)
        vb = tl.load(x_ptr + xk + 1, mask=ok, other=0.0)
        if HAS_NORM:
            na = tl.load(nw_ptr + xk, mask=ok, other=0.0)
            nb = tl.load(nw_ptr + xk + 1, mask=ok, other=0.0)
    xa = va.to(tl.float32)
    xb = vb.to(tl.float32)
    sqa = xa * xa
    sqb = xb * xb
    if HAS_NORM:
        xa = xa * na.to(tl.float32)
        xb = xb * nb.to(tl.float32)
    return xa, _x_prescaled(xa, SHIFT_A, WIDTH, UNPACK), sqa, xb, _x_prescaled(xb, SHIFT_B, WIDTH, UNPACK), sqb


@triton.jit
def _x_prescaled(x, SHIFT: tl.constexpr, WIDTH: tl.constexpr, UNPACK: tl.constexpr):
    """x scaled by 2^-b for the field at bit SHIFT, b where UNPACK 1 masks it (_word_field); UNPACK 2: by
    2^-8, and 2^-4 more for the nibbles at bit 4 of a 16-bit lane (_q4_half2_dot)."""
    xs = x
    if UNPACK == 1:
        DOWN: tl.constexpr = 12 if WIDTH == 4 else 16
        B: tl.constexpr = SHIFT - DOWN if SHIFT + WIDTH > 23 else SHIFT
        if B > 0:
            xs = x * (1.0 / (1 << B))
    elif UNPACK == 2:  # the nibble at bit 4 of each 16-bit lane stays there: x / 16
        if SHIFT % 8 == 4:
            xs = x * (_HALF2_X_SCALE / 16)
        else:
            xs = x * _HALF2_X_SCALE
    return xs


@triton.jit
def _weight_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, r_off, k0, k_end, K, WIDTH: tl.constexpr,
                  GROUP: tl.constexpr, HAS_MIN: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr,
                  EVEN: tl.constexpr):
    """Weight rows rows64 + r_off at the K step from k0: int32 words [groups, rows, words of a group] and
    fp32 scales and mins [groups, rows] (mins: the scales again without them). Past k_end: all masked.
    EVEN (every row in range, the step whole and inside the matrix): constant masks, which fold away, so no
    zero-filled registers."""
    EPW: tl.constexpr = 32 // WIDTH
    gi = tl.arange(0, NG)
    wi = tl.arange(0, WPG)
    if EVEN:
        row_ok = tl.full(row_ok.shape, 1, tl.int1)
        g_ok = tl.full((NG,), 1, tl.int1)
    else:
        g_ok = k0 + gi * GROUP < k_end
    w_ok = tl.broadcast_to(g_ok[:, None], (NG, WPG))  # constant along a group's words: no split vectors
    words_per_row = tl.multiple_of(K // EPW, WPG)
    wrow = qw_ptr + (rows64 + r_off) * words_per_row + tl.multiple_of(k0 // EPW, WPG)
    wd = tl.load(wrow[None, :, None] + (gi[:, None] * WPG + wi[None, :])[:, None, :],
                 mask=row_ok[None, :, None] & w_ok[:, None, :], other=0)
    s_off = (rows64 + r_off)[None, :] * (K // GROUP) + (k0 // GROUP + gi)[:, None]
    s_ok = row_ok[None, :] & g_ok[:, None]
    s = tl.load(s_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)
    mn = s
    if HAS_MIN:
        mn = tl.load(m_ptr + s_off, mask=s_ok, other=0.0).to(tl.float32)
    return wd, s, mn


@triton.jit
def _gate_up_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k0, k_end, K, WIDTH: tl.constexpr,
                  GROUP: tl.constexpr, HAS_MIN: tl.constexpr, GATED: tl.constexpr, NG: tl.constexpr,
                  WPG: tl.constexpr, EVEN: tl.constexpr = False):
    """_weight_step of the rows and, for a gated weight, of their up rows at + N (else the first again)."""
    wd0, s0, m0 = _weight_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, 0, k0, k_end, K, WIDTH, GROUP, HAS_MIN, NG, WPG,
                               EVEN)
    wd1, s1, m1 = wd0, s0, m0
    if GATED != 0:
        wd1, s1, m1 = _weight_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k0, k_end, K,
                                   WIDTH, GROUP, HAS_MIN, NG, WPG, EVEN)
    return wd0, s0, m0, wd1, s1, m1


@triton.jit
def _word_bits(wd, WIDTH: tl.constexpr, UNPACK: tl.constexpr, SIGNED: tl.constexpr):
    """int32 words -> (uint32 words, their high part) as _word_field takes them."""
    if UNPACK == 1 and SIGNED:
        wd = wd ^ -2139062144  # 0x80808080: q + 128 in every byte
    wd = wd.to(tl.uint32, bitcast=True)  # logical shifts
    return wd, wd >> (12 if WIDTH == 4 else 16)


@triton.jit
def _pair_fields(xrow, nw_ptr, xk, w_ok, wd, w_hi, wu, u_hi, magic, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                 UNPACK: tl.constexpr, OFFSET: tl.constexpr, SIGNED: tl.constexpr, HAS_NORM: tl.constexpr,
                 GATED: tl.constexpr, X_PAIRS: tl.constexpr, p, pu, xsum, sq):
    """The fields at bits SHIFT and SHIFT + 8 (elements xk and xk + 1) against x: added to the running
    products p (pu: up tile) [groups, rows, words], x sums and sums of squares [groups, words]."""
    xa, xsa, qa, xb, xsb, qb = _word_x2(xrow, nw_ptr, xk, w_ok, SHIFT, SHIFT + 8, WIDTH, UNPACK, HAS_NORM, X_PAIRS)
    # One FFMA chain per word (p += field * x): a separate sum per pair costs an FMUL and an FADD more.
    p += _word_field(wd, w_hi, magic, SHIFT, WIDTH, UNPACK, OFFSET, SIGNED) * xsa[:, None, :]
    p += _word_field(wd, w_hi, magic, SHIFT + 8, WIDTH, UNPACK, OFFSET, SIGNED) * xsb[:, None, :]
    if GATED != 0:
        pu += _word_field(wu, u_hi, magic, SHIFT, WIDTH, UNPACK, OFFSET, SIGNED) * xsa[:, None, :]
        pu += _word_field(wu, u_hi, magic, SHIFT + 8, WIDTH, UNPACK, OFFSET, SIGNED) * xsb[:, None, :]
    return p, pu, xsum + xa + xb, sq + qa + qb


@triton.jit
def _word_dot(xrow, nw_ptr, wd, s, mn, wu, su, mu, k0, k_end, magic, WIDTH: tl.constexpr, GROUP: tl.constexpr,
              HAS_MIN: tl.constexpr, SIGNED: tl.constexpr, HAS_NORM: tl.constexpr, GATED: tl.constexpr,
              UNPACK: tl.constexpr, X_PAIRS: tl.constexpr, ASM: tl.constexpr, NG: tl.constexpr,
              WPG: tl.constexpr, EVEN: tl.constexpr = False):
    """One K step of the word scheme against x row xrow: the [groups, rows] contributions of the weight tile
    (and of the up tile, gated) and the [groups, words] sums of squares of x."""
    HALF: tl.constexpr = GROUP // 2
    # q4 sym: q - 8; q8 signed: (q + 128) after the xor, - 128; unsigned q8 / q4 with mins: q.
    OFFSET: tl.constexpr = (8 if not HAS_MIN else 0) if WIDTH == 4 else (128 if SIGNED else 0)
    gi = tl.arange(0, NG)
    wi = tl.arange(0, WPG)
    if EVEN:  # a constant mask folds away
        w_ok = tl.full((NG, WPG), 1, tl.int1)
    else:
        w_ok = tl.broadcast_to((k0 + gi * GROUP < k_end)[:, None], (NG, WPG))  # K is a multiple of GROUP
    e0 = k0 + gi[:, None] * GROUP + wi[None, :] * 4  # element of byte 0's field (q4: its low nibble)
    wd, w_hi = _word_bits(wd, WIDTH, UNPACK, SIGNED)
    wu, u_hi = _word_bits(wu, WIDTH, UNPACK, SIGNED)
    if UNPACK == 2:  # q4: the word's eight x first, then each word against their fp16 pairs
        x0, xs0, q0, x2, xs2, q2 = _word_x2(xrow, nw_ptr, e0, w_ok, 0, 8, WIDTH, UNPACK, HAS_NORM, X_PAIRS)
        x4, xs4, q4, x6, xs6, q6 = _word_x2(xrow, nw_ptr, e0 + 2, w_ok, 16, 24, WIDTH, UNPACK, HAS_NORM, X_PAIRS)
        x1, xs1, q1, x3, xs3, q3 = _word_x2(xrow, nw_ptr, e0 + HALF, w_ok, 4, 12, WIDTH, UNPACK, HAS_NORM,
                                            X_PAIRS)
        x5, xs5, q5, x7, xs7, q7 = _word_x2(xrow, nw_ptr, e0 + 2 + HALF, w_ok, 20, 28, WIDTH, UNPACK, HAS_NORM,
                                            X_PAIRS)
        xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        sq = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
        xp0 = _half2(xs0, xs4, ASM)[:, None, :]
        xp1 = _half2(xs1, xs5, ASM)[:, None, :]
        xp2 = _half2(xs2, xs6, ASM)[:, None, :]
        xp3 = _half2(xs3, xs7, ASM)[:, None, :]
        p = _q4_half2_dot(wd, xp0, xp1, xp2, xp3, HAS_MIN, ASM)
        pu = p
        if GATED != 0:
            pu = _q4_half2_dot(wu, xp0, xp1, xp2, xp3, HAS_MIN, ASM)
        t = tl.sum(p, axis=2) * (1.0 / _HALF2_X_SCALE)
        tu = tl.sum(pu, axis=2) * (1.0 / _HALF2_X_SCALE)
    else:
        # Fields in pairs of neighbouring elements, the fields of bytes 2i and 2i + 1 (q4: both low or both
        # high nibbles), so _word_x2 reads their x together.
        p = tl.zeros(wd.shape, tl.float32)
        pu = tl.zeros(wd.shape, tl.float32)
        xsum = tl.zeros((NG, WPG), tl.float32)
        sq = tl.zeros((NG, WPG), tl.float32)
        p, pu, xsum, sq = _pair_fields(xrow, nw_ptr, e0, w_ok, wd, w_hi, wu, u_hi, magic, 0, WIDTH, UNPACK, OFFSET,
                                       SIGNED, HAS_NORM, GATED, X_PAIRS, p, pu, xsum, sq)
        p, pu, xsum, sq = _pair_fields(xrow, nw_ptr, e0 + 2, w_ok, wd, w_hi, wu, u_hi, magic, 16, WIDTH, UNPACK,
                                       OFFSET, SIGNED, HAS_NORM, GATED, X_PAIRS, p, pu, xsum, sq)
        if WIDTH == 4:
            p, pu, xsum, sq = _pair_fields(xrow, nw_ptr, e0 + HALF, w_ok, wd, w_hi, wu, u_hi, magic, 4, WIDTH,
                                           UNPACK, OFFSET, SIGNED, HAS_NORM, GATED, X_PAIRS, p, pu, xsum, sq)
            p, pu, xsum, sq = _pair_fields(xrow, nw_ptr, e0 + 2 + HALF, w_ok, wd, w_hi, wu, u_hi, magic, 20, WIDTH,
                                           UNPACK, OFFSET, SIGNED, HAS_NORM, GATED, X_PAIRS, p, pu, xsum, sq)
        t = tl.sum(p, axis=2)
        tu = tl.sum(pu, axis=2)
    c = s * t
    cu = su * tu
    if HAS_MIN:
        gsum = tl.sum(xsum, axis=1)[:, None]
        c += mn * gsum
        cu += mu * gsum
    return c, cu, sq


@triton.jit
def _word_k_loop(xrow, nw_ptr, qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k_begin, k_end, K, magic,
                 wd0, s0, m0, wd1, s1, m1, WIDTH: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                 SIGNED: tl.constexpr, HAS_NORM: tl.constexpr, GATED: tl.constexpr, UNPACK: tl.constexpr,
                 X_PAIRS: tl.constexpr, ASM: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The word kernels' K loop over k_begin..k_end from the first step's tiles (wd0 .. m1, _gate_up_step):
    each step loads the next step's tiles before it computes (two register buffers). Returns the [groups,
    rows] partial sums of the gate (or only) rows and of the up rows, and x's sum of squares (HAS_NORM)."""
    # Tiles are [groups, rows, words of a group]: with the groups dimension ahead of the rows, the layout
    # puts a row's consecutive words in neighbouring threads (16 bytes each) and a warp's remaining threads
    # on further rows; each thread then holds BLOCK_N / (4 * num_warps)-ish rows of the same columns.
    acc = tl.zeros((NG, BLOCK_N), tl.float32)
    acc_u = tl.zeros((NG, BLOCK_N), tl.float32)
    ssv = tl.zeros((NG, WPG), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cw0, cs0, cm0 = wd0, s0, m0
        cw1, cs1, cm1 = wd1, s1, m1
        k_next = k0 + BLOCK_K
        if EVEN:  # the last step reloads itself instead of reading past the split (or the matrix)
            k_next = tl.minimum(k_next, k_end - BLOCK_K)
        wd0, s0, m0, wd1, s1, m1 = _gate_up_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k_next, k_end,
                                                  K, WIDTH, GROUP, HAS_MIN, GATED, NG, WPG, EVEN)
        c, cu, sq = _word_dot(xrow, nw_ptr, cw0, cs0, cm0, cw1, cs1, cm1, k0, k_end, magic, WIDTH, GROUP,
                              HAS_MIN, SIGNED, HAS_NORM, GATED, UNPACK, X_PAIRS, ASM, NG, WPG, EVEN)
        acc += c
        acc_u += cu
        ssv += sq
    return acc, acc_u, tl.sum(tl.sum(ssv, axis=1), axis=0)


@triton.jit
def _gemv_word_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, nw_ptr, res_ptr, out_ptr, part_ptr, ss_ptr, cnt_ptr,
                      ssi_ptr, nwo_ptr, xn_ptr, sso_ptr,
                      N, K, k_split, n_split, stride_rm, stride_om, eps, magic, n_parts,
                      WIDTH: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, SIGNED: tl.constexpr,
                      HAS_NORM: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                      NORMED: tl.constexpr, NORM_OUT: tl.constexpr, PARTS_BLOCK: tl.constexpr,
                      UNPACK: tl.constexpr, X_PAIRS: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    EPW: tl.constexpr = 32 // WIDTH  # elements per int32 word
    WPG: tl.constexpr = GROUP // EPW  # words per group
    k_begin = pid_k * k_split
    k_end = tl.minimum(K, k_begin + k_split)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    # The weights do not depend on the previous kernel: the first K step's tiles are loaded before the PDL
    # wait, and each step loads the next step's tiles before it computes (two register buffers).
    wd0, s0, m0, wd1, s1, m1 = _gate_up_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k_begin, k_end, K,
                                              WIDTH, GROUP, HAS_MIN, GATED, NG, WPG, EVEN)
    pdl.wait(PDL)
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    acc, acc_u, ss = _word_k_loop(x_ptr, nw_ptr, qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k_begin, k_end, K, magic,
                                  wd0, s0, m0, wd1, s1, m1, WIDTH, GROUP, HAS_MIN, SIGNED, HAS_NORM, GATED, UNPACK,
                                  X_PAIRS, ASM, NG, WPG, EVEN, BLOCK_N, BLOCK_K)
    acc, acc_u = _handed_scale(acc, acc_u, ssi_ptr, n_parts, K, eps, NORMED, PARTS_BLOCK)
    y, done = _row_epilogue(acc, acc_u, ss, rows, pid_n, pid_k, n_split, N, K, eps, part_ptr, ss_ptr, cnt_ptr,
                            res_ptr, stride_rm, out_ptr, stride_om, HAS_NORM, GATED, HAS_RES, SPLIT)
    if NORM_OUT:
        _norm_out(y, done, rows, N, nwo_ptr, xn_ptr, sso_ptr + pid_n)


# ---------------------------------------------------------------- M = 1: int8 activations, dp4a
#
# Even the word kernel spends ~3 instructions per weight (mask, FADD, FFMA) for 2 weights per byte of DRAM,
# which leaves big q4 matrices issue-bound. Here x is quantized to int8 instead, and four weights meet four
# activations in one dp4a (int8 x 4 dot product into int32):
# - x (times norm_weight; rstd stays the scalar applied at the end) is quantized per sub-group of a weight
#   group, symmetric, scale absmax / 127: for q4 the group's low and high nibble halves (G/2 elements each,
#   so the nibbles of a word line up with one x word), for q8 the whole group. Each program quantizes x for
#   its own K steps: x is tiny and in L2, and the cost is shared by BLOCK_N weight rows.
# - a q4 word gives its low nibbles (w & 0x0F0F0F0F) and high nibbles ((w >> 4) & 0x0F0F0F0F) as two words
#   of four unsigned bytes; q8 words feed dp4a as they are (signed, or unsigned for mins + 0..255).
# - per (row, sub-group) the int32 dot becomes fp32 once, times the x scale; q4's -8 (sym) or the min
#   (affine) enters per group through the sum of the dequantized int8 x: sum s(q - 8)x = s(sum qx - 8 sum x).
# Per 8 q4 weights: 3 unpack instructions and 2 dp4a (+ adds), against ~24 in the word kernel.
# Activation quantization costs accuracy (~0.5% relative error per output), so this path is opt-in.
# Under TRITON_INTERPRET=1 inline PTX cannot run: ASM=False computes the same integers with plain Triton ops.


@triton.jit
def _dp4a(a, b, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """int32 sum over the 4 bytes of a[i] * b[i] (b signed bytes; a signed or unsigned), elementwise."""
    if ASM:
        op: tl.constexpr = "dp4a.s32.s32 $0, $1, $2, $3;" if A_SIGNED else "dp4a.u32.s32 $0, $1, $2, $3;"
        return tl.inline_asm_elementwise(op, "=r,r,r,r", [a, b, tl.zeros_like(a)], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        d = tl.zeros_like(a + b)
        for j in tl.static_range(4):
            bj = (b << (24 - 8 * j)) >> 24  # arithmetic shift: the signed byte j
            if A_SIGNED:
                aj = (a << (24 - 8 * j)) >> 24
            else:
                aj = (a >> (8 * j)) & 255
            d += aj * bj
        return d


@triton.jit
def _round_even(v, ASM: tl.constexpr):
    """fp32 -> int32, to nearest, ties to even (cvt.rni; |v| <= 127.5 here, so v + 0.5 is exact)."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,f", [v], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        r = tl.floor(v + 0.5)
        tie_odd = ((r - v) == 0.5) & ((r.to(tl.int32) & 1) == 1)
        return r.to(tl.int32) - tie_odd.to(tl.int32)


@triton.jit
def _quant_x(x_ptr, nw_ptr, xk, ok, HAS_NORM: tl.constexpr, ASM: tl.constexpr):
    """x at element indices xk [groups, words, 4] as int8 words [groups, words], per-group scale and sum of
    the dequantized values [groups], and the raw sum of squares [groups] (for the norm)."""
    x = tl.load(x_ptr + xk, mask=ok, other=0.0).to(tl.float32)
    sq = tl.sum(tl.sum(x * x, axis=2), axis=1)
    if HAS_NORM:
        x = x * tl.load(nw_ptr + xk, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
    # div_rn: IEEE division, as the torch emulation in the tests does (plain / is approximate on the GPU)
    c127 = tl.full(amax.shape, 127.0, tl.float32)
    inv = tl.where(amax > 0, tl.math.div_rn(c127, tl.where(amax > 0, amax, 1.0)), 0.0)  # all-zero: q = 0
    scale = tl.math.div_rn(amax, c127)
    q = _round_even(x * inv[:, None, None], ASM)
    shift = 8 * tl.arange(0, 4)
    words = tl.sum((q & 255) << shift[None, None, :], axis=2)  # disjoint bytes: the sum is an OR
    xsum = scale * tl.sum(tl.sum(q, axis=2), axis=1).to(tl.float32)
    return words, scale, xsum, sq


@triton.jit
def _gemv_dp4a_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, nw_ptr, res_ptr, out_ptr, part_ptr, ss_ptr, cnt_ptr,
                      N, K, k_split, n_split, stride_rm, stride_om, eps,
                      WIDTH: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, SIGNED: tl.constexpr,
                      HAS_NORM: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                      ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr, EARLY: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    EPW: tl.constexpr = 32 // WIDTH
    WPG: tl.constexpr = GROUP // EPW
    k_begin = pid_k * k_split
    k_end = tl.minimum(K, k_begin + k_split)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    gi = tl.arange(0, NG)
    wi = tl.arange(0, WPG)
    ji = tl.arange(0, 4)
    # Weights loaded ahead, as in the word kernel.
    wd0, s0, m0, wd1, s1, m1 = _gate_up_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k_begin, k_end, K,
                                              WIDTH, GROUP, HAS_MIN, GATED, NG, WPG)
    pdl.wait(PDL)
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((NG, BLOCK_N), tl.float32)  # tiles [groups, rows, words]: as in the word kernel
    acc_u = tl.zeros((NG, BLOCK_N), tl.float32)
    ssv = tl.zeros((NG,), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cw0, cs0, cm0 = wd0, s0, m0
        cw1, cs1, cm1 = wd1, s1, m1
        wd0, s0, m0, wd1, s1, m1 = _gate_up_step(qw_ptr, s_ptr, m_ptr, rows64, row_ok, N, k0 + BLOCK_K, k_end,
                                                  K, WIDTH, GROUP, HAS_MIN, GATED, NG, WPG)
        g_ok = k0 + gi * GROUP < k_end
        # element of byte j of x word wi: q4 low nibbles (and + G/2 for the high ones), q8 bytes
        xk = (k0 + gi[:, None, None] * GROUP + wi[None, :, None] * 4) + ji[None, None, :]
        x_ok = tl.broadcast_to(g_ok[:, None, None], (NG, WPG, 4))
        xa, sa, suma, sqa = _quant_x(x_ptr, nw_ptr, xk, x_ok, HAS_NORM, ASM)
        xsum = suma
        ssv += sqa
        if WIDTH == 4:
            xb, sb, sumb, sqb = _quant_x(x_ptr, nw_ptr, xk + GROUP // 2, x_ok, HAS_NORM, ASM)
            xsum += sumb
            ssv += sqb
        for half in tl.static_range(2 if GATED != 0 else 1):
            if half == 0:
                wd, s, mn = cw0, cs0, cm0
            else:
                wd, s, mn = cw1, cs1, cm1
            if WIDTH == 4:
                ta = tl.sum(_dp4a(wd & 0x0F0F0F0F, xa[:, None, :], False, ASM), axis=2)
                tb = tl.sum(_dp4a((wd >> 4) & 0x0F0F0F0F, xb[:, None, :], False, ASM), axis=2)
                t = ta.to(tl.float32) * sa[:, None] + tb.to(tl.float32) * sb[:, None]
                if not HAS_MIN:
                    t -= 8.0 * xsum[:, None]
            else:
                ta = tl.sum(_dp4a(wd, xa[:, None, :], SIGNED, ASM), axis=2)
                t = ta.to(tl.float32) * sa[:, None]
            c = s * t
            if HAS_MIN:
                c += mn * xsum[:, None]
            if half == 0:
                acc += c
            else:
                acc_u += c
    ss = tl.sum(ssv, axis=0)
    _row_epilogue(acc, acc_u, ss, rows, pid_n, pid_k, n_split, N, K, eps, part_ptr, ss_ptr, cnt_ptr,
                  res_ptr, stride_rm, out_ptr, stride_om, HAS_NORM, GATED, HAS_RES, SPLIT)


@dataclass(frozen=True)
class NormOut:
    """Where a call hands its output row on pre-normed (linear's norm_out): the next norm's weight [N], the
    row times it (fp32 [1, N]) and the sums of squares of the row, one per column tile (fp32, >= that many)."""
    weight: torch.Tensor
    xn: torch.Tensor
    ss: torch.Tensor

    def for_next(self, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the next call reads (its x and norm_parts) after a producer that wrote `parts` sums."""
        return self.xn, self.ss[:parts]


def handoff_ok(w: PackedLinear, m: int) -> bool:
    """Whether a call on w with m rows runs the word kernel, so it can take part in a norm handoff."""
    return m == 1 and w.kind in ("q4", "q8") and DECODE_KERNEL == "word"


def norm_parts(w: PackedLinear, m: int = 1, config: GemvConfig | None = None) -> int:
    """How many sums of squares a norm_out call on w writes: its column tiles."""
    cfg = config or plan(w.n, w.k, m, w.kind, w.group, False)
    return triton.cdiv(w.n, cfg.block_n)


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    split: int  # programs along K (1: no split, no workspace)
    num_warps: int = 4
    # M = 1 q4/q8 only (other calls fall back to "byte", the general kernel): "word", the int32-word kernel
    # on fp32 x, or "dp4a", int8 x and integer dot products
    kernel: str = "word"
    unpack: int = 1  # word kernel: 0 shift every field down, 1 mask in place and pre-scale x, 2 fp16 pairs (q4)


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
        if DECODE_KERNEL == "dp4a":
            return _plan_dp4a(n_out, k, kind, group)
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


# q4 programs in flight: kernel_regs.py puts the word kernel at 168 registers (3 programs of 4 warps per SM)
# and its fp16-pair form (unpack 2) at 128 (4 per SM).
TARGET_PROGRAMS = 3 * N_SMS
HALF2_PROGRAMS = 4 * N_SMS
# The M = 1 q4/q8 kernel: "word" (fp32 activations, the default) or "dp4a" (int8; INGOT_DECODE_GEMV=dp4a).
DECODE_KERNEL = os.environ.get("INGOT_DECODE_GEMV", "word")
DP4A_TARGET_PROGRAMS = 512
# The word kernel's unpack form for ungated q4 calls (GemvConfig.unpack); INGOT_GEMV_UNPACK=2 for an A/B
# (fp16 pairs for every q4 call, at their HALF2_PROGRAMS).
WORD_UNPACK = int(os.environ.get("INGOT_GEMV_UNPACK", "1"))


def _plan_word(n_out: int, k: int, kind: str, group: int, gated: bool) -> GemvConfig:
    """M = 1 word kernel: 128 weight bytes per row per K step (one 16-byte load per thread per row), 128 rows
    per program (q8 gated: 64, whose gate and up tiles double the registers), so each thread reuses every
    x value it loads across its rows. K is split until the grid holds about TARGET_PROGRAMS programs (q8: 512);
    q8 gated calls about one per 48 KiB of weights (320 to 1152); q4 gated calls take fp16 pairs (unpack 2),
    and unpack 2 calls about HALF2_PROGRAMS. The decode step on the H200 (benchmarks/step_time.py,
    2026-12-03, with the norm handoff): TARGET_PROGRAMS 396 against 320, Qwen3-8B q4_0 2,749 against
    2,826 us, Llama-3.2-3B 1,662 against 1,644; then q4 gated as now against 64 rows, unpack 1, ~1 program
    per 48 KiB: 2,633 and 1,603 us.
    benchmarks/gemv_sweep.py's winners at the Qwen3-8B shapes (2026-12-02): q8 gate_up 64 rows against 128
    (33.6 / 38.8 against 52.5 us), q8 o/down/qkv at ~512 programs (8.9, 18.6, 11.5 us against 10.4, 26.0,
    14.5 at ~320)."""
    block_k = max(256 if kind == "q4" else 128, group)
    block_n = 128
    unpack = WORD_UNPACK if kind == "q4" else 1
    if gated and kind == "q4":
        unpack = 2
    programs = (HALF2_PROGRAMS if unpack == 2 else TARGET_PROGRAMS) if kind == "q4" else 512
    if gated and kind != "q4":
        block_n = 64
        programs = min(1152, max(320, round(2 * n_out * k / 49152)))
    return _split_for(GemvConfig(1, block_n, block_k, 1, num_warps=4, kernel="word", unpack=unpack), n_out, k,
                      programs)


def _plan_dp4a(n_out: int, k: int, kind: str, group: int) -> GemvConfig:
    """M = 1 dp4a kernel: 64 rows (q4) / 128 rows (q8) of 128 bytes per K step, K split until ~512 programs.
    benchmarks/gemv_ab.py on the H200 (2026-12-01): within 5% of the best of 4-6 tilings at every decode
    shape of Llama-3.2-1B and Qwen3-8B (qkv, o, gate_up, down, lm_head) but Qwen3-8B's q4 qkv (bn 128 s8)."""
    block_k = max(256 if kind == "q4" else 128, group)
    block_n = 64 if kind == "q4" else 128
    return _split_for(GemvConfig(1, block_n, block_k, 1, num_warps=4, kernel="dp4a"), n_out, k,
                      DP4A_TARGET_PROGRAMS)


# The word kernel reads x (and the norm weight) two fp32 elements a load (_word_x2); INGOT_GEMV_X_PAIRS=0 for
# one a load, the form before, for an A/B.
X_PAIRS = os.environ.get("INGOT_GEMV_X_PAIRS", "1") == "1"


def _pairs_ok(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.data_ptr() % 8 == 0


def _split_for(cfg: GemvConfig, n_out: int, k: int, programs: int) -> GemvConfig:
    """cfg with K split so that the grid holds about `programs` programs, and no split is empty (the K tiles
    a split takes rounded up). Rounding them to the nearest whole number instead won the lone-kernel sweep at
    one shape (Qwen3-8B's q4 qkv, 9.5 against 11.5 us) but lost the whole decode step on the H200
    (2026-12-02, benchmarks/step_time.py): Qwen3-8B q4_0 3,862 against 3,685 us, q8_0 3,626 against 3,479,
    Llama-3.2-3B q4_0 2,086 against 1,999."""
    tiles_n = triton.cdiv(n_out, cfg.block_n)
    k_tiles = triton.cdiv(k, cfg.block_k)
    split = max(1, min(round(programs / tiles_n), k_tiles))
    return dataclasses.replace(cfg, split=triton.cdiv(k_tiles, triton.cdiv(k_tiles, split)))


def whole_tiles(n_out: int, k: int, block_n: int, block_k: int) -> bool:
    """Whether a word kernel's tiles cover n_out x k exactly (its EVEN: no masks). K splits stay whole, as
    _k_split makes each a multiple of block_k."""
    return n_out % block_n == 0 and k % block_k == 0


def _k_split(k: int, cfg: GemvConfig) -> int:
    return triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split) * cfg.block_k


SPLIT_COUNTERS = 1024  # int32 ticket counters at the head of every split-K workspace, one per column tile


def _split_layout(n_w: int, m: int, tiles_n: int, splits: int) -> tuple[int, int]:
    """(where partials start, total fp32 elements) of a split call's workspace: SPLIT_COUNTERS ticket counters
    first, the same slots for every call (each call leaves its own at 0, and no call's data overlaps another
    call's counters), then sums of squares, then partials."""
    if tiles_n > SPLIT_COUNTERS:
        raise ValueError(f"a split-K call of {tiles_n} column tiles exceeds the workspace's {SPLIT_COUNTERS} counters")
    head = SPLIT_COUNTERS + tiles_n * splits * m
    head = -(-head // 4) * 4  # partials 16-byte aligned
    return head, head + splits * m * n_w


def _split_buffers(workspace, out, n_w: int, m: int, tiles_n: int, splits: int):
    """(ticket counters, sums of squares, partials) of a call in the shared workspace layout; an unsplit call
    gets `out` in their place (its kernel never touches them); a split call without a workspace, a zeroed one."""
    if splits == 1:
        return out.view(torch.int32), out, out
    head, need = _split_layout(n_w, m, tiles_n, splits)
    if workspace is None:
        workspace = torch.zeros(need, device=out.device, dtype=torch.float32)
    if workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous():
        raise ValueError(f"workspace must be contiguous fp32 of >= {need} elements, zeroed when allocated")
    return workspace[:tiles_n].view(torch.int32), workspace[SPLIT_COUNTERS:head], workspace[head:]


def workspace_numel(w: PackedLinear, m: int, gated: str | None = None, config: GemvConfig | None = None) -> int:
    """fp32 elements the split-K path needs for this call (0 when it does not split). The workspace must be
    allocated zeroed (torch.zeros): its first elements are ticket counters that every call leaves at 0."""
    if w.kind == "q6k":
        from ingot.backends.cuda import gemv_q6k  # it builds on this module's split-K helpers

        return gemv_q6k.workspace_numel(w, m)
    n_out = w.n // 2 if gated else w.n
    cfg = config or plan(n_out, w.k, m, w.kind, w.group, bool(gated))
    splits = triton.cdiv(w.k, _k_split(w.k, cfg))
    return 0 if splits == 1 else _split_layout(w.n, m, triton.cdiv(n_out, cfg.block_n), splits)[1]


def linear(x: torch.Tensor, w: PackedLinear, *, out: torch.Tensor | None = None,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
           gated: str | None = None, workspace: torch.Tensor | None = None,
           config: GemvConfig | None = None, norm_parts: torch.Tensor | None = None,
           norm_out: NormOut | None = None) -> torch.Tensor:
    """out[M, N] (fp32) = [residual +] x' @ W^T, or act(x' @ Wg^T) * (x' @ Wu^T) with `gated`;
    x' = rms_norm(x, norm_weight, eps) when norm_weight is given. x: fp32 or fp16 [M, K], rows contiguous.
    `workspace`: fp32, zeroed once when allocated (see workspace_numel); without it a split call allocates.

    The norm handed on between two M = 1 word-kernel calls (handoff_ok), which saves the second call
    reading the norm weight beside x (in the decode step that cost as much as 50% of a normed GEMV):
    - norm_out: this call (its output a residual row that the next call norms) also writes norm_out.xn =
      out * norm_out.weight and, in norm_out.ss, the sums of squares of out, one per column tile
      (norm_parts(...) of them);
    - norm_parts: x is such an xn and norm_parts those sums; x' = x * rsqrt(sum(norm_parts) / K + eps)."""
    if w.kind == "q6k":  # GGML Q6_K at its own 6.56 bits per weight: its own kernel
        from ingot.backends.cuda import gemv_q6k

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
    if (norm_parts is not None or norm_out is not None) and not (handoff_ok(w, m) and cfg.kernel == "word"):
        raise ValueError("norm_parts / norm_out need the M = 1 word kernel (q4 / q8 weights)")
    if norm_parts is not None and norm_weight is not None:
        raise ValueError("give norm_weight or norm_parts, not both")
    if out is None:
        out = torch.empty(m, n_out, device=x.device, dtype=torch.float32)
    assert out.shape == (m, n_out) and out.dtype == torch.float32 and out.stride(1) == 1
    if residual is not None:
        assert residual.shape == (m, n_out) and residual.stride(1) == 1
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    k_split = _k_split(k, cfg)
    splits = triton.cdiv(k, k_split)
    tiles_n = triton.cdiv(n_out, cfg.block_n)
    if norm_out is not None:
        assert not gated and norm_out.weight.shape == (n_out,) and norm_out.xn.shape == (1, n_out)
        assert norm_out.ss.numel() >= tiles_n and norm_out.xn.stride(1) == 1
    cnt, ss, part = _split_buffers(workspace, out, w.n, m, tiles_n, splits)
    res = residual if residual is not None else out
    flags = dict(HAS_NORM=norm_weight is not None, GATED=GATED_IDS[gated], HAS_RES=residual is not None)
    common = (norm_weight if norm_weight is not None else x, res, out, part, ss, cnt)
    if cfg.kernel not in ("byte", "word", "dp4a"):
        raise ValueError(f"unknown gemv kernel {cfg.kernel!r}")
    word_like = m == 1 and w.kind != "f16"
    if word_like and cfg.kernel in ("word", "dp4a"):
        assert cfg.block_k % w.group == 0 and w.qweight.is_contiguous()
        if cfg.kernel == "word":
            if cfg.unpack == 2 and w.kind != "q4":
                raise ValueError(f"the word kernel's fp16 pairs (unpack 2) take q4 weights, not {w.kind}")
            pairs = X_PAIRS and _pairs_ok(x) and (norm_weight is None or _pairs_ok(norm_weight))
            ssi, n_parts, handed = handed_args(norm_parts, out)
            kernel, args_before, args_after, extra = _gemv_word_kernel, (ssi, *norm_out_args(norm_out, out)), (
                MAGIC, n_parts), dict(UNPACK=cfg.unpack, X_PAIRS=pairs,
                                      EVEN=whole_tiles(n_out, k, cfg.block_n, cfg.block_k),
                                      NORM_OUT=norm_out is not None, **handed)
        else:
            kernel, args_before, args_after, extra = _gemv_dp4a_kernel, (), (), {}
        # inline PTX only on a GPU; the interpreter runs the same arithmetic in plain ops
        extra.update(ASM=os.environ.get("TRITON_INTERPRET") != "1", EARLY=pdl.EARLY)
        kernel[(tiles_n, splits)](
            x, w.qweight.view(torch.int32), w.scales, w.mins if w.mins is not None else w.scales, *common,
            *args_before, n_out, k, k_split, splits, res.stride(0), out.stride(0), eps, *args_after,
            WIDTH=4 if w.kind == "q4" else 8, GROUP=w.group, HAS_MIN=w.mins is not None,
            SIGNED=w.qweight.dtype == torch.int8, SPLIT=splits > 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, **pdl.LAUNCH, **extra, **flags)
    else:
        group = w.group if w.kind != "f16" else F16_PSEUDO_GROUP
        no_scale = w.qweight  # f16: any pointer, never read
        _gemv_kernel[(tiles_n, splits)](
            x, w.qweight, w.scales if w.scales is not None else no_scale, w.mins if w.mins is not None else no_scale,
            *common, m, n_out, k, k_split, splits, x.stride(0), res.stride(0), out.stride(0), eps,
            KIND=KIND_IDS[w.kind], GROUP=group, HAS_MIN=w.mins is not None, SPLIT=splits > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            **pdl.LAUNCH, **flags)
    return out


@triton.jit
def _embed_kernel(ids_ptr, qw_ptr, s_ptr, m_ptr, out_ptr, K, stride_om, scale,
                  KIND: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_K: tl.constexpr,
                  PDL: tl.constexpr):
    pdl.wait(PDL)
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
        from ingot.backends.cuda import gemv_q6k

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
        KIND=KIND_IDS[table.kind], GROUP=group, HAS_MIN=table.mins is not None, BLOCK_K=bk, num_warps=4,
        **pdl.LAUNCH)
    return out
