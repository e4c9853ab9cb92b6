"""Dequantization of GGUF (ggml) tensor types, in torch.

Results equal gguf-py's numpy reference (gguf.quants.dequantize) bit for bit. Every
float32 step below is the same operation, in the same order and precision, as there:
fp16 scales are widened to float32 first, a K-quant sub-block scale is formed as
d * sc (and dmin * m) before it meets the quant, and the quant is an exact small
integer in float32. Reordering any of these (e.g. d * (sc * q), or d*q - 8*d) changes
the last bit of some results.

Block layouts follow ggml-quants.h; the "fields of a byte" helpers below produce the
element order those layouts imply.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ingot.errors import FormatError, UnsupportedError

# (elements per block, bytes per block)
BLOCK: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BLOCK)

# Blocks per dequantization step: bounds the temporaries (several times the output
# size) when a whole embedding matrix is dequantized at once.
_CHUNK_ELEMENTS = 1 << 22


def _type_name(qtype) -> str:
    # Accept gguf's GGMLQuantizationType as well as its name.
    return getattr(qtype, "name", qtype)


def check_type(qtype, tensor_name: str) -> None:
    name = _type_name(qtype)
    if name not in BLOCK:
        raise UnsupportedError(
            f"tensor '{tensor_name}' has quantization type {name}, which Ingot cannot "
            f"dequantize; supported types: {', '.join(SUPPORTED_TYPES)}"
        )


def row_bytes(qtype, n_cols: int, *, tensor_name: str = "?") -> int:
    name = _type_name(qtype)
    check_type(name, tensor_name)
    block_elems, block_bytes = BLOCK[name]
    if n_cols % block_elems:
        raise FormatError(
            f"tensor '{tensor_name}': a {name} row must hold a multiple of {block_elems} "
            f"elements, but this one has {n_cols}"
        )
    return n_cols // block_elems * block_bytes


def _as_bytes(raw) -> torch.Tensor:
    """Flat uint8 view of raw, without copying where possible."""
    if isinstance(raw, torch.Tensor):
        t = raw.detach().contiguous().reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    a = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if a.flags.writeable:
        return torch.from_numpy(a)
    # A read-only memmap: torch warns because writes through the tensor would be
    # undefined. Nothing here writes into its input, so the zero-copy view is safe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian fp16 bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _fields(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., m) bytes -> (..., 8 // width, m): the width-bit fields of each byte, lowest first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(-1, 1)
    return (x.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _bits_le(x: torch.Tensor) -> torch.Tensor:
    """(n, m) bytes -> (n, 8 m): bit i of the little-endian integer the bytes form."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((x.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _f32(b):
    return b.contiguous().view(torch.float32)


def _bf16(b):
    # A shift, not a dtype conversion, so NaN payloads survive exactly as in gguf-py.
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _q4_0(b):
    d = _f16(b[:, :2])
    q = _fields(b[:, 2:], 4).flatten(1).float() - 8
    return d * q


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _fields(b[:, 4:], 4).flatten(1).float()
    return d * q + m


def _q5(b: torch.Tensor) -> torch.Tensor:
    """The 5-bit quants of a Q5_0/Q5_1 block tail: 4 bytes of high bits, 16 of nibbles."""
    qh = _bits_le(b[:, :4])
    ql = _fields(b[:, 4:], 4).flatten(1)
    return ql | (qh << 4)


def _q5_0(b):
    d = _f16(b[:, :2])
    q = _q5(b[:, 2:]).float() - 16
    return d * q


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _q5(b[:, 4:]).float()
    return d * q + m


def _q8_0(b):
    d = _f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return q * d


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _fields(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, 256)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    # 16 six-bit scales: low nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11.
    lo = _fields(scales[:, :8], 4).reshape(n, 16)
    hi = _fields(scales[:, 8:], 2).reshape(n, 16)
    dl = (d * ((lo | (hi << 4)).float() - 32)).view(n, 16, 1)
    ql = _fields(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    # A set hmask bit means "no -4 offset".
    qh = _fields(hmask, 1).reshape(n, 16, 16)
    q = ql.float() - ((qh ^ 1) << 2).float()
    return (dl * q).view(n, 256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K/Q5_K packing)."""
    n = s.shape[0]
    s = s.view(n, 3, 4)
    lo_s, lo_m, rest = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((lo_s & 0x3F, (rest & 0x0F) | ((lo_s >> 2) & 0x30)), dim=-1)
    mn = torch.cat((lo_m & 0x3F, (rest >> 4) | ((lo_m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_scaled(b: torch.Tensor, n_sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d*sc and dmin*m per 32-element sub-block for Q4_K/Q5_K, shaped (n, n_sub, 1)."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return (d * sc.float()).view(n, n_sub, 1), (dmin * mn.float()).view(n, n_sub, 1)


def _q4_k(b):
    n = b.shape[0]
    dl, ml = _k_scaled(b, 8)
    q = _fields(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 8, 32).float()
    return (dl * q - ml).view(n, 256)


def _q5_k(b):
    n = b.shape[0]
    dl, ml = _k_scaled(b, 8)
    qh = _fields(b[:, 16:48], 1)  # (n, 8, 32): bit j of byte i belongs to sub-block j
    ql = _fields(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).view(n, 256)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    dl = (d * scales).view(n, 16, 1)
    lo = _fields(ql.reshape(n, 2, 64), 4).reshape(n, 8, 32)
    hi = _fields(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = ((lo | (hi << 4)).float() - 32).view(n, 16, 16)
    return (dl * q).view(n, 256)


_DEQUANT = {
    "F32": _f32,
    "F16": _f16,
    "BF16": _bf16,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(raw, qtype, shape: tuple[int, ...], *, tensor_name: str = "?") -> torch.Tensor:
    """Bytes of a GGUF tensor -> float32 tensor of `shape` (torch order, last dim contiguous).

    raw: numpy array (uint8, or the native dtype for F32/F16) or torch tensor; it is
    never written to and may be a read-only memmap.
    """
    name = _type_name(qtype)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    n_rows = math.prod(shape[:-1])
    expected = n_rows * row_bytes(name, n_cols, tensor_name=tensor_name)
    data = _as_bytes(raw)
    if data.numel() != expected:
        raise FormatError(
            f"tensor '{tensor_name}': {name} of shape {shape} needs {expected} bytes, "
            f"got {data.numel()}"
        )
    block_elems, block_bytes = BLOCK[name]
    blocks = data.view(-1, block_bytes)
    fn = _DEQUANT[name]
    step = max(1, _CHUNK_ELEMENTS // block_elems)
    if blocks.shape[0] <= step:
        out = fn(blocks).reshape(-1)
        # F32 (and nothing else) can come back as a view of the caller's buffer.
        if out.data_ptr() == data.data_ptr():
            out = out.clone()
        return out.view(shape)
    out = torch.empty(blocks.shape[0], block_elems, dtype=torch.float32)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = fn(blocks[start : start + step]).view(-1, block_elems)
    return out.view(shape)
