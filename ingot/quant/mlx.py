"""MLX affine quantization (mlx.core.quantize, mode "affine"), in torch.

Layout: along the last dim, each group of `group_size` elements has one scale and one
bias; element = scale * q + bias with q an unsigned `bits`-bit integer. q values are
packed into uint32 words, 32 // bits per word, the first element in the lowest bits.

torch has few uint32 ops, so packed words are handled as torch.int32 holding the same
bit pattern (what `.view(torch.int32)` of a uint32 tensor gives). Inputs may be torch
int32/uint32 tensors or numpy int32/uint32 arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from ingot.errors import FormatError, UnsupportedError

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def _check_params(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UnsupportedError(f"MLX quantization with {bits} bits is not supported; supported: {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise UnsupportedError(
            f"MLX quantization group size {group_size} is not supported; supported: {SUPPORTED_GROUP_SIZES}"
        )


def _as_int32_words(weight) -> torch.Tensor:
    if isinstance(weight, np.ndarray):
        if weight.dtype not in (np.uint32, np.int32):
            raise FormatError(f"MLX packed weight must be uint32, got numpy {weight.dtype}")
        # Copy: the array may be a read-only memmap, which torch.from_numpy warns about.
        return torch.from_numpy(np.array(weight, dtype=weight.dtype).view(np.int32))
    if weight.dtype == torch.uint32:
        return weight.view(torch.int32)
    if weight.dtype != torch.int32:
        raise FormatError(f"MLX packed weight must be uint32, got {weight.dtype}")
    return weight


def _as_float(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, dtype=np.float32))
    return x.float()


def dequantize_mlx(weight, scales, biases, bits: int, group_size: int) -> torch.Tensor:
    """Packed (..., cols * bits / 32) words plus (..., cols / group_size) scales and
    biases -> float32 (..., cols). The arithmetic is float32 (scale * q + bias) whatever
    the dtype of scales and biases."""
    _check_params(bits, group_size)
    w = _as_int32_words(weight)
    scales, biases = _as_float(scales), _as_float(biases)
    per_word = 32 // bits
    cols = w.shape[-1] * per_word
    lead = tuple(w.shape[:-1])
    want = (*lead, cols // group_size)
    if cols % group_size or tuple(scales.shape) != want or tuple(biases.shape) != want:
        raise FormatError(
            f"MLX {bits}-bit weight of shape {tuple(w.shape)} (= {cols} columns, group size "
            f"{group_size}) needs scales and biases of shape {want}, got "
            f"{tuple(scales.shape)} and {tuple(biases.shape)}"
        )
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # The mask also clears the sign bits that int32's arithmetic shift drags in.
    q = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    q = q.reshape(*lead, cols // group_size, group_size).float()
    out = scales.unsqueeze(-1) * q + biases.unsqueeze(-1)
    return out.reshape(*lead, cols)


def quantize_mlx(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None):
    """Quantize like mlx.core.quantize. Returns (packed words as torch.int32 bit
    patterns, scales, biases); scales and biases have `dtype` (default: w's dtype).

    MLX's choice, kept here: the group's edge of larger magnitude is stored exactly as
    the bias and the scale is nudged so that 0.0 lands (nearly) on a grid point. The
    price is that the opposite edge can be clipped by up to one step (not half a step)
    when the nudge shrinks the scale. Arithmetic is float32, as in MLX's GPU kernel.
    """
    _check_params(bits, group_size)
    if w.dim() < 2 or w.shape[-1] % group_size:
        raise ValueError(f"cannot quantize shape {tuple(w.shape)} with group size {group_size}")
    dtype = dtype or w.dtype
    n_bins = float((1 << bits) - 1)
    lead, cols = tuple(w.shape[:-1]), w.shape[-1]
    g = w.float().reshape(*lead, cols // group_size, group_size)

    w_max = g.amax(dim=-1, keepdim=True)
    w_min = g.amin(dim=-1, keepdim=True)
    min_side = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    # Measure from the larger-magnitude edge: a negative scale counts down from w_max.
    scale = torch.where(min_side, scale, -scale)
    edge = torch.where(min_side, w_min, w_max)
    q0 = torch.round(edge / scale)
    scale = torch.where(q0 != 0, edge / q0, scale)
    bias = torch.where(q0 == 0, torch.zeros_like(edge), edge)

    q = torch.clamp(torch.round((g - bias) / scale), 0, n_bins).to(torch.int64)
    q = q.reshape(*lead, cols * bits // 32, 32 // bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (q << shifts).sum(dim=-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words, scale.squeeze(-1).to(dtype), bias.squeeze(-1).to(dtype)
