"""RMSNorm kernels: one program per row, fp32 math whatever the storage dtype.

A row up to MAX_ONE_PASS elements is held in registers and read once; longer rows take two passes
(sum of squares, then scale), the second pass mostly hitting L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import gemv, pdl

MAX_ONE_PASS = 16384


@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, w_ptr, res_ptr, res_stride, out_ptr, out_stride, scale_ptr,
                     nwo_ptr, xn_ptr, sso_ptr, K, eps, ADD: tl.constexpr, SCALE: tl.constexpr,
                     NORM_OUT: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                     PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    # ADD: res += norm(x) * w in place (Gemma's sandwich norms), then with SCALE res *= scale_ptr[0] (Gemma 4's
    # layer output scale); otherwise out = norm(x) * w. NORM_OUT (ADD, one pass): the new residual row handed
    # on pre-normed as gemv's (xn = res * nwo, its sum of squares in one part per row). In decode (Gemma's two
    # sandwich norms a layer) the next GEMV loads its weights while this one-program kernel runs (pdl.begin).
    pdl.begin(PDL, EARLY)
    scale = tl.load(scale_ptr).to(tl.float32) if SCALE else 1.0
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        y = x * inv * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            r_ptrs = res_ptr + row * res_stride + offs
            r = (tl.load(r_ptrs, mask=mask, other=0.0) + y) * scale
            tl.store(r_ptrs, r, mask=mask)
            if NORM_OUT:
                tl.store(xn_ptr + row * res_stride + offs, r * tl.load(nwo_ptr + offs, mask=mask, other=0.0), mask=mask)
                tl.store(sso_ptr + row, tl.sum(r * r, axis=0))
        else:
            o_ptrs = out_ptr + row * out_stride + offs
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            mask = start + offs < K
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        inv = tl.rsqrt(tl.sum(acc, axis=0) / K + eps)
        for start in range(0, K, BLOCK):
            mask = start + offs < K
            x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
            y = x * inv * tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            if ADD:
                r_ptrs = res_ptr + row * res_stride + start + offs
                tl.store(r_ptrs, (tl.load(r_ptrs, mask=mask, other=0.0) + y) * scale, mask=mask)
            else:
                o_ptrs = out_ptr + row * out_stride + start + offs
                tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, w, eps, res, out, block, scale=None, norm_out=None):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    M, K = x.shape
    if w.shape != (K,) or not w.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{K}] tensor, got {tuple(w.shape)}")
    target = res if res is not None else out
    if target.shape != (M, K) or target.stride(1) != 1:
        raise ValueError(f"output must be [{M}, {K}] with contiguous rows, got {tuple(target.shape)}")
    if block is None:
        block = triton.next_power_of_2(K) if K <= MAX_ONE_PASS else 4096
    one_pass = block >= K
    if norm_out is not None:
        if not one_pass or norm_out.xn.shape != (M, K) or norm_out.xn.stride(0) != target.stride(0):
            raise ValueError("a norm handoff needs one-pass rows and xn shaped and strided as the residual")
        assert norm_out.weight.shape == (K,) and norm_out.ss.numel() >= M
    num_warps = 4 if min(block, triton.next_power_of_2(K)) <= 2048 else 8
    # The unused pointer of the pair gets a real tensor so both signatures compile the same way.
    other = target
    hand = gemv.norm_out_args(norm_out, other)
    _rms_norm_kernel[(M,)](
        x, x.stride(0), w, res if res is not None else other, target.stride(0),
        out if out is not None else other, target.stride(0), scale if scale is not None else w, *hand, K,
        float(eps), ADD=res is not None, SCALE=scale is not None, NORM_OUT=norm_out is not None, BLOCK=block,
        ONE_PASS=one_pass, num_warps=num_warps, **pdl.LAUNCH_EARLY)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None,
             block: int | None = None) -> torch.Tensor:
    """out = x * rsqrt(mean(x^2) + eps) * w per row of x [M, K] (fp32 or fp16), computed in fp32 and stored
    in out's dtype (x's when out is None). `block` overrides the tile width (tests use it to force the
    two-pass path)."""
    if out is None:
        out = torch.empty_like(x)
    _launch(x, w, eps, None, out, block)
    return out


def add_rms_norm(residual: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float,
                 block: int | None = None, scale: torch.Tensor | None = None, norm_out=None) -> torch.Tensor:
    """residual += rms_norm(h) * w in place (residual fp32 [M, K], h fp32 or fp16): Gemma's post-attention
    and post-MLP norms fused with the residual add; then residual *= scale[0] where a one-element scale is
    given (Gemma 4's layer output scale, read on the device). norm_out (a gemv.NormOut): the new residual
    rows also handed on pre-normed, one sum of squares per row. Returns residual."""
    if residual.dtype != torch.float32:
        raise ValueError(f"the residual stream must be float32, got {residual.dtype}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")
    _launch(h, w, eps, residual, None, block, scale, norm_out)
    return residual


def rms_norm_heads(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [T, H, D] with one weight [D] shared by all heads (Qwen3 / Gemma 3
    q/k norms, where they are not fused into rope.qk_norm_rope_store)."""
    T, H, D = x.shape
    if out is None:
        out = torch.empty_like(x)
    rms_norm(x.view(T * H, D), w, eps, out=out.view(T * H, D))
    return out
