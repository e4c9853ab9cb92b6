"""Prefill GEMM: out[M, N] = x[M, K] @ W[N, K]^T with W packed (ingot.quant.pack), on the tensor cores.

Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in BLOCK_K steps: it loads the packed weight
tile, dequantizes it in registers (scales/mins in fp32, the product rounded to fp16) and feeds tl.dot with
an fp16 activation tile (fp32 x is converted in the kernel, sparing a pass), accumulating in fp32. fp16
rather than bf16 by default because its 10-bit mantissa keeps the result within ~1e-3 of the fp32 oracle;
the weights are O(1), and the activations a prefill GEMM sees (normed hidden states, attention outputs, MLP
products) normally are far below fp16's 65504. A model whose MLP products can pass that (Gemma-style
activations are the known risk) passes dot_dtype=torch.bfloat16: same kernel, bf16 operands, ~4e-3 error.

q4 tiles always cover whole scale groups. Byte i of a group holds element i (low nibble) and i + G/2 (high
nibble), so the low nibbles of a tile form a [BLOCK_N, BLOCK_K/2] matrix whose columns are the first halves of
the tile's groups, and the high nibbles one over the second halves. Rather than re-interleave them, the
kernel gathers the matching activation columns and issues two dots (x_lo @ w_lo^T + x_hi @ w_hi^T): the x
gather reads runs of G/2 contiguous values, which is coalesced enough, and no register shuffle is needed.

Epilogues: residual add (residual may alias out: every element is read and written by the same program) and a
gated activation, where W has 2F rows [gate; up] and each program computes the matching gate and up tiles so
out[M, F] = act(x @ Wg^T) * (x @ Wu^T) never round-trips through memory. The optional RMSNorm prologue is a
separate small kernel writing normalized fp16 (bf16) rows into a buffer: prefill is not graph-captured, and a pass
over M x K activations is negligible next to the M x N x K GEMM.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import gemv, gemv_q6k

_KINDS = {"q4": 0, "q8": 1, "f16": 2}
_ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}
_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 1:
        return g / (1.0 + tl.exp(-g))
    # gelu_tanh; tanh(y) = 2 * sigmoid(2y) - 1 keeps it to one exp, and saturates correctly at +-inf.
    y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return g / (1.0 + tl.exp(-2.0 * y))


@triton.jit
def _group_params(ptr, row_s, k0, K, n_mask, GROUP: tl.constexpr, STEP: tl.constexpr, SPAN: tl.constexpr,
                  NS: tl.constexpr, BLOCK_N: tl.constexpr, TY: tl.constexpr = tl.float32):
    """Per-group scales (or mins) for NS runs of SPAN tile columns, run i starting at K column k0 + i*STEP,
    loaded once per group and broadcast in registers to [BLOCK_N, NS * SPAN]: gathering them per element
    would cost a load per weight."""
    g = (k0 + tl.arange(0, NS) * STEP) // GROUP
    v = tl.load(ptr + row_s + g[None, :], mask=n_mask[:, None] & (g < K // GROUP)[None, :], other=0.0)
    v = tl.broadcast_to(v.to(TY)[:, :, None], (BLOCK_N, NS, SPAN))
    return tl.reshape(v, (BLOCK_N, NS * SPAN))


@triton.jit
def _tile_cols(k0, K, KIND: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """K columns of this tile's dot operand and their mask. q4: the low-nibble columns of each group (the
    high ones are G/2 further on); K is a multiple of GROUP, so a group is wholly in or out."""
    if KIND == 0:
        j = tl.arange(0, BLOCK_K // 2)
        cols = k0 + (j // (GROUP // 2)) * GROUP + (j % (GROUP // 2))
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
    return cols, cols < K


@triton.jit
def _x_tiles(x_ptr, stride_xm, offs_m, m_mask, k0, K,
             KIND: tl.constexpr, GROUP: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activation operand(s) for one K step: (low-half columns, high-half columns) for q4, else the
    tile twice. Loaded once per step even when the gated path runs two dots on it."""
    cols, k_mask = _tile_cols(k0, K, KIND, GROUP, BLOCK_K)
    ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    mask = m_mask[:, None] & k_mask[None, :]
    x_a = tl.load(ptrs, mask=mask, other=0.0).to(DOT)
    if KIND == 0:
        x_b = tl.load(ptrs + GROUP // 2, mask=mask, other=0.0).to(DOT)
    else:
        x_b = x_a
    return x_a, x_b


# fp16 bit tricks (FAST >= 1): an fp16 whose exponent field reads 0x64.. is 1024 + its 10-bit mantissa, so OR-ing a
# nibble (or adding a biased byte) into 0x6400 and subtracting 1024 (+ the bias) gives the quant as an exact fp16
# with integer-ALU ops alone: no int->float conversion (quarter-rate on the H100) and no fp32 round trip. The
# scale (and min) are then applied in fp16 (one rounding: exact for fp16 scales, fp32 scales are rounded to fp16).
# FAST == 2 does the same on 32-bit words in inline PTX: prmt spreads 2 bytes into the halves of a word, one lop3
# masks and ORs in the exponent, and sub/mul/fma.f16x2 do two weights per instruction.

_ASM_Q4 = """{
.reg .b32 t, u, c;
mov.b32 c, %(bias)s;
prmt.b32 t, $4, 0, 0x4140;
shr.b32 u, t, 4;
lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea;
lop3.b32 $2, u, 0x000f000f, 0x64006400, 0xea;
prmt.b32 t, $4, 0, 0x4342;
shr.b32 u, t, 4;
lop3.b32 $1, t, 0x000f000f, 0x64006400, 0xea;
lop3.b32 $3, u, 0x000f000f, 0x64006400, 0xea;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
sub.f16x2 $2, $2, c;
sub.f16x2 $3, $3, c;
%(apply)s
}"""
_ASM_Q4_SYM = tl.constexpr(_ASM_Q4 % dict(bias="0x64086408", apply="""mul.rn.f16x2 $0, $0, $5;
mul.rn.f16x2 $1, $1, $6;
mul.rn.f16x2 $2, $2, $5;
mul.rn.f16x2 $3, $3, $6;"""))
_ASM_Q4_MINS = tl.constexpr(_ASM_Q4 % dict(bias="0x64006400", apply="""fma.rn.f16x2 $0, $0, $5, $7;
fma.rn.f16x2 $1, $1, $6, $8;
fma.rn.f16x2 $2, $2, $5, $7;
fma.rn.f16x2 $3, $3, $6, $8;"""))
_ASM_Q8 = """{
.reg .b32 t, c;
mov.b32 c, %(bias)s;
%(flip)s
prmt.b32 $0, t, 0x64646464, 0x5150;
prmt.b32 $1, t, 0x64646464, 0x5352;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
%(apply)s
}"""
_ASM_Q8_SYM = tl.constexpr(_ASM_Q8 % dict(flip="xor.b32 t, $2, 0x80808080;", bias="0x64806480", apply="""mul.rn.f16x2 $0, $0, $3;
mul.rn.f16x2 $1, $1, $4;"""))
_ASM_Q8_SYM_MINS = tl.constexpr(_ASM_Q8 % dict(flip="xor.b32 t, $2, 0x80808080;", bias="0x64806480", apply="""fma.rn.f16x2 $0, $0, $3, $5;
fma.rn.f16x2 $1, $1, $4, $6;"""))
_ASM_Q8_U_MINS = tl.constexpr(_ASM_Q8 % dict(flip="mov.b32 t, $2;", bias="0x64006400", apply="""fma.rn.f16x2 $0, $0, $3, $5;
fma.rn.f16x2 $1, $1, $4, $6;"""))


@triton.jit
def _q4_fast(q, scale, mn, HAS_MINS: tl.constexpr, FAST: tl.constexpr):
    """uint8 nibble pairs -> (low, high) fp16 weights; scale/mn are fp16 of q's shape."""
    if FAST == 2:
        if HAS_MINS:
            w_lo, w_hi = tl.inline_asm_elementwise(_ASM_Q4_MINS, "=r,=r,=r,=r,r,r,r,r,r", [q, scale, mn],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            w_lo, w_hi = tl.inline_asm_elementwise(_ASM_Q4_SYM, "=r,=r,=r,=r,r,r,r", [q, scale],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        q16 = q.to(tl.uint16)
        lo = ((q16 & 0xF) | 0x6400).to(tl.float16, bitcast=True)
        hi = ((q16 >> 4) | 0x6400).to(tl.float16, bitcast=True)
        if HAS_MINS:
            w_lo = (lo - 1024.0) * scale + mn
            w_hi = (hi - 1024.0) * scale + mn
        else:
            w_lo = (lo - 1032.0) * scale
            w_hi = (hi - 1032.0) * scale
    return w_lo, w_hi


@triton.jit
def _q8_fast(q, scale, mn, HAS_MINS: tl.constexpr, FAST: tl.constexpr):
    """int8 (or uint8 with mins) -> fp16 weights; scale/mn are fp16 of q's shape."""
    signed: tl.constexpr = q.dtype == tl.int8
    if FAST == 2:
        if HAS_MINS:
            if signed:
                w = tl.inline_asm_elementwise(_ASM_Q8_SYM_MINS, "=r,=r,r,r,r,r,r", [q, scale, mn],
                                              dtype=tl.float16, is_pure=True, pack=4)
            else:
                w = tl.inline_asm_elementwise(_ASM_Q8_U_MINS, "=r,=r,r,r,r,r,r", [q, scale, mn],
                                              dtype=tl.float16, is_pure=True, pack=4)
        else:
            w = tl.inline_asm_elementwise(_ASM_Q8_SYM, "=r,=r,r,r,r", [q, scale],
                                          dtype=tl.float16, is_pure=True, pack=4)
    else:
        if signed:
            # q + 128 in the mantissa: bits 0x6400 + q + 128, value 1152 + q.
            v = (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        else:
            v = (q.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        if HAS_MINS:
            w = v * scale + mn
        else:
            w = v * scale
    return w


@triton.jit
def _dot_tile(acc, x_a, x_b, k0, K, qw_ptr, stride_qn, s_ptr, mn_ptr, stride_sn, rows, n_mask,
              KIND: tl.constexpr, GROUP: tl.constexpr, SPAN: tl.constexpr, HAS_MINS: tl.constexpr,
              DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              FAST: tl.constexpr, SWAP: tl.constexpr):
    """acc += x_tile @ W[rows, k0:k0+BLOCK_K]^T, dequantizing W on the fly (SWAP: acc^T += W_tile @ x_tile^T,
    so the dequantized W is wgmma's register operand A and never goes through shared memory)."""
    row_off = rows.to(tl.int64)
    s_row = row_off[:, None] * stride_sn
    cols, k_mask = _tile_cols(k0, K, KIND, GROUP, BLOCK_K)
    w_mask = n_mask[:, None] & k_mask[None, :]
    fast: tl.constexpr = FAST != 0 and DOT == tl.float16
    if KIND == 0:
        # Byte j of the tile holds columns cols[j] (low nibble) and cols[j] + G/2 (high nibble).
        j = tl.arange(0, BLOCK_K // 2)
        q = tl.load(qw_ptr + row_off[:, None] * stride_qn + (k0 // 2 + j)[None, :], mask=w_mask, other=0)
        if fast:
            scale = _group_params(s_ptr, s_row, k0, K, n_mask, GROUP, GROUP, SPAN, BLOCK_K // GROUP, BLOCK_N,
                                  tl.float16)
            mn = scale
            if HAS_MINS:
                mn = _group_params(mn_ptr, s_row, k0, K, n_mask, GROUP, GROUP, SPAN, BLOCK_K // GROUP, BLOCK_N,
                                   tl.float16)
            w_lo, w_hi = _q4_fast(q, scale, mn, HAS_MINS, FAST)
        else:
            q = q.to(tl.int32)
            scale = _group_params(s_ptr, s_row, k0, K, n_mask, GROUP, GROUP, SPAN, BLOCK_K // GROUP, BLOCK_N)
            q_lo = (q & 0xF).to(tl.float32)
            q_hi = (q >> 4).to(tl.float32)
            if HAS_MINS:
                mn = _group_params(mn_ptr, s_row, k0, K, n_mask, GROUP, GROUP, SPAN, BLOCK_K // GROUP, BLOCK_N)
                w_lo = (q_lo * scale + mn).to(DOT)
                w_hi = (q_hi * scale + mn).to(DOT)
            else:
                w_lo = ((q_lo - 8.0) * scale).to(DOT)
                w_hi = ((q_hi - 8.0) * scale).to(DOT)
        if SWAP:
            acc = tl.dot(w_lo, tl.trans(x_a), acc)
            acc = tl.dot(w_hi, tl.trans(x_b), acc)
        else:
            acc = tl.dot(x_a, tl.trans(w_lo), acc)
            acc = tl.dot(x_b, tl.trans(w_hi), acc)
    else:
        w = tl.load(qw_ptr + row_off[:, None] * stride_qn + cols[None, :], mask=w_mask, other=0)
        if KIND == 1:
            # A tile spans several groups (SPAN = G < BLOCK_K) or sits inside one (SPAN = BLOCK_K).
            if fast:
                scale = _group_params(s_ptr, s_row, k0, K, n_mask, GROUP, SPAN, SPAN, BLOCK_K // SPAN, BLOCK_N,
                                      tl.float16)
                mn = scale
                if HAS_MINS:
                    mn = _group_params(mn_ptr, s_row, k0, K, n_mask, GROUP, SPAN, SPAN, BLOCK_K // SPAN, BLOCK_N,
                                       tl.float16)
                w = _q8_fast(w, scale, mn, HAS_MINS, FAST)
            else:
                scale = _group_params(s_ptr, s_row, k0, K, n_mask, GROUP, SPAN, SPAN, BLOCK_K // SPAN, BLOCK_N)
                if HAS_MINS:
                    mn = _group_params(mn_ptr, s_row, k0, K, n_mask, GROUP, SPAN, SPAN, BLOCK_K // SPAN, BLOCK_N)
                    w = (w.to(tl.float32) * scale + mn).to(DOT)
                else:
                    w = (w.to(tl.float32) * scale).to(DOT)
        else:
            w = w.to(DOT)
        if SWAP:
            acc = tl.dot(w, tl.trans(x_a), acc)
        else:
            acc = tl.dot(x_a, tl.trans(w), acc)
    return acc


# M varies from call to call (a server's steps mix chunks and decode rows): unspecialized, so a new row
# count never recompiles the kernel (Triton would otherwise specialize on M == 1 and M % 16 == 0).
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, mn_ptr, res_ptr, out_ptr, part_ptr, ss_ptr, cnt_ptr,
                 M, N_OUT, K, k_split, n_split, stride_xm, stride_qn, stride_sn, stride_rm, stride_om,
                 KIND: tl.constexpr, GROUP: tl.constexpr, SPAN: tl.constexpr, HAS_MINS: tl.constexpr,
                 ACT: tl.constexpr, HAS_RES: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FAST: tl.constexpr = 0, SWAP: tl.constexpr = 0, SPLIT: tl.constexpr = 0):
    # M varies fastest across consecutive programs: those running together share one weight tile, so W
    # streams from DRAM about once while the (much smaller) activations stay resident in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc
    # A split program (SPLIT: one M tile, see _splits) takes k_split columns (whole K steps) of K. Said to be a
    # multiple of BLOCK_K, or the compiler knows only k_split's 16, q4's byte offsets (k0 / 2) lose their
    # 16-byte alignment and the weight tiles arrive in 8-byte async copies (benchmarks/kernel_regs.py --gemm):
    # the likely cause of Qwen3-8B Q4_0 pp512 falling from 16,330 to ~14,150 tok/s on the H200 after 78e9749,
    # while Q8_0, whose byte offsets kept their alignment, did not fall.
    k_lo = tl.multiple_of(pid_k * k_split, BLOCK_K)
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_split), BLOCK_K):
        x_a, x_b = _x_tiles(x_ptr, stride_xm, offs_m, m_mask, k0, K, KIND, GROUP, DOT, BLOCK_K)
        acc = _dot_tile(acc, x_a, x_b, k0, K, qw_ptr, stride_qn, s_ptr, mn_ptr, stride_sn, offs_n, n_mask,
                        KIND, GROUP, SPAN, HAS_MINS, DOT, BLOCK_N, BLOCK_K, FAST, SWAP)
        if ACT != 0:
            # Up rows sit N_OUT (= F) rows below the gate rows.
            acc_up = _dot_tile(acc_up, x_a, x_b, k0, K, qw_ptr, stride_qn, s_ptr, mn_ptr, stride_sn,
                               offs_n + N_OUT, n_mask, KIND, GROUP, SPAN, HAS_MINS, DOT, BLOCK_N, BLOCK_K,
                               FAST, SWAP)

    if SPLIT:  # partial sums to the workspace; the column tile's last program adds them up and finishes
        if SWAP:
            acc = tl.trans(acc)
            acc_up = tl.trans(acc_up)
        gemv._split_finish(acc, acc_up, tl.zeros((BLOCK_M,), tl.float32), offs_m, offs_n, pid_n, pid_k, n_split,
                           M, N_OUT, K, 0.0, part_ptr, ss_ptr, cnt_ptr, res_ptr, stride_rm, out_ptr, stride_om,
                           False, ACT, HAS_RES)
    else:
        if ACT != 0:
            acc = _act(acc, ACT) * acc_up
        if SWAP:
            acc = tl.trans(acc)
        o_mask = m_mask[:, None] & n_mask[None, :]
        m64 = offs_m.to(tl.int64)[:, None]
        if HAS_RES:
            acc += tl.load(res_ptr + m64 * stride_rm + offs_n[None, :], mask=o_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m64 * stride_om + offs_n[None, :], acc, mask=o_mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, K, stride_xm, stride_ym, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        sq += v * v
    inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + offs, (v * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_half(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float16, block: int = 1024) -> torch.Tensor:
    """rms_norm(x) * weight (math in fp32) rounded to fp16/bf16 rows: the prologue of matmul(norm_weight=)."""
    M, K = x.shape
    if out is None:
        out = torch.empty((M, K), device=x.device, dtype=dtype)
    if out.dtype not in _DOT or out.shape != (M, K) or out.stride(1) != 1:
        raise ValueError(f"norm_out must be fp16/bf16 {(M, K)} with contiguous rows")
    x = x if x.stride(1) == 1 else x.contiguous()
    block = min(block, triton.next_power_of_2(K))
    _rms_norm_kernel[(M,)](x, weight, out, K, x.stride(0), out.stride(0), float(eps), BLOCK=block)
    return out


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SMEM_BUDGET = 200 * 1024  # of the H100's 227 KiB per block, leaving room for the epilogue's layout shuffles
_W_BYTES = {"q4": 0.5, "q8": 1.0, "f16": 2.0}


def _tiles(bm, bn, bk, warps, stages, swap=0):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, FAST=2, SWAP=swap)


def _swept_tiles(M: int, N: int, kind: str, group: int, gated: bool, x_bytes: int) -> dict | None:
    """Full prefill chunks (M >= 256): the winners of benchmarks/prefill_sweep.py on the H100 (2026-11-24,
    M=512, the Llama-3.2-1B/3B and Qwen3-8B matrices), by the role the shape plays. None where the sweep
    had no clear winner (short chunks; q8 group-16 except gated): pick_tiles' general rule applies."""
    if M < 256 or kind not in ("q4", "q8"):
        return None
    q6k = kind == "q8" and group < 32  # GGUF Q6_K's exact form: q8, group 16, fp32 scales
    if gated:  # gate/up: fp16 activations, two weight tiles
        if kind == "q4":
            return _tiles(128, 64, max(128, group), 4, 3, swap=1)
        return _tiles(256, 64, 64, 8, 3, swap=1 if q6k else 0)
    if q6k:
        return None
    if x_bytes == 2:  # qkv: fp16 activations from the norm pre-pass
        if kind == "q4" and N >= 5000:
            return _tiles(256, 128, 64, 8, 3)
        return _tiles(128, 64, max(128, group) if kind == "q4" else 64, 4, 3, swap=1)
    # o / down: fp32 activations plus the residual epilogue
    if kind == "q4":
        return _tiles(128, 128, max(128, group), 8, 3) if N >= 3072 else _tiles(64, 128, max(128, group), 4, 4)
    return _tiles(64, 128, 64, 4, 4)


def _short_tiles(M: int, kind: str, group: int) -> dict | None:
    """Batched decode rows: 16-row tiles (32 for q4 above 16 rows), not the general rule's 64, whose
    padding rows the tensor cores would compute and whose x tiles crowd the weights out of shared memory.
    benchmarks/prefill_sweep.py --m 8/16/32 on the H200 (2026-12-02), Qwen3-8B, the summed GEMMs of one
    step: q4_0 at 8 rows 14.0 -> 4.8 ms (cuBLAS on fp16 weights 4.3), at 16 14.6 -> 4.9, at 32 14.8 -> 6.0;
    q8_0 at 8 rows 8.3 -> 4.7. q4 wins swapped (the dequantized W feeds wgmma from registers), q8 as
    mma.sync dots; None where no sweep ran (q8 above 16 rows, f16)."""
    if kind == "q4" and M <= 32:
        bk = max(128, group)
        return _tiles(16, 64, bk, 4, 4, swap=1) if M <= 16 else _tiles(32, 128, bk, 8, 4, swap=1)
    if kind == "q8" and M <= 16:
        return _tiles(16, 64, 128, 4, 4, swap=0)
    return None


def pick_tiles(M: int, N: int, K: int, kind: str, group: int, gated: bool, x_bytes: int = 2) -> dict:
    """H100 tiles: BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages.

    128x128x64 fp16 tiles with 8 warps are the shape wgmma wants: two warpgroups each own a 64x128 slice of
    the accumulator, and a tile does 2*128*128*64 FLOP per (16 KiB of x + <= 16 KiB of W) loaded, which with
    the weights streaming once from DRAM and x reused from L2 keeps the tensor cores rather than memory the
    limit. The dequantization is amortized over BLOCK_M rows, another reason to keep BLOCK_M at 128 when M
    allows. q4 uses a K step of 128 so every group size (16..128) is tile-aligned and each unpacked byte
    feeds a 64-deep dot on both halves. Gated tiles carry two W tiles and two accumulators, so BLOCK_N
    halves to keep the accumulators (2 x 128x64 fp32 over 256 threads = 64 registers each) from spilling.
    Short chunks (M <= 64) take BLOCK_M = 64, and BLOCK_N narrows while the grid is under two waves of
    the 132 SMs. Stages: as many (<= 4) as fit the shared-memory budget, so the next K steps' loads are in
    flight behind the current dots; fp32 activations double the x tile, hence x_bytes. Compiled offline for
    sm_90 with triton 3.6, every kind/epilogue lowers to wgmma with async-copied x and W tiles, 72-196
    registers, no spills, 53-188 KiB of shared memory. Untimed so far: the numbers are a starting point.

    FAST: 0 = dequantize through fp32 (int->float conversions, the original path), 1 = fp16 bit tricks in
    Triton ops, 2 = the same in inline PTX on 32-bit words (the interpreter runs 1 instead). Offline for
    sm_90 a q4 128x128x128 tile drops from 64 int->float conversions per step (223 cvt in all) to none (29
    cvt, 32 lop3, 16 prmt). SWAP=1 computes out^T = W @ x^T so the dequantized W feeds wgmma from
    registers (no shared-memory round trip) and BLOCK_M (wgmma's N) can reach 256, halving the times each
    weight is dequantized at M=512; ptxas warns its wgmmas serialize, so it is off until
    benchmarks/prefill_sweep.py says otherwise.
    """
    swept = _swept_tiles(M, N, kind, group, gated, x_bytes) or _short_tiles(M, kind, group)
    if swept:
        return swept
    bm = 128 if M > 64 else 64
    bn = 64 if gated else 128
    bk = max(128, group) if kind == "q4" else 64
    while bn > 64 and triton.cdiv(M, bm) * triton.cdiv(N, bn) < 264:
        bn //= 2
    w_tiles = 2 if gated else 1
    # fp32 activations (o, down) are converted in registers: with 4 warps a 128x64 q4 tile spills (255 regs),
    # and so do the short calls' 64x64 tiles (ptxas for sm_90a: 240-676 bytes of spills; none on 8 warps).
    warps = 8 if bm * bn * w_tiles >= 128 * 128 or (bm >= 128 and x_bytes == 4) or M <= 64 else 4
    per_stage = bm * bk * x_bytes + w_tiles * bn * bk * _W_BYTES[kind]
    if kind != "f16":
        per_stage += w_tiles * bn * max(1, bk // group) * 4  # scales and mins
    stages = int(max(2, min(4, _SMEM_BUDGET // per_stage)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, FAST=2, SWAP=0)


# Short calls (up to SPLIT_MAX_ROWS rows in one M tile, as a server's batched decode steps of 2..32 rows)
# whose output tiles alone are fewer than this many programs split K across programs (gemv's one-launch
# split-K); INGOT_GEMM_SPLIT=0 never. The decode states and prefill buffers size their workspaces for calls of
# at most SPLIT_MAX_ROWS rows.
SPLIT_PROGRAMS = 264 if os.environ.get("INGOT_GEMM_SPLIT", "1") != "0" else 0
SPLIT_MAX_ROWS = 64


def _splits(M: int, n_out: int, K: int, cfg: dict) -> int:
    """Programs along K for this call: 1 unless its rows are one M tile of at most SPLIT_MAX_ROWS and its N
    tiles too few programs to fill the GPU (~2 per SM), then about SPLIT_PROGRAMS in all, each a whole number
    of K steps."""
    tiles_n = triton.cdiv(n_out, cfg["BLOCK_N"])
    steps = triton.cdiv(K, cfg["BLOCK_K"])
    if M > min(cfg["BLOCK_M"], SPLIT_MAX_ROWS) or tiles_n >= SPLIT_PROGRAMS or tiles_n > gemv.SPLIT_COUNTERS:
        return 1
    per_split = max(1, round(steps / max(1, round(SPLIT_PROGRAMS / tiles_n))))
    return triton.cdiv(steps, per_split)


def workspace_numel(w, m: int, gated: str | None = None) -> int:
    """fp32 elements of the split-K workspace a call of m rows needs (0: it does not split); allocated zeroed,
    as gemv's (the two share its layout, so one workspace serves both kinds of call)."""
    if w.kind not in _KINDS:
        return 0
    n_out = w.n // 2 if gated else w.n
    cfg = pick_tiles(m, n_out, w.k, w.kind, w.group if w.kind != "f16" else 1, gated is not None)
    splits = _splits(m, n_out, w.k, cfg)
    if splits == 1:
        return 0
    return gemv._split_layout(w.n, m, triton.cdiv(n_out, cfg["BLOCK_N"]), splits)[1]


def matmul(x: torch.Tensor, w, *, out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
           eps: float = 1e-6, residual: torch.Tensor | None = None, gated: str | None = None,
           norm_out: torch.Tensor | None = None, dot_dtype: torch.dtype = torch.float16,
           tiles: dict | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """out = [residual +] x' @ W^T, or act(x' @ Wg^T) * (x' @ Wu^T) [+ residual] with gated="silu" or
    "gelu_tanh", where x' is x, or rms_norm(x) * norm_weight rounded to dot_dtype when norm_weight is given
    (written into norm_out, allocated if None).

    x: [M, K] fp16/fp32, rows contiguous. w: PackedLinear (q4/q8/f16). out: fp32 [M, N], [M, N/2] when
    gated. residual: same shape as out, may be out itself. dot_dtype: the tensor-core operand type, fp16
    (default, ~5e-4 relative error) or bf16 (~4e-3, for activations that may pass 65504). tiles: overrides
    of pick_tiles' choices (the interpreter tests use small tiles). workspace: the split-K workspace of a
    short call (workspace_numel; zeroed when allocated), else a split call allocates its own.
    """
    if w.kind == "q6k":  # only the lm_head in practice (see gemv_q6k.matmul): no tensor-core path
        return gemv_q6k.matmul(x, w, out=out, norm_weight=norm_weight, eps=eps, residual=residual, gated=gated)
    if w.kind not in _KINDS:
        raise ValueError(f"unknown weight kind {w.kind!r}")
    if dot_dtype not in _DOT:
        raise ValueError(f"dot_dtype must be float16 or bfloat16, not {dot_dtype}")
    if gated not in _ACTS:
        raise ValueError(f"gated must be None, 'silu' or 'gelu_tanh', not {gated!r}")
    M, K = x.shape
    if K != w.k:
        raise ValueError(f"x has {K} features, the weight expects {w.k}")
    if gated and w.n % 2:
        raise ValueError(f"a gated weight needs an even row count, got {w.n}")
    n_out = w.n // 2 if gated else w.n
    quant = w.kind != "f16"
    group = w.group if quant else 1
    if quant and K % group:
        raise ValueError(f"K={K} is not a multiple of the group {group}")

    if norm_weight is not None:
        x = rms_norm_half(x, norm_weight, eps, out=norm_out, dtype=dot_dtype)
    elif x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((M, n_out), device=x.device, dtype=torch.float32)
    if out.shape != (M, n_out) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be fp32 {(M, n_out)} with contiguous rows")
    if residual is not None and (residual.shape != (M, n_out) or residual.stride(1) != 1):
        raise ValueError(f"residual must be {(M, n_out)} with contiguous rows")

    if M == 0:
        return out
    cfg = pick_tiles(M, n_out, K, w.kind, group, gated is not None, x.element_size())
    cfg.update(tiles or {})
    if cfg.get("FAST") == 2 and (_INTERPRET or x.device.type != "cuda"):
        cfg["FAST"] = 1  # the interpreter runs no PTX; FAST 1 is the same arithmetic in Triton ops
    scales, mins, wflags = weight_operands(w, cfg["BLOCK_K"])
    res = residual if residual is not None else out
    tiles_n = triton.cdiv(n_out, cfg["BLOCK_N"])
    splits = cfg.pop("SPLIT", None) or _splits(M, n_out, K, cfg)
    k_split = triton.cdiv(triton.cdiv(K, cfg["BLOCK_K"]), splits) * cfg["BLOCK_K"]
    splits = triton.cdiv(K, k_split)
    if splits > 1 and M > cfg["BLOCK_M"]:
        raise ValueError(f"a split-K call takes one M tile: {M} rows > BLOCK_M {cfg['BLOCK_M']}")
    cnt, ss, part = gemv._split_buffers(workspace, out, w.n, M, tiles_n, splits)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * tiles_n, splits)
    _gemm_kernel[grid](
        x, w.qweight, scales, mins, res, out, part, ss, cnt,
        M, n_out, K, k_split, splits, x.stride(0), w.qweight.stride(0), scales.stride(0), res.stride(0),
        out.stride(0), ACT=_ACTS[gated], HAS_RES=residual is not None, DOT=_DOT[dot_dtype], SPLIT=splits > 1,
        **wflags, **cfg,
    )
    return out


def weight_operands(w, bk: int):
    """(scales, mins, constexprs) for _dot_tile on weight w with K step bk: the scale/min pointers (any
    tensor stands in for those an f16 weight never reads) and KIND, GROUP, SPAN, HAS_MINS."""
    quant = w.kind != "f16"
    group = w.group if quant else 1
    if w.kind == "q4":
        if bk % group or bk < 32:
            raise ValueError(f"q4 BLOCK_K={bk} must be a multiple of the group {group} and at least 32")
        span = group // 2  # a run of low (or high) nibbles sharing one scale
    else:
        span = min(group, bk) if quant else 1
        if quant and (bk % span or group % span):
            raise ValueError(f"BLOCK_K={bk} and the group {group} must divide one another")
    scales = w.scales if quant else w.qweight
    mins = w.mins if w.mins is not None else scales
    if mins.stride() != scales.stride():
        raise ValueError("scales and mins must share a layout (the kernel indexes both with one stride)")
    return scales, mins, dict(KIND=_KINDS[w.kind], GROUP=group, SPAN=span, HAS_MINS=w.mins is not None)
