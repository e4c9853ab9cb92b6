"""Everything between the fused QKV projection and attention, in one launch: per-head q/k RMSNorm
(Qwen3, Gemma 3), half-split RoPE, and the fp16 KV-cache write.

One program per (token, q head) and per (token, kv head); a kv program also copies its v head, so the
whole qkv row is read exactly once. Positions and cache slots come from device tensors, so the launch
can be captured in a CUDA graph and replayed for every decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope(x1, x2, w_ptr, inv_freq_ptr, pos, offs, mask, D, eps, NORM: tl.constexpr, HALF: tl.constexpr):
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
        x1 = x1 * inv * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = x2 * inv * tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    # The angle is the same single fp32 product as torch's pos.float() * inv_freq; cos/sin of it need a
    # full-range reduction because angles reach tens of thousands of radians at long contexts.
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    c = tl.cos(angle)
    s = tl.sin(angle)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _qk_norm_rope_store_kernel(
        qkv_ptr, qkv_stride, pos_ptr, slot_ptr, inv_freq_ptr, qn_ptr, kn_ptr,
        q_ptr, q_s0, q_s1, k_ptr, k_s0, k_s1, k_s2, v_ptr, v_s0, v_s1, v_s2,
        n_heads, n_kv_heads, eps,
        HALF: tl.constexpr, BLOCK: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    D = 2 * HALF
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    pos = tl.load(pos_ptr + t)
    row = qkv_ptr + t * qkv_stride
    if head < n_heads:
        src = row + head * D
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        y1, y2 = _norm_rope(x1, x2, qn_ptr, inv_freq_ptr, pos, offs, mask, D, eps, Q_NORM, HALF)
        q_dst = q_ptr + t * q_s0 + head * q_s1
        tl.store(q_dst + offs, y1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_dst + HALF + offs, y2.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        kv = head - n_heads
        src = row + (n_heads + kv) * D
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        y1, y2 = _norm_rope(x1, x2, kn_ptr, inv_freq_ptr, pos, offs, mask, D, eps, K_NORM, HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        p64 = pos.to(tl.int64)
        k_dst = k_ptr + slot * k_s0 + p64 * k_s1 + kv * k_s2
        tl.store(k_dst + offs, y1.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF + offs, y2.to(k_ptr.dtype.element_ty), mask=mask)
        vsrc = row + (n_heads + n_kv_heads + kv) * D
        vdst = v_ptr + slot * v_s0 + p64 * v_s1 + kv * v_s2
        tl.store(vdst + offs, tl.load(vsrc + offs, mask=mask).to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=mask).to(v_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope_store(qkv: torch.Tensor, *, n_heads: int, n_kv_heads: int, head_dim: int,
                       q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                       inv_freq: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor,
                       q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Split qkv [T, (Hq + 2 Hkv) * D] (q heads, then k heads, then v heads), RMSNorm q and k per head when
    q_norm / k_norm [D] are given, rotate both by positions[t] * inv_freq (half-split, like
    reference.apply_rope), write q to q_out [T, Hq, D] and k, v to k_cache / v_cache
    [max_batch, max_ctx, Hkv, D] at (slots[t], positions[t]). Returns q_out (fp32, allocated if None)."""
    T = qkv.shape[0]
    D = head_dim
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if qkv.dim() != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * D or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {(n_heads + 2 * n_kv_heads) * D}] with contiguous rows, "
                         f"got {tuple(qkv.shape)}")
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq must be contiguous float32 [{D // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    if positions.shape != (T,) or slots.shape != (T,):
        raise ValueError(f"positions and slots must be [{T}], got {tuple(positions.shape)}, {tuple(slots.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[2:] != (n_kv_heads, D) or c.stride(3) != 1:
            raise ValueError(f"{name} must be [max_batch, max_ctx, {n_kv_heads}, {D}], got {tuple(c.shape)}")
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
    _qk_norm_rope_store_kernel[(T, n_heads + n_kv_heads)](
        qkv, qkv.stride(0), positions, slots, inv_freq,
        q_norm if q_norm is not None else inv_freq, k_norm if k_norm is not None else inv_freq,
        q_out, q_out.stride(0), q_out.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_heads, n_kv_heads, float(eps),
        HALF=half, BLOCK=block, Q_NORM=q_norm is not None, K_NORM=k_norm is not None,
        num_warps=max(1, min(4, block // 32)))
    return q_out
