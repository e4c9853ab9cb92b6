"""Packed weights: GGUF conversions exact bit for bit, quantize() within its error bound, MLX exact,
concat_rows exact across forms. Random data every run; the seed is printed (replay: INGOT_TEST_SEED)."""

import os

import numpy as np
import pytest
import torch

from ingot.errors import UnsupportedError
from ingot.formats.checkpoint import GGMLTensor
from ingot.quant import ggml
from ingot.quant.mlx import dequantize_mlx, quantize_mlx
from ingot.quant.pack import (PackedLinear, concat_rows, from_ggml, from_mlx, pack_q6k, q6k_as_q8, quantize,
                              to_device, unpack_q6k)
from tests.test_quant import random_tensor_bytes

EXACT = ("F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture
def rng():
    seed = int(os.environ.get("INGOT_TEST_SEED", np.random.SeedSequence().entropy))
    print(f"INGOT_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def ggml_tensor(rng, name, rows=5, blocks=3, row_order=None):
    be = ggml.BLOCK[name][0]
    cols = 40 if be == 1 else blocks * be
    return GGMLTensor("blk.0.w", name, (rows, cols), random_tensor_bytes(rng, name, rows, cols), row_order)


@pytest.mark.parametrize("name", EXACT)
def test_ggml_exact(name, rng):
    t = ggml_tensor(rng, name, row_order=np.array([3, 0, 4, 1, 2]))
    p = from_ggml(t)
    assert p.source == f"{name} exact" and (p.n, p.k) == t.shape
    assert bits_equal(p.dequantize(), t.dequantize())
    assert from_ggml(t, verify=True).source == p.source  # verification agrees


def test_ggml_kinds_and_3d(rng):
    kinds = {n: (from_ggml(ggml_tensor(rng, n)).kind, from_ggml(ggml_tensor(rng, n)).group) for n in EXACT}
    assert kinds == {"F16": ("f16", 0), "Q4_0": ("q4", 32), "Q4_1": ("q4", 32), "Q5_0": ("q8", 32),
                     "Q5_1": ("q8", 32), "Q8_0": ("q8", 32), "Q4_K": ("q4", 32), "Q5_K": ("q8", 32),
                     "Q6_K": ("q6k", 16)}
    raw = random_tensor_bytes(rng, "Q4_K", 6, 256)
    t = GGMLTensor("experts", "Q4_K", (2, 3, 256), raw)  # stacked experts: rows are the leading dims
    p = from_ggml(t)
    assert (p.n, p.k) == (6, 256) and bits_equal(p.dequantize(), t.dequantize().reshape(6, 256))


@pytest.mark.parametrize("name", ["F32", "BF16"])
def test_ggml_floats(name, rng):
    x = (rng.standard_normal((4, 40)) * 0.1).astype(np.float32)
    fits = x.astype(np.float16).astype(np.float32)  # values fp16 holds exactly
    for values, exact in ((fits, True), (x, False)):
        if name == "F32":
            raw = values.view(np.uint8)
        else:
            raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        t = GGMLTensor("w", name, (4, 40), raw.reshape(4, -1))
        p = from_ggml(t)
        ref = t.dequantize()
        assert p.kind == "f16"
        if name == "F32" and exact:
            assert "exact" in p.source and bits_equal(p.dequantize(), ref)
        if name == "F32" and not exact:
            assert "lossy" in p.source
        assert torch.allclose(p.dequantize(), ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K"])
def test_ggml_requantized_lossy(name, rng):
    be, bb = ggml.BLOCK[name]
    raw = rng.integers(0, 256, (4, 2, bb), dtype=np.uint8)
    offs = (80, 82) if name == "Q2_K" else (108,)
    for off in offs:  # realistic super-block scales: small positive fp16
        raw[:, :, off:off + 2] = np.float16(rng.uniform(1e-3, 1e-2, (4, 2, 1))).view(np.uint8)
    t = GGMLTensor("w", name, (4, 512), raw.reshape(4, -1))
    p = from_ggml(t)
    ref = t.dequantize()
    assert p.kind == "q4" and p.group == 32 and p.mins is not None and "lossy" in p.source
    step = (ref.view(4, 16, 32).amax(-1) - ref.view(4, 16, 32).amin(-1)) / 15
    err = (p.dequantize() - ref).view(4, 16, 32).abs().amax(-1)
    assert torch.all(err <= 0.5 * step * 1.01 + 2e-3 * ref.abs().max())


def test_ggml_unsupported():
    t = GGMLTensor("blk.1.w", "IQ2_XXS", (2, 256), np.zeros(2 * 66, np.uint8))
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        from_ggml(t)


@pytest.mark.parametrize("kind,sym", [("q4", False), ("q4", True), ("q8", True), ("q8", False)])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_quantize_error_bound(kind, sym, group, rng):
    n, k = 7, 256
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)) * 0.05
    w[1] += 0.3  # one-sided groups
    w[2, :group] = 0.25  # constant group
    w[3, :group] = 0.0  # zero group
    p = quantize(w, kind, group=group, sym=sym)
    assert (p.kind, p.group, p.mins is None) == (kind, group, sym) and p.scales.dtype == torch.float16
    back = p.dequantize()
    g = (n, k // group, group)
    span = w.view(g).amax(-1) - w.view(g).amin(-1)
    if sym:
        span = 2 * w.view(g).abs().amax(-1)
    levels = {"q4": 15, "q8": 255}[kind] - (1 if sym else 0)
    step = span / levels
    # Half a step, plus fp16 rounding of the scale (across the grid) and of the min.
    bound = 0.5 * step + (levels + 1) * step * 2**-11 + 2**-11 * w.view(g).abs().amax(-1) + 1e-8
    assert torch.all((back - w).view(g).abs().amax(-1) <= bound)
    assert torch.all(back[3, :group] == 0)
    assert torch.allclose(back[2, :group], torch.full((group,), 0.25), atol=2e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_from_mlx_exact(bits, group, rng):
    w = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32)) * 0.05
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        words, s, b = quantize_mlx(w, bits, group, dtype=dtype)
        for packed in (words, words.view(torch.uint32), words.numpy().view(np.uint32)):
            p = from_mlx(packed, s, b, bits, group)
            assert p.kind == ("q8" if bits == 8 else "q4") and p.group == group and "exact" in p.source
            assert p.scales.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
            assert bits_equal(p.dequantize(), dequantize_mlx(words, s, b, bits, group))


def random_packed(rng, kind, n, k, group, mins, sdtype=torch.float16):
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    if kind == "f16":
        return PackedLinear("f16", n, k, 0, torch.randn(n, k, generator=g).half())
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 0.01).to(sdtype)
    m = (torch.randn(n, k // group, generator=g) * 0.1).to(sdtype) if mins else None
    if kind == "q4":
        qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    else:
        qw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return PackedLinear(kind, n, k, group, qw, s, m)


@pytest.mark.parametrize("forms", [
    [("q4", 32, False, torch.float16), ("q4", 32, False, torch.float16)],  # plain stacking
    [("q4", 64, True, torch.float16), ("q4", 16, True, torch.float16)],  # regroup q4 nibbles
    [("q4", 32, False, torch.float16), ("q4", 32, True, torch.float16)],  # sym + affine -> q8
    [("q4", 128, False, torch.float16), ("q8", 32, True, torch.float32), ("q8", 16, False, torch.float16)],
])
def test_concat_rows_exact(forms, rng):
    parts = [random_packed(rng, kind, n, 256, g, mins, dt) for (kind, g, mins, dt), n in zip(forms, (6, 3, 5))]
    fused = concat_rows(parts)
    assert fused.n == sum(p.n for p in parts) and fused.group == min(p.group for p in parts)
    assert bits_equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    if {f[0] for f in forms} == {"q4"} and len({f[2] for f in forms}) == 1:
        assert fused.kind == "q4"


def test_concat_rows_f16_and_errors(rng):
    a, b = random_packed(rng, "f16", 3, 64, 0, False), random_packed(rng, "f16", 2, 64, 0, False)
    assert bits_equal(concat_rows([a, b]).dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(UnsupportedError):
        concat_rows([a, random_packed(rng, "q8", 3, 64, 32, False)])
    with pytest.raises(ValueError):
        concat_rows([a, random_packed(rng, "f16", 3, 32, 0, False)])


def test_nbytes_and_to_device(rng):
    p = random_packed(rng, "q4", 4, 128, 32, True)
    assert p.nbytes == 4 * 64 + 2 * 4 * 4 * 2
    q = to_device(p, "cpu")
    assert q.source == p.source and bits_equal(q.dequantize(), p.dequantize())


def test_q6k_layout_and_bytes(rng):
    """Q6_K stays at 6.5625 bits per weight, matches gguf-py bit for bit, and its planes hold what the
    layout note in pack.py says (checked on one element per (group, chunk, byte) position)."""
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    t = ggml_tensor(rng, "Q6_K", rows=3, blocks=2)
    p = from_ggml(t)
    assert p.kind == "q6k" and p.nbytes * 8 == 3 * 512 * 6.5625
    raw = np.ascontiguousarray(t.raw())
    ref = torch.from_numpy(gq.dequantize(raw, GGMLQuantizationType.Q6_K).reshape(3, 512).astype(np.float32))
    assert bits_equal(p.dequantize(), ref)
    q = torch.from_numpy(rng.integers(0, 64, (3, 512))).to(torch.int16)
    low, high = pack_q6k(q)
    assert torch.equal(unpack_q6k(low, high).to(torch.int16), q)
    for g, c, j in np.ndindex(4, 4, 4):
        e = 64 + 16 * g + 4 * c + j  # in the second unit
        lb = int(low[1, 32 + 16 * (c // 2) + 4 * g + j]) >> (4 * (c % 2)) & 15
        hb = int(high[1, 16 + 4 * g + j]) >> (2 * c) & 3
        assert lb | hb << 4 == int(q[1, e])
    assert bits_equal(q6k_as_q8(p).dequantize(), ref)
    moved = to_device(p, "cpu")
    assert moved.kind == "q6k" and bits_equal(moved.dequantize(), ref)
    fused = concat_rows([p, random_packed(rng, "q8", 2, 512, 32, False)])  # -> q8 group 16, exact
    assert fused.kind == "q8" and fused.group == 16
    assert bits_equal(fused.dequantize()[:3], ref)
