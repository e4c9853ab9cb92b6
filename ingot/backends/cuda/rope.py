"""Everything between the fused QKV projection and attention, in one launch: per-head q/k RMSNorm
(Qwen3, Gemma 3), half-split RoPE, the unweighted v norm (Gemma 4), and the fp16 KV-cache write.

A qkv row holds q heads then k heads then v heads; kv_in_row says how much of that follows q: 2 (k and v), 1
(k only: Gemma 4's k_eq_v layers, whose values are the key projection before its norm and rotation) or 0
(nothing: a layer that reads an earlier layer's keys and values and writes none).

One program per token handles all its heads at once (q heads, k heads and the v copy as [heads, D/2]
tiles), so the qkv row is read exactly once, cos/sin are computed once per position and shared by every
head, and a decode step is a single small program: no grid of tiny per-head programs to schedule.
Positions and cache slots come from device tensors, so the launch can be captured in a CUDA graph and
replayed for every decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_heads(x1, x2, w_ptr, c, s, offs, mask, D, eps, NORM: tl.constexpr, HALF: tl.constexpr):
    """Rows of x1, x2 [H, BLOCK] are the two halves of H heads: per-head RMSNorm (optional), then rotation by
    the position's c, s [BLOCK], shared by every head."""
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
        x1 = x1 * inv * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
        x2 = x2 * inv * tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
    return x1 * c[None, :] - x2 * s[None, :], x2 * c[None, :] + x1 * s[None, :]


@triton.jit
def _unit_rms(x1, x2, D, eps):
    """Rows of x1, x2 [H, BLOCK] (two halves of H heads) RMS-normed per head, without a weight."""
    inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
    return x1 * inv, x2 * inv


@triton.jit
def _qk_norm_rope_store_kernel(
        qkv_ptr, qkv_stride, pos_ptr, slot_ptr, inv_freq_ptr, qn_ptr, kn_ptr,
        q_ptr, q_s0, q_s1, k_ptr, k_s0, k_s1, k_s2, v_ptr, v_s0, v_s1, v_s2,
        eps,
        N_HEADS: tl.constexpr, N_KV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr,
        HALF: tl.constexpr, BLOCK: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
        KV_ROW: tl.constexpr, V_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = 2 * HALF
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    # Every independent load goes out first (position, slot, the whole qkv row, the rope frequencies), so the
    # program waits about one memory round trip before the arithmetic.
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    row = qkv_ptr + t * qkv_stride
    hq = tl.arange(0, BLOCK_H)
    hk = tl.arange(0, BLOCK_KV)
    q_ok = (hq < N_HEADS)[:, None] & mask[None, :]
    k_ok = ((hk < N_KV) & (hk < N_KV * KV_ROW))[:, None] & mask[None, :]  # none when KV_ROW is 0
    q_src = row + hq[:, None] * D + offs[None, :]
    k_src = row + (N_HEADS + hk[:, None]) * D + offs[None, :]
    v_src = row + (N_HEADS + (KV_ROW - 1) * N_KV + hk[:, None]) * D + offs[None, :]  # = k_src when KV_ROW 1
    q1 = tl.load(q_src, mask=q_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_src + HALF, mask=q_ok, other=0.0).to(tl.float32)
    k1 = tl.load(k_src, mask=k_ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + HALF, mask=k_ok, other=0.0).to(tl.float32)
    v1 = tl.load(v_src, mask=k_ok, other=0.0).to(tl.float32)
    v2 = tl.load(v_src + HALF, mask=k_ok, other=0.0).to(tl.float32)
    freq = tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    # The angle is the same single fp32 product as torch's pos.float() * inv_freq; cos/sin of it need a
    # full-range reduction because angles reach tens of thousands of radians at long contexts. Computed once
    # per position, for all heads.
    angle = pos.to(tl.float32) * freq
    c = tl.cos(angle)
    s = tl.sin(angle)

    y1, y2 = _rope_heads(q1, q2, qn_ptr, c, s, offs, mask, D, eps, Q_NORM, HALF)
    q_dst = q_ptr + t * q_s0 + hq[:, None] * q_s1 + offs[None, :]
    tl.store(q_dst, y1.to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(q_dst + HALF, y2.to(q_ptr.dtype.element_ty), mask=q_ok)
    if KV_ROW > 0:
        p64 = pos.to(tl.int64)
        if V_NORM:
            v1, v2 = _unit_rms(v1, v2, D, eps)
        vdst = v_ptr + slot * v_s0 + p64 * v_s1 + hk[:, None] * v_s2 + offs[None, :]
        tl.store(vdst, v1.to(v_ptr.dtype.element_ty), mask=k_ok)
        tl.store(vdst + HALF, v2.to(v_ptr.dtype.element_ty), mask=k_ok)
        y1, y2 = _rope_heads(k1, k2, kn_ptr, c, s, offs, mask, D, eps, K_NORM, HALF)
        k_dst = k_ptr + slot * k_s0 + p64 * k_s1 + hk[:, None] * k_s2 + offs[None, :]
        tl.store(k_dst, y1.to(k_ptr.dtype.element_ty), mask=k_ok)
        tl.store(k_dst + HALF, y2.to(k_ptr.dtype.element_ty), mask=k_ok)


def _cache_args(cache: torch.Tensor | None, stand_in: torch.Tensor) -> tuple:
    if cache is None:
        return stand_in, 0, 0, 0
    return cache, cache.stride(0), cache.stride(1), cache.stride(2)


def qk_norm_rope_store(qkv: torch.Tensor, *, n_heads: int, n_kv_heads: int, head_dim: int,
                       q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                       inv_freq: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                       q_out: torch.Tensor | None = None, num_warps: int | None = None, kv_in_row: int = 2,
                       v_norm: bool = False) -> torch.Tensor:
    """Split qkv [T, (Hq + kv_in_row Hkv) * D] (q heads, then k heads, then v heads; see the module's note on
    kv_in_row), RMSNorm q and k per head when q_norm / k_norm [D] are given (and v without a weight when
    v_norm), rotate q and k by positions[t] * inv_freq (half-split, like reference.apply_rope), write q to
    q_out [T, Hq, D] and k, v to k_cache / v_cache [max_batch, max_ctx, Hkv, D] at (slots[t], positions[t])
    (with kv_in_row 0 there are none: the caches may be None). Returns q_out (fp32, allocated if None)."""
    T = qkv.shape[0]
    D = head_dim
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if kv_in_row not in (0, 1, 2):
        raise ValueError(f"kv_in_row must be 0, 1 or 2, got {kv_in_row}")
    width = (n_heads + kv_in_row * n_kv_heads) * D
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {width}] with contiguous rows, got {tuple(qkv.shape)}")
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq must be contiguous float32 [{D // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    if positions.shape != (T,) or slots.shape != (T,):
        raise ValueError(f"positions and slots must be [{T}], got {tuple(positions.shape)}, {tuple(slots.shape)}")
    caches = (("k_cache", k_cache), ("v_cache", v_cache)) if kv_in_row else ()
    for name, c in caches:
        if c is None or c.dim() != 4 or c.shape[2:] != (n_kv_heads, D) or c.stride(3) != 1:
            raise ValueError(f"{name} must be [max_batch, max_ctx, {n_kv_heads}, {D}], "
                             f"got {None if c is None else tuple(c.shape)}")
    if not kv_in_row:  # the kernel never touches the caches: q_out stands in for them
        k_cache = v_cache = None
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None and (w.shape != (D,) or not w.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{D}] tensor, got {tuple(w.shape)}")
    if q_out is None:
        q_out = torch.empty((T, n_heads, D), device=qkv.device, dtype=torch.float32)
    if q_out.shape != (T, n_heads, D) or q_out.stride(2) != 1:
        raise ValueError(f"q_out must be [{T}, {n_heads}, {D}], got {tuple(q_out.shape)}")
    if T == 0:
        return q_out
    half = D // 2
    block = triton.next_power_of_2(half)
    block_h, block_kv = triton.next_power_of_2(n_heads), triton.next_power_of_2(n_kv_heads)
    if num_warps is None:  # ~16 fp32 elements of the padded q/k/v tiles per thread, 1..8 warps
        elems = (block_h + 2 * block_kv) * 2 * block
        num_warps = max(1, min(8, triton.next_power_of_2(elems // 512)))
    _qk_norm_rope_store_kernel[(T,)](
        qkv, qkv.stride(0), positions, slots, inv_freq,
        q_norm if q_norm is not None else inv_freq, k_norm if k_norm is not None else inv_freq,
        q_out, q_out.stride(0), q_out.stride(1),
        *_cache_args(k_cache, q_out), *_cache_args(v_cache, q_out),
        float(eps),
        N_HEADS=n_heads, N_KV=n_kv_heads, BLOCK_H=block_h, BLOCK_KV=block_kv,
        HALF=half, BLOCK=block, Q_NORM=q_norm is not None, K_NORM=k_norm is not None,
        KV_ROW=kv_in_row, V_NORM=v_norm, num_warps=num_warps)
    return q_out
