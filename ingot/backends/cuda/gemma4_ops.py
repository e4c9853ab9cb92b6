"""Gemma 4's small elementwise steps, beside the projections: the per-layer inputs (PLE) mixed once per step,
each layer's gate on its slice of them, and the final logit softcap. All work in place on device buffers,
read nothing from the host and allocate nothing, so they sit inside a captured decode step, launched with
programmatic dependent launch as the projections around them (pdl.begin)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import pdl
from ingot.backends.cuda.gemm import _ACTS, _act


@triton.jit
def _per_layer_inputs_kernel(proj_ptr, own_ptr, w_ptr, out_ptr, stride_pm, stride_om, stride_am, P, proj_scale, eps,
                             BLOCK: tl.constexpr, PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    """One (row, layer) slice of P values: out = (rms_norm(proj * proj_scale) * w + own) / sqrt(2)."""
    pdl.begin(PDL, EARLY)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * P + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < P
    p = tl.load(proj_ptr + row * stride_pm + offs, mask=ok, other=0.0) * proj_scale
    inv = tl.rsqrt(tl.sum(p * p, axis=0) / P + eps)
    w = tl.load(w_ptr + tl.arange(0, BLOCK), mask=ok, other=0.0)
    own = tl.load(own_ptr + row * stride_om + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_am + offs, (p * inv * w + own) * 0.7071067811865476, mask=ok)


def per_layer_inputs(proj: torch.Tensor, own: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     proj_scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every layer's input [T, L * P] (layer-major) from the projection of the main embedding, proj (fp32
    [T, L * P], scaled by proj_scale and RMS-normed per layer slice with norm_weight [P]), and the per-layer
    token embedding own (fp32 [T, L * P]), as reference._per_layer_inputs. out may be own (the default)."""
    out = own if out is None else out
    (p,) = norm_weight.shape
    t, n = proj.shape
    for name, a in (("proj", proj), ("own", own), ("out", out)):
        if a.shape != (t, n) or a.dtype != torch.float32 or a.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [{t}, {n}] with contiguous rows, got {a.dtype} {tuple(a.shape)}")
    if n % p or norm_weight.dtype != torch.float32 or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be contiguous fp32 [P] with P dividing {n}, got {tuple(norm_weight.shape)}")
    if t:
        _per_layer_inputs_kernel[(t, n // p)](proj, own, norm_weight, out, proj.stride(0), own.stride(0),
                                              out.stride(0), p, float(proj_scale), float(eps),
                                              BLOCK=triton.next_power_of_2(p), num_warps=1, **pdl.LAUNCH_EARLY)
    return out


@triton.jit
def _gelu_gate_kernel(g_ptr, x_ptr, stride_gm, stride_xm, N, BLOCK: tl.constexpr, ACT: tl.constexpr,
                      PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    pdl.begin(PDL, EARLY)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(g_ptr + row * stride_gm + offs, mask=ok, other=0.0)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0)
    tl.store(g_ptr + row * stride_gm + offs, _act(g, ACT) * x, mask=ok)


def gelu_gate(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g = gelu_tanh(g) * x in place (both fp32 [T, N], rows contiguous; x may be a column slice): a layer's
    gated per-layer input. Returns g."""
    if g.shape != x.shape or g.dtype != torch.float32 or x.dtype != torch.float32 or g.stride(1) != 1 \
            or x.stride(1) != 1:
        raise ValueError(f"g and x must be fp32 of one shape with contiguous rows, got {tuple(g.shape)}, "
                         f"{tuple(x.shape)}")
    t, n = g.shape
    block = min(1024, triton.next_power_of_2(max(n, 1)))
    if t and n:
        _gelu_gate_kernel[(t, triton.cdiv(n, block))](g, x, g.stride(0), x.stride(0), n, BLOCK=block,
                                                       ACT=_ACTS["gelu_tanh"], num_warps=4, **pdl.LAUNCH_EARLY)
    return g


@triton.jit
def _softcap_kernel(x_ptr, stride_xm, V, cap, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                    EARLY: tl.constexpr = False):
    pdl.begin(PDL, EARLY)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0)
    # tanh(y) = 1 - 2 / (1 + e^(2y)): one exp, and exactly +-1 where e^(2y) overflows or vanishes
    y = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x / cap))
    tl.store(x_ptr + row * stride_xm + offs, cap * y, mask=ok)


def softcap_(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """logits = cap * tanh(logits / cap) in place (fp32 [M, V], rows contiguous). Returns logits."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be fp32 [M, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    if cap <= 0:
        raise ValueError(f"the softcap must be positive, got {cap}")
    m, v = logits.shape
    block = 1024
    if m and v:
        _softcap_kernel[(m, triton.cdiv(v, block))](logits, logits.stride(0), v, float(cap), BLOCK=block, num_warps=4,
                                                     **pdl.LAUNCH_EARLY)
    return logits
