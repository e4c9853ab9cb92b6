"""GEMV, row-sliced matmul and embedding rows on q6k weights (GGML Q6_K at 6.5625 bits per weight; the layout
is described in ingot/quant/pack.py).

linear: out[M, N] (fp32) = [residual +] x' @ W^T for M = 1..32, x' = rms_norm(x) * norm_weight when asked (the
lm_head fuses the final norm: the sum of squares is gathered while x streams by, and rstd scales the finished
dot products, so x is read once).

Each program owns BLOCK_N rows and a K range and steps through one 256-element super block per iteration
(K and the K splits are multiples of 256, so no step needs a K mask). Per row and step it loads 128 bytes of
low nibbles as two [4 units, rows, 4] int32 tiles (words g and g + 4 of each 64-element unit), 64 bytes of
high pairs as one such tile, one int32 word of four int8 sub-scales per unit and one fp16 super-scale. Then,
per group word g and chunk c,
    q = (low >> 4 * (c % 2)) & 0x0F0F0F0F | (high shifted so pair c sits at bits 4..5) & 0x30303030
holds the chunk's four 6-bit quants, one per byte (three integer ops per four weights). Byte j becomes fp32
(q_j - 32) * 2^b with no int->float conversion instruction (quarter rate on sm_90): the byte, masked in place
at bit b, is OR-ed into the mantissa of 2^23 and 2^23 + 32 * 2^b is subtracted (exact; byte 3 is taken from
q >> 16 so that every field ends below bit 23). The x value it multiplies is loaded pre-scaled by 2^-b, once
per program for all of its rows. The 16 products of a group sum to t, and the scale d * sc multiplies t once
per group rather than once per weight.

When N alone gives too few programs for 132 SMs, K is split the way gemv.py splits it, in one launch and
with the same workspace layout (so one zeroed workspace serves both): the column tile's last program adds the
partials in split order and applies the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import pdl
from ingot.backends.cuda.gemv import _finish, _split_buffers, _split_finish, _split_layout
from ingot.errors import UnsupportedError
from ingot.quant.pack import Q6K_SUPER, PackedLinear

MAX_M = 32
TARGET_PROGRAMS = 320  # ~2.4 per H100 SM, where gemv.py's word-kernel sweep found every shape's optimum
MAGIC = 0x4B000000  # fp32 bits of 2^23: mantissa bit b weighs 2^b
_TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _chunk_quants(low, high, C: tl.constexpr):
    """Word of chunk C's four 6-bit quants, one per byte (low: the unit's word g for C < 2, else g + 4)."""
    if C % 2 == 0:
        nib = low & 0x0F0F0F0F
    else:
        nib = (low >> 4) & 0x0F0F0F0F
    if C == 0:
        h = high << 4
    elif C == 1:
        h = high << 2
    elif C == 2:
        h = high
    else:
        h = high >> 2
    return nib | (h & 0x30303030)


@triton.jit
def _field(q, magic, J: tl.constexpr):
    """(byte J of q - 32) * 2^B in fp32, B = 8J (byte 3: read from q >> 16 at B = 8)."""
    B: tl.constexpr = 8 if J == 3 else 8 * J
    if J == 3:
        src = q >> 16
    else:
        src = q
    # One LOP3 (and-or) since `magic` is a register: as an immediate it would take a second LOP3.
    v = ((src & (0x3F << B)) | magic).to(tl.float32, bitcast=True)
    return v - (_TWO23 + 32.0 * (1 << B))


@triton.jit
def _chunk_fields(low, high, magic, C: tl.constexpr):
    q = _chunk_quants(low, high, C)
    return _field(q, magic, 0), _field(q, magic, 1), _field(q, magic, 2), _field(q, magic, 3)


@triton.jit
def _x_field(xp, np_, J: tl.constexpr, HAS_NORM: tl.constexpr):
    """x (times norm_weight) at xp + J, scaled by the 2^-B that _field's byte J carries, and x^2."""
    B: tl.constexpr = 8 if J == 3 else 8 * J
    x = tl.load(xp + J).to(tl.float32)
    sq = x * x
    if HAS_NORM:
        x = x * tl.load(np_ + J).to(tl.float32)
    return x * (1.0 / (1 << B)), sq


@triton.jit
def _chunk_dot(f0, f1, f2, f3, xp, np_, HAS_NORM: tl.constexpr):
    """Sum over the chunk's 4 bytes of field * x: [units, rows, groups]; and the x^2 sum, [units, groups]."""
    x0, s0 = _x_field(xp, np_, 0, HAS_NORM)
    x1, s1 = _x_field(xp, np_, 1, HAS_NORM)
    x2, s2 = _x_field(xp, np_, 2, HAS_NORM)
    x3, s3 = _x_field(xp, np_, 3, HAS_NORM)
    t = f0 * x0[:, None, :] + f1 * x1[:, None, :] + f2 * x2[:, None, :] + f3 * x3[:, None, :]
    return t, (s0 + s1) + (s2 + s3)


@triton.jit
def _gemv_q6k_kernel(x_ptr, lo_ptr, hi_ptr, sc_ptr, d_ptr, nw_ptr, res_ptr, out_ptr, part_ptr, ss_ptr, cnt_ptr,
                     M, N, K, k_split, n_split, stride_xm, stride_rm, stride_om, eps, magic,
                     HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_begin = pid_k * k_split
    k_end = tl.minimum(K, k_begin + k_split)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    pdl.wait(PDL)
    rows64 = rows.to(tl.int64)
    ui = tl.arange(0, 4)  # 64-element unit of the super block
    gi = tl.arange(0, 4)  # 16-element group of the unit
    mi = tl.arange(0, BLOCK_M)
    ok3 = tl.broadcast_to(row_ok[None, :, None], (4, BLOCK_N, 4))
    # Word offsets inside a row for one super block: low plane 32 words (8 per unit), high plane 16 (4 per unit).
    lo_row = lo_ptr + rows64 * (K // 8)
    hi_row = hi_ptr + rows64 * (K // 16)
    lo_col = (ui * 8)[:, None] + gi[None, :]
    hi_col = (ui * 4)[:, None] + gi[None, :]
    x_col = (ui * 64)[:, None] + (gi * 16)[None, :]  # first element of each group
    sc_shift = (24 - 8 * gi)[None, None, :]  # byte g of a sub-scale word to the top, then sign-extended down
    acc3 = tl.zeros((4, BLOCK_N, 4), tl.float32)  # M = 1: per (unit, row, group), reduced once at the end
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ssv = tl.zeros((4, 4), tl.float32)
    ss = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(k_begin, k_end, 256):
        lw = lo_row[None, :, None] + (k0 // 8 + lo_col)[:, None, :]
        low_a = tl.load(lw, mask=ok3, other=0).to(tl.uint32, bitcast=True)  # logical shifts
        low_b = tl.load(lw + 4, mask=ok3, other=0).to(tl.uint32, bitcast=True)
        high = tl.load(hi_row[None, :, None] + (k0 // 16 + hi_col)[:, None, :], mask=ok3, other=0)
        high = high.to(tl.uint32, bitcast=True)
        sw = tl.load(sc_ptr + rows64[None, :] * (K // 64) + (k0 // 64 + ui)[:, None], mask=row_ok[None, :], other=0)
        d = tl.load(d_ptr + rows64 * (K // 256) + k0 // 256, mask=row_ok, other=0.0).to(tl.float32)
        s = ((sw[:, :, None] << sc_shift) >> 24).to(tl.float32) * d[None, :, None]
        a0, a1, a2, a3 = _chunk_fields(low_a, high, magic, 0)
        b0, b1, b2, b3 = _chunk_fields(low_a, high, magic, 1)
        c0, c1, c2, c3 = _chunk_fields(low_b, high, magic, 2)
        e0, e1, e2, e3 = _chunk_fields(low_b, high, magic, 3)
        # M is a Python int, specialized to a constant when 1, so the single-row loop folds away.
        for m in range(0, M):
            xp = x_ptr + m * stride_xm + k0 + x_col
            np_ = nw_ptr + k0 + x_col
            t, sq = _chunk_dot(a0, a1, a2, a3, xp, np_, HAS_NORM)
            t1, sq1 = _chunk_dot(b0, b1, b2, b3, xp + 4, np_ + 4, HAS_NORM)
            t2, sq2 = _chunk_dot(c0, c1, c2, c3, xp + 8, np_ + 8, HAS_NORM)
            t3, sq3 = _chunk_dot(e0, e1, e2, e3, xp + 12, np_ + 12, HAS_NORM)
            contrib = s * ((t + t1) + (t2 + t3))
            sq = (sq + sq1) + (sq2 + sq3)
            if BLOCK_M == 1:
                acc3 += contrib
                ssv += sq
            else:  # registers cannot be indexed by a runtime m: select the row instead
                c = tl.sum(tl.sum(contrib, axis=2), axis=0)
                acc += tl.where((mi == m)[:, None], c[None, :], 0.0)
                if HAS_NORM:
                    ss += tl.where(mi == m, tl.sum(tl.sum(sq, axis=1), axis=0), 0.0)
    if BLOCK_M == 1:
        acc += tl.sum(tl.sum(acc3, axis=2), axis=0)[None, :]
        ss += tl.sum(tl.sum(ssv, axis=1), axis=0)
    if SPLIT:  # gemv's one-launch split-K: the column tile's last program reduces (GATED 0: acc_u unused)
        _split_finish(acc, acc, ss, mi, rows, pid_n, pid_k, n_split, M, N, K, eps, part_ptr, ss_ptr, cnt_ptr,
                      res_ptr, stride_rm, out_ptr, stride_om, HAS_NORM, 0, HAS_RES)
    else:
        _finish(acc, acc, ss, mi, rows, M, N, K, eps, res_ptr, stride_rm, out_ptr, stride_om, HAS_NORM, 0, HAS_RES)


@dataclass(frozen=True)
class Q6kConfig:
    block_n: int
    split: int  # programs along K (1: no split, no workspace)
    num_warps: int = 4


def plan(n: int, k: int, m: int, interpreted: bool = False) -> Q6kConfig:
    """M = 1: 64 rows per program (each thread reuses the x values it loads across its rows); larger M keeps
    the 16 unpacked fields of a tile live through the row loop, so 16 rows. K is split until the grid holds
    ~TARGET_PROGRAMS programs: a 128256-row lm_head needs no split, a 4096 x 4096 matrix needs ~5.
    `interpreted` (TRITON_INTERPRET on the CPU): an op costs the same whatever its size, so up to 1024 rows
    per program and no split."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} activation rows, got {m}")
    if interpreted:
        return Q6kConfig(min(1024, triton.next_power_of_2(n)), 1)
    block_n = 64 if m == 1 else 16
    tiles_n = triton.cdiv(n, block_n)
    supers = k // Q6K_SUPER
    split = max(1, min(round(TARGET_PROGRAMS / tiles_n), supers))
    split = triton.cdiv(supers, triton.cdiv(supers, split))  # no empty splits
    return Q6kConfig(block_n, split)


def _k_split(k: int, cfg: Q6kConfig) -> int:
    return triton.cdiv(k // Q6K_SUPER, cfg.split) * Q6K_SUPER


def workspace_numel(w: PackedLinear, m: int, config: Q6kConfig | None = None) -> int:
    """fp32 elements the split-K path needs for this call (0 when it does not split)."""
    cfg = config or plan(w.n, w.k, m, interpreted=w.device.type != "cuda")
    splits = triton.cdiv(w.k, _k_split(w.k, cfg))
    return 0 if splits == 1 else _split_layout(w.n, m, triton.cdiv(w.n, cfg.block_n), splits)[1]


def linear(x: torch.Tensor, w: PackedLinear, *, out: torch.Tensor | None = None,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
           gated: str | None = None, workspace: torch.Tensor | None = None,
           config: Q6kConfig | None = None) -> torch.Tensor:
    """gemv.linear for q6k weights (same arguments; `gated` is refused: gate/up weights are fused, and fusing
    turns q6k into q8, see pack.concat_rows)."""
    if w.kind != "q6k":
        raise ValueError(f"gemv_q6k takes q6k weights, not {w.kind}")
    if gated is not None:
        raise UnsupportedError("q6k weights have no gated GEMV; fuse gate/up (pack.concat_rows makes them q8)")
    m, k = x.shape
    if k != w.k or x.stride(1) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)} (row stride 1 needed) does not match weight k={w.k}")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} activation rows, got {m}")
    cfg = config or plan(w.n, k, m, interpreted=x.device.type != "cuda")
    if out is None:
        out = torch.empty(m, w.n, device=x.device, dtype=torch.float32)
    assert out.shape == (m, w.n) and out.dtype == torch.float32 and out.stride(1) == 1
    if residual is not None:
        assert residual.shape == (m, w.n) and residual.stride(1) == 1
    if norm_weight is not None:
        assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    k_split = _k_split(k, cfg)
    splits = triton.cdiv(k, k_split)
    tiles_n = triton.cdiv(w.n, cfg.block_n)
    # the workspace layout (zeroed counters first) is gemv's, so both share one workspace
    cnt, ss, part = _split_buffers(workspace, out, w.n, m, tiles_n, splits)
    res = residual if residual is not None else out
    flags = dict(HAS_NORM=norm_weight is not None, HAS_RES=residual is not None)
    _gemv_q6k_kernel[(tiles_n, splits)](
        x, w.qweight.view(torch.int32), w.qhigh.view(torch.int32), w.scales.view(torch.int32), w.supers,
        norm_weight if norm_weight is not None else x, res, out, part, ss, cnt,
        m, w.n, k, k_split, splits, x.stride(0), res.stride(0), out.stride(0), eps, MAGIC,
        SPLIT=splits > 1, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        **pdl.LAUNCH, **flags)
    return out


def matmul(x: torch.Tensor, w: PackedLinear, *, out: torch.Tensor | None = None,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
           gated: str | None = None) -> torch.Tensor:
    """gemm.matmul for q6k weights: the GEMV over 32-row slices, fp32 throughout. Prefill runs the lm_head on
    the last token only, so only whole-sequence logits (Runner.forward_all: tests, perplexity) and GGUFs
    storing other unfused matrices as Q6_K come here; it reads the weight once per 32 rows."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, w.n, device=x.device, dtype=torch.float32)
    for i in range(0, m, MAX_M):
        j = min(m, i + MAX_M)
        linear(x[i:j], w, out=out[i:j], norm_weight=norm_weight, eps=eps,
               residual=None if residual is None else residual[i:j], gated=gated)
    return out


@triton.jit
def _embed_q6k_kernel(ids_ptr, lo_ptr, hi_ptr, sc_ptr, d_ptr, out_ptr, K, stride_om, scale, PDL: tl.constexpr):
    """One 256-element super block of row ids[t], element by element (a gather: one row per token is tiny)."""
    pdl.wait(PDL)
    t = tl.program_id(0)
    k0 = tl.program_id(1) * 256
    row = tl.load(ids_ptr + t).to(tl.int64)
    e = tl.arange(0, 256)
    unit, g, c, j = e // 64, (e // 16) % 4, (e // 4) % 4, e % 4
    lo = tl.load(lo_ptr + row * (K // 2) + k0 // 2 + unit * 32 + (c // 2) * 16 + g * 4 + j)
    hi = tl.load(hi_ptr + row * (K // 4) + k0 // 4 + unit * 16 + g * 4 + j)
    q = ((lo >> (4 * (c % 2))) & 15) | (((hi >> (2 * c)) & 3) << 4)
    sc = tl.load(sc_ptr + row * (K // 16) + (k0 + e) // 16).to(tl.float32)
    d = tl.load(d_ptr + row * (K // 256) + k0 // 256).to(tl.float32)
    w = (d * sc) * (q.to(tl.float32) - 32.0)  # pack.py's float32 order: exact against the dequantization
    tl.store(out_ptr + t.to(tl.int64) * stride_om + k0 + e, w * scale)


def embed_rows(ids: torch.Tensor, table: PackedLinear, scale: float = 1.0, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """gemv.embed_rows for a q6k table: out[t] = scale * dequantized row ids[t] (fp32 [T, k])."""
    (t,) = ids.shape
    if out is None:
        out = torch.empty(t, table.k, device=ids.device, dtype=torch.float32)
    assert out.shape == (t, table.k) and out.dtype == torch.float32 and out.stride(1) == 1
    _embed_q6k_kernel[(t, table.k // Q6K_SUPER)](
        ids, table.qweight, table.qhigh, table.scales, table.supers, out, table.k, out.stride(0), float(scale),
        num_warps=4, **pdl.LAUNCH)
    return out
