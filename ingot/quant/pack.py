"""Packed weights: the one layout every CUDA kernel reads, and conversions into it.

Four kinds (value of element (r, c), g = c // group):
  q4, mins None : scales[r,g] * (q - 8)        q4, mins: scales[r,g] * q + mins[r,g]
  q8, mins None : scales[r,g] * q  (q signed)  q8, mins: scales[r,g] * q + mins[r,g]
  f16           : qweight[r, c]
  q6k           : (supers[r, c // 256] * scales[r,g]) * (q - 32), group 16, the product formed in float32
                  (GGML Q6_K kept at its 6.5625 bits per weight; layout below)

q4 stores two unsigned nibbles per byte; inside each group of G elements of a row, byte i holds element i in
its low nibble and element i + G/2 in its high nibble (GGML Q4_0's order for G = 32), so a kernel reads a
group's low halves and high halves as two contiguous runs. q8 is int8; uint8 is also allowed when mins are
present and q spans 0..255 (MLX 8-bit), since no int8 form of that is exact.

q6k splits each 6-bit quant into a low nibble (qweight, uint8 [n, k/2]) and a high pair (qhigh, uint8 [n, k/4]),
with int8 sub-scales (scales [n, k/16]) and fp16 super-scales (supers [n, k/256]). Every 64 elements of a row
form a unit of four 16-element groups; element 16g + 4c + j of a unit (chunk c, byte j) sits in
  qweight: byte 16 * (c // 2) + 4g + j of the unit's 32, low nibble for even c, high nibble for odd c;
  qhigh:   byte 4g + j of the unit's 16, bits 2c..2c+1.
So int32 word g of the low plane (and word g + 4) and word g of the high plane hold one group, with chunk c of
it in the four bytes' nibbles / pairs: a kernel merges them into one word of four 6-bit quants, one per byte,
with a mask, a shift and an OR per four weights, and the sub-scales of a unit are one int32 word.

Conversions say in `source` whether they are exact, i.e. `dequantize()` equals the source's own float32
dequantization bit for bit. Exactness comes from doing the source's float32 operations in the source's order:
a K-quant sub-block scale d * sc is formed in float32 once and stored as a float32 scale, and GGML's
`d*sc*q - dmin*m` equals `scale*q + min` with min = -(dmin*m) because IEEE subtraction is addition of the
negation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ingot.errors import UnsupportedError
from ingot.quant import ggml
from ingot.quant.ggml import _bits_le, _fields, _k_scale_min  # the block-field decoders, shared

KINDS = ("q4", "q8", "f16", "q6k")
Q6K_SUPER = 256  # elements per q6k super-scale
GROUPS = (16, 32, 64, 128)


@dataclass
class PackedLinear:
    kind: str  # "q4" | "q8" | "f16" | "q6k"
    n: int  # output features (rows)
    k: int  # input features
    group: int  # elements per scale group along k (q4/q8); 0 for f16
    qweight: torch.Tensor  # q4, q6k: uint8 [n, k//2]; q8: int8 (or uint8 with mins) [n, k]; f16: float16 [n, k]
    scales: torch.Tensor | None = None  # [n, k//group] float16 or float32; q6k: int8
    mins: torch.Tensor | None = None  # same shape and dtype as scales, or None (always None for q6k)
    source: str = ""  # where it came from and whether exact
    qhigh: torch.Tensor | None = None  # q6k only: uint8 [n, k//4], the quants' high bit pairs
    supers: torch.Tensor | None = None  # q6k only: float16 [n, k//256]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown packed kind {self.kind!r}")
        if self.kind == "f16":
            assert self.group == 0 and self.scales is None and self.mins is None
            assert self.qweight.dtype == torch.float16 and tuple(self.qweight.shape) == (self.n, self.k)
            return
        assert (self.qhigh is None and self.supers is None) or self.kind == "q6k"
        if self.kind == "q6k":
            assert self.group == 16 and self.k % Q6K_SUPER == 0 and self.mins is None, (self.group, self.k)
            assert self.qweight.dtype == torch.uint8 and tuple(self.qweight.shape) == (self.n, self.k // 2)
            assert self.qhigh.dtype == torch.uint8 and tuple(self.qhigh.shape) == (self.n, self.k // 4)
            assert self.scales.dtype == torch.int8 and tuple(self.scales.shape) == (self.n, self.k // 16)
            assert self.supers.dtype == torch.float16 and tuple(self.supers.shape) == (self.n, self.k // Q6K_SUPER)
            return
        assert self.group in GROUPS and self.k % self.group == 0, (self.group, self.k)
        assert tuple(self.scales.shape) == (self.n, self.k // self.group)
        assert self.scales.dtype in (torch.float16, torch.float32)
        if self.mins is not None:
            assert self.mins.shape == self.scales.shape and self.mins.dtype == self.scales.dtype
        if self.kind == "q4":
            assert self.qweight.dtype == torch.uint8 and tuple(self.qweight.shape) == (self.n, self.k // 2)
        else:
            assert self.qweight.dtype in (torch.int8, torch.uint8) and tuple(self.qweight.shape) == (self.n, self.k)
            assert self.qweight.dtype == torch.int8 or self.mins is not None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def _tensors(self):
        return (self.qweight, self.scales, self.mins, self.qhigh, self.supers)

    def q_values(self) -> torch.Tensor:
        """Integer quants [n, k] as int16 in element order (q4: 0..15, before any -8; q6k: 0..63)."""
        if self.kind == "q6k":
            return unpack_q6k(self.qweight, self.qhigh).to(torch.int16)
        if self.kind == "q4":
            return unpack_q4(self.qweight, self.group).to(torch.int16)
        if self.kind == "q8":
            return self.qweight.to(torch.int16)
        raise ValueError("f16 weights have no quants")

    def dequantize(self) -> torch.Tensor:
        """float32 [n, k]: the reference every kernel is tested against."""
        if self.kind == "f16":
            return self.qweight.float()
        if self.kind == "q6k":
            return q6k_as_q8(self).dequantize()
        q = self.q_values().float()
        if self.kind == "q4" and self.mins is None:
            q = q - 8
        q = q.view(self.n, self.k // self.group, self.group)
        out = self.scales.float().unsqueeze(-1) * q
        if self.mins is not None:
            out = out + self.mins.float().unsqueeze(-1)
        return out.view(self.n, self.k)


def pack_q4(q: torch.Tensor, group: int) -> torch.Tensor:
    """[n, k] values 0..15 -> [n, k//2] uint8 in the group-split nibble order."""
    n, k = q.shape
    halves = q.to(torch.uint8).reshape(n, k // group, 2, group // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_q4(qweight: torch.Tensor, group: int) -> torch.Tensor:
    n, half_k = qweight.shape
    b = qweight.reshape(n, half_k * 2 // group, 1, group // 2)
    return torch.cat((b & 0x0F, b >> 4), dim=2).reshape(n, half_k * 2)


def pack_q6k(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] values 0..63 -> (low nibbles uint8 [n, k//2], high pairs uint8 [n, k//4]) in q6k's order."""
    n, k = q.shape
    u = q.to(torch.uint8).reshape(n, k // 64, 4, 4, 4)  # [n, unit, group g, chunk c, byte j]
    lo = u & 15
    low = torch.stack((lo[:, :, :, 0] | (lo[:, :, :, 1] << 4), lo[:, :, :, 2] | (lo[:, :, :, 3] << 4)), dim=2)
    hi = u >> 4
    high = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
    return low.reshape(n, k // 2), high.reshape(n, k // 4)


def unpack_q6k(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    n, k = low.shape[0], low.shape[1] * 2
    lw = low.reshape(n, k // 64, 2, 1, 4, 4)  # [n, unit, c // 2, -, group g, byte j]
    nib = torch.cat((lw & 15, lw >> 4), dim=3).reshape(n, k // 64, 4, 4, 4).transpose(2, 3)  # [.., g, c, j]
    pairs = torch.stack([(high >> (2 * c)) & 3 for c in range(4)], dim=-1)  # [n, k//4, c]
    pairs = pairs.reshape(n, k // 64, 4, 4, 4).transpose(3, 4)  # [n, unit, g, j, c] -> [.., g, c, j]
    return (nib | (pairs << 4)).reshape(n, k)


def q6k_as_q8(p: PackedLinear) -> PackedLinear:
    """The same values as q8 with group-16 float32 scales d * sc (10 bits per weight; exact)."""
    sc = p.supers.float().repeat_interleave(Q6K_SUPER // 16, dim=1) * p.scales.float()
    q = (p.q_values() - 32).to(torch.int8)
    return PackedLinear("q8", p.n, p.k, 16, q, sc, source=p.source)


PLANES = ("qweight", "scales", "mins", "qhigh", "supers")  # PackedLinear's tensors, each one row per feature


def _each_plane(p: PackedLinear, fn, **fields) -> PackedLinear:
    """p with fn applied to every plane it has (and `fields` replaced)."""
    return replace(p, **{name: None if (t := getattr(p, name)) is None else fn(t) for name in PLANES}, **fields)


def rows(p: PackedLinear, start: int, stop: int) -> PackedLinear:
    """Rows [start, stop) as views: every plane is row-major with one row per output feature."""
    return _each_plane(p, lambda t: t[start:stop], n=stop - start)


def take_rows(p: PackedLinear, index: torch.Tensor) -> PackedLinear:
    """The rows at `index` (int64, on the planes' device or the CPU), as a copy."""
    return _each_plane(p, lambda t: t.index_select(0, index.to(t.device)), n=index.numel())


def periodic_rows(p: PackedLinear, start: int, stop: int, period: int) -> PackedLinear:
    """Rows [start, stop) of every block of `period` rows, block after block, as a copy: one part of a
    matrix that interleave_rows made (an expert's gate rows in each expert's [gate; up])."""
    index = torch.arange(p.n // period)[:, None] * period + torch.arange(start, stop)
    return take_rows(p, index.reshape(-1))


def to_device(p: PackedLinear, device) -> PackedLinear:
    return _each_plane(p, lambda t: t.to(device))


# ---------------------------------------------------------------- GGUF


def _f16_field(b: torch.Tensor, rows: int) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(rows, -1)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _fp16_from_float(ref: torch.Tensor, what: str) -> PackedLinear:
    h = ref.to(torch.float16)
    back = h.float()
    exact = torch.equal(back.view(torch.int32), ref.view(torch.int32)) or bool(
        torch.equal(back, ref) and not torch.isnan(ref).any()
    )
    note = "exact" if exact else f"lossy: max abs err {_max_err(back, ref):.3g}"
    return PackedLinear("f16", ref.shape[0], ref.shape[1], 0, h.contiguous(), source=f"{what} -> f16 ({note})")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def from_ggml(t, *, verify: bool = False) -> PackedLinear:
    """A GGMLTensor (rows = product of the leading dims) -> PackedLinear.

    Exact for F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (tests check it bit for bit); F32/BF16
    become f16 (exact only when the values fit); Q2_K/Q3_K are requantized to q4 (lossy). `verify=True`
    compares with t.dequantize() and falls back to f16 (stated lossy) on any difference.
    """
    qtype = getattr(t.qtype, "name", t.qtype)
    if qtype not in ggml.BLOCK:
        raise UnsupportedError(f"tensor '{t.name}': no packed form for quantization type {qtype}")
    shape = tuple(int(s) for s in t.shape)
    k = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if qtype in ("F32", "BF16", "Q2_K", "Q3_K"):
        ref = t.dequantize().reshape(rows, k)
        if qtype in ("F32", "BF16"):
            return _fp16_from_float(ref, qtype)
        p = quantize(ref, "q4", group=32, sym=False)
        p.source = f"{qtype} -> q4 (lossy: max abs err {_max_err(p.dequantize(), ref):.3g})"
        return p
    raw = ggml._as_bytes(np.ascontiguousarray(t.raw()))
    if qtype == "F16":
        return PackedLinear("f16", rows, k, 0, raw.view(torch.float16).reshape(rows, k).clone(), source="F16 exact")
    block_elems, block_bytes = ggml.BLOCK[qtype]
    ggml.row_bytes(qtype, k, tensor_name=t.name)
    b = raw.reshape(-1, block_bytes)
    nb = b.shape[0]  # blocks in the whole tensor, row-major
    p = _GGML_PACKERS[qtype](b, rows, k, nb)
    p.source = f"{qtype} exact"
    if verify:
        ref = t.dequantize().reshape(rows, k)
        if not _bits_equal(p.dequantize(), ref):
            f = _fp16_from_float(ref, qtype)
            f.source = f"{qtype} -> f16 (packed form not exact; {f.source.split('(')[1]}"
            return f
    return p


def _pack_q4_0(b, rows, k, nb):
    d = _f16_field(b[:, :2], rows)
    return PackedLinear("q4", rows, k, 32, b[:, 2:].reshape(rows, k // 2).clone(), d)


def _pack_q4_1(b, rows, k, nb):
    d, m = _f16_field(b[:, :2], rows), _f16_field(b[:, 2:4], rows)
    return PackedLinear("q4", rows, k, 32, b[:, 4:].reshape(rows, k // 2).clone(), d, m)


def _pack_q8_0(b, rows, k, nb):
    d = _f16_field(b[:, :2], rows)
    return PackedLinear("q8", rows, k, 32, b[:, 2:].contiguous().view(torch.int8).reshape(rows, k).clone(), d)


def _q5_quants(tail: torch.Tensor) -> torch.Tensor:
    # Same element order as ggml._q5: 4 bytes of high bits, then 16 bytes of nibble pairs.
    qh = _bits_le(tail[:, :4])
    ql = _fields(tail[:, 4:], 4).flatten(1)
    return (ql | (qh << 4)).to(torch.int16)


def _pack_q5_0(b, rows, k, nb):
    d = _f16_field(b[:, :2], rows)
    q = (_q5_quants(b[:, 2:]) - 16).to(torch.int8)
    return PackedLinear("q8", rows, k, 32, q.reshape(rows, k), d)


def _pack_q5_1(b, rows, k, nb):
    d, m = _f16_field(b[:, :2], rows), _f16_field(b[:, 2:4], rows)
    q = _q5_quants(b[:, 4:]).to(torch.int8)
    return PackedLinear("q8", rows, k, 32, q.reshape(rows, k), d, m)


def _k_scales_mins(b, rows):
    """Q4_K/Q5_K: float32 d*sc and -(dmin*m) per 32-element sub-block, [rows, k//32]."""
    d, dmin = b[:, :2].contiguous().view(torch.float16).float(), b[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = _k_scale_min(b[:, 4:16])
    return (d * sc.float()).reshape(rows, -1), (-(dmin * mn.float())).reshape(rows, -1)


def _pack_q4_k(b, rows, k, nb):
    s, m = _k_scales_mins(b, rows)
    q = _fields(b[:, 16:].reshape(nb, 4, 32), 4).reshape(rows, k)
    return PackedLinear("q4", rows, k, 32, pack_q4(q, 32), s, m)


def _pack_q5_k(b, rows, k, nb):
    s, m = _k_scales_mins(b, rows)
    qh = _fields(b[:, 16:48], 1)  # (nb, 8, 32)
    ql = _fields(b[:, 48:].reshape(nb, 4, 32), 4).reshape(nb, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8)
    return PackedLinear("q8", rows, k, 32, q.reshape(rows, k), s, m)


def _pack_q6_k(b, rows, k, nb):
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).reshape(rows, k // 16)
    d = b[:, 208:210].contiguous().view(torch.float16).reshape(rows, k // Q6K_SUPER)
    lo = _fields(ql.reshape(nb, 2, 64), 4).reshape(nb, 8, 32)
    hi = _fields(qh.reshape(nb, 2, 32), 2).reshape(nb, 8, 32)
    low, high = pack_q6k((lo | (hi << 4)).reshape(rows, k))
    return PackedLinear("q6k", rows, k, 16, low, sc.clone(), qhigh=high, supers=d.clone())


_GGML_PACKERS = {
    "Q4_0": _pack_q4_0,
    "Q4_1": _pack_q4_1,
    "Q8_0": _pack_q8_0,
    "Q5_0": _pack_q5_0,
    "Q5_1": _pack_q5_1,
    "Q4_K": _pack_q4_k,
    "Q5_K": _pack_q5_k,
    "Q6_K": _pack_q6_k,
}


# ---------------------------------------------------------------- float weights


def quantize(w: torch.Tensor, kind: str = "q4", group: int = 32, sym: bool | None = None) -> PackedLinear:
    """Round-to-nearest group quantization of float [n, k] with float16 scales (and mins).

    Defaults: q4 affine (scale + min), q8 symmetric. "f16" just converts. Quants are computed against the
    fp16-rounded scale and min, so the error is at most half a step plus the min's fp16 rounding.
    """
    w = w.detach().float()
    n, k = w.shape
    if kind == "f16":
        return _fp16_from_float(w.contiguous(), "float")
    if kind not in ("q4", "q8") or group not in GROUPS or k % group:
        raise ValueError(f"cannot quantize [{n}, {k}] as {kind} with group {group}")
    sym = (kind == "q8") if sym is None else sym
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    qmax = 15 if kind == "q4" else 255
    if sym:
        half = 7 if kind == "q4" else 127
        s = (torch.maximum(lo.abs(), hi.abs()) / half).half()
        sf = s.float().unsqueeze(-1)
        q = torch.where(sf > 0, torch.round(g / sf), torch.zeros_like(g)).clamp(-half - 1, half)
        m = None
        if kind == "q4":
            q = q + 8
    else:
        s = ((hi - lo) / qmax).half()
        # q8's quants are signed: shift the grid so that q = -128 sits on the group minimum.
        offset = 0 if kind == "q4" else 128
        m = (lo + offset * s.float()).half()
        sf, mf = s.float().unsqueeze(-1), m.float().unsqueeze(-1)
        q = torch.where(sf > 0, torch.round((g - mf) / sf), torch.zeros_like(g)).clamp(-offset, qmax - offset)
    q = q.reshape(n, k)
    if kind == "q4":
        qw = pack_q4(q.to(torch.uint8), group)
    else:
        qw = q.to(torch.int8)
    how = "sym" if sym else "affine"
    return PackedLinear(kind, n, k, group, qw, s, m, source=f"float -> {kind} g{group} {how} (lossy)")


# ---------------------------------------------------------------- MLX


def from_mlx(weight, scales, biases, bits: int, group: int) -> PackedLinear:
    """MLX affine (value = scale * q + bias, 32 // bits quants per uint32, lowest bits first) -> q4 (2 or
    4 bits) or q8 (8 bits, uint8 quants), exact. bf16 scales become float32 (bf16 -> fp16 is lossy)."""
    from ingot.quant.mlx import _as_int32_words, _check_params

    _check_params(bits, group)
    words = _as_int32_words(weight)
    if words.dim() != 2:
        raise ValueError("from_mlx takes one 2-D weight")
    n = words.shape[0]
    k = words.shape[1] * (32 // bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    q = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, k)

    def as_torch(a):
        return torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a

    s, m = as_torch(scales), as_torch(biases)
    dtype = s.dtype if s.dtype == m.dtype and s.dtype in (torch.float16, torch.float32) else torch.float32
    s, m = s.to(dtype).contiguous(), m.to(dtype).contiguous()
    if bits == 8:
        return PackedLinear("q8", n, k, group, q.to(torch.uint8), s, m, source="MLX 8-bit exact")
    return PackedLinear("q4", n, k, group, pack_q4(q, group), s, m, source=f"MLX {bits}-bit exact")


# ---------------------------------------------------------------- fusing rows


def concat_rows(parts: list[PackedLinear]) -> PackedLinear:
    """Stack along n (fused QKV, gate/up). Parts of different forms are first brought to a common exact form:
    q4 -> q8 (q - 8, or q with the same min), q6k -> q8 group 16, larger groups -> the smallest by repeating
    scales, fp16 scales -> fp32, and missing mins -> -0.0 (x + -0.0 == x bit for bit, even for x = -0.0).
    q6k always becomes q8 here, even when every part is q6k: the q6k GEMV has no gated epilogue (gate/up needs
    one), and QKV parts mix Q6_K with other types in the usual K-quant mixes anyway."""
    if not parts:
        raise ValueError("nothing to concatenate")
    parts = [q6k_as_q8(p) if p.kind == "q6k" else p for p in parts]
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise ValueError(f"cannot stack rows of different widths {[p.k for p in parts]}")
    source = " + ".join(dict.fromkeys(p.source for p in parts))
    kinds = {p.kind for p in parts}
    n = sum(p.n for p in parts)
    if "f16" in kinds:
        if kinds != {"f16"}:
            raise UnsupportedError("no exact common form for f16 and quantized rows")
        return PackedLinear("f16", n, k, 0, torch.cat([p.qweight for p in parts]), source=source)

    group = min(p.group for p in parts)
    with_mins = {p.mins is not None for p in parts}
    sdtypes = {p.scales.dtype for p in parts}
    sdtype = sdtypes.pop() if len(sdtypes) == 1 else torch.float32
    any_mins = True in with_mins

    def grouped(t: torch.Tensor | None, p: PackedLinear, fill: float) -> torch.Tensor:
        if t is None:
            t = torch.full_like(p.scales, fill)
        return t.to(sdtype).repeat_interleave(p.group // group, dim=1)

    scales = torch.cat([grouped(p.scales, p, 0.0) for p in parts])
    mins = torch.cat([grouped(p.mins, p, -0.0) for p in parts]) if any_mins else None

    if kinds == {"q4"} and len(with_mins) == 1:
        if all(p.group == group for p in parts):
            qw = torch.cat([p.qweight for p in parts])
        else:
            qw = torch.cat([pack_q4(p.q_values(), group) for p in parts])
        return PackedLinear("q4", n, k, group, qw, scales, mins, source=source)

    def q8_values(p: PackedLinear) -> torch.Tensor:
        q = p.q_values()
        return q - 8 if p.kind == "q4" and p.mins is None else q

    q = torch.cat([q8_values(p) for p in parts])
    if int(q.min()) >= -128 and int(q.max()) <= 127:
        qw = q.to(torch.int8)
    elif any_mins and int(q.min()) >= 0:
        qw = q.to(torch.uint8)
    else:
        raise UnsupportedError("signed and 0..255 q8 quants have no common exact form")
    return PackedLinear("q8", n, k, group, qw, scales, mins, source=source)


def interleave_rows(parts: list[PackedLinear], blocks: int) -> PackedLinear:
    """Parts made of `blocks` equal row blocks each (stacked experts, [E * F, k]) as one matrix whose block b
    is block b of every part in turn: [gate; up] of each expert, where the MoE kernels read them. The parts
    are brought to a common exact form by concat_rows first."""
    both = concat_rows(parts)
    if blocks == 1:
        return both
    starts = torch.tensor([0] + [p.n for p in parts[:-1]]).cumsum(0).tolist()
    index = torch.cat([start + torch.arange(blocks)[:, None] * (p.n // blocks) + torch.arange(p.n // blocks)
                       for start, p in zip(starts, parts)], dim=1)
    return take_rows(both, index.reshape(-1))
