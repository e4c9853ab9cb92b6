"""Dequantization checks: GGUF block types against gguf-py bit for bit, MLX affine round trips.

Random data is fresh every run; the seed is printed so a failure can be replayed
(set INGOT_TEST_SEED).
"""

import os
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ingot.errors import FormatError, UnsupportedError
from ingot.quant import ggml
from ingot.quant.mlx import dequantize_mlx, quantize_mlx

# Byte offsets of the fp16 fields (d, dmin/m) inside one block of each type.
FP16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
FLOAT_TYPES = ("F32", "F16", "BF16")


@pytest.fixture
def rng():
    seed = int(os.environ.get("INGOT_TEST_SEED", np.random.SeedSequence().entropy))
    print(f"INGOT_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def random_fp16_bits(rng, shape):
    """Finite fp16 bit patterns over the whole range, subnormals and both signs included."""
    sign = rng.integers(0, 2, shape, dtype=np.uint16) << 15
    exponent = rng.integers(0, 31, shape, dtype=np.uint16) << 10  # 31 would be inf/NaN
    mantissa = rng.integers(0, 1 << 10, shape, dtype=np.uint16)
    return sign | exponent | mantissa


def random_tensor_bytes(rng, name, rows, cols):
    block_elems, block_bytes = ggml.BLOCK[name]
    n_blocks = cols // block_elems
    if name == "F16":
        bits = random_fp16_bits(rng, (rows, cols))
        bits.flat[:2] = (0x7C00, 0xFC00)  # +-inf convert exactly too
        return bits.view(np.uint8)
    raw = rng.integers(0, 256, (rows, n_blocks, block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS.get(name, ()):
        raw[:, :, off : off + 2] = random_fp16_bits(rng, (rows, n_blocks, 1)).view(np.uint8)
    return raw.reshape(rows, n_blocks * block_bytes)


def reference(raw, name):
    return gq.dequantize(raw, GGMLQuantizationType[name])


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray):
    # Compare bit patterns: stricter than == (tells -0.0 from 0.0) and NaN-safe.
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape
    ours_bits = ours.numpy().view(np.uint32)
    ref_bits = np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    bad = np.flatnonzero(ours_bits != ref_bits)
    assert bad.size == 0, f"{bad.size} mismatches, first at flat index {bad[0]}: " \
        f"{ours.numpy().flat[bad[0]]!r} vs {ref.flat[bad[0]]!r}"


def shape_for(name, rows=5):
    block_elems = ggml.BLOCK[name][0]
    return (rows, 40 if block_elems == 1 else 3 * block_elems)


def test_block_table_matches_gguf():
    for name in ggml.SUPPORTED_TYPES:
        assert ggml.BLOCK[name] == GGML_QUANT_SIZES[GGMLQuantizationType[name]], name
    assert ggml.row_bytes("Q4_K", 512) == 288
    assert ggml.row_bytes(GGMLQuantizationType.Q8_0, 64) == 68


@pytest.mark.parametrize("name", ggml.SUPPORTED_TYPES)
def test_random_blocks_match_gguf(name, rng):
    shape = shape_for(name)
    raw = random_tensor_bytes(rng, name, *shape)
    ours = ggml.dequantize(raw, name, shape)
    assert_bits_equal(ours, reference(raw, name))


@pytest.mark.parametrize("name", ["F32", "F16", "Q4_0", "Q5_1", "Q3_K", "Q6_K"])
def test_input_forms(name, rng, tmp_path):
    """Read-only memmaps, torch tensors and 3-d shapes give the same result, quietly."""
    rows, cols = shape_for(name, rows=6)
    raw = random_tensor_bytes(rng, name, rows, cols)
    expected = reference(raw, name)

    path = tmp_path / "t.bin"
    raw.tofile(path)
    memmap = np.memmap(path, dtype=np.uint8, mode="r")
    forms = [memmap, torch.from_numpy(raw.copy()), raw.reshape(-1)]
    if name in ("F32", "F16"):
        forms.append(raw.view(np.float32 if name == "F32" else np.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for form in forms:
            assert_bits_equal(ggml.dequantize(form, name, (rows, cols)), expected)
        ours = ggml.dequantize(memmap, name, (2, 3, cols))
    assert_bits_equal(ours, expected.reshape(2, 3, cols))
    # The F32 result must not alias the caller's (read-only) buffer.
    ours.fill_(0)
    assert np.array_equal(np.asarray(memmap), raw.reshape(-1))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "BF16"])
def test_chunked_dequantization(name, rng, monkeypatch):
    monkeypatch.setattr(ggml, "_CHUNK_ELEMENTS", 1000)  # forces several uneven chunks
    shape = (7, 5 * ggml.BLOCK[name][0] if name != "BF16" else 333)
    raw = random_tensor_bytes(rng, name, *shape)
    assert_bits_equal(ggml.dequantize(raw, name, shape), reference(raw, name))


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_quantized_floats(name, rng):
    """Realistic blocks: what gguf-py's quantizer makes of random weights."""
    qtype = GGMLQuantizationType[name]
    x = rng.standard_normal((8, 256)).astype(np.float32) * np.float32(0.02)
    x[0, :32] = 0.0  # all-zero block: d == 0
    x[1, :32] = 0.5  # constant block
    x[2] *= 1000.0
    data = gq.quantize(x, qtype)
    assert_bits_equal(ggml.dequantize(data, name, x.shape), gq.dequantize(data, qtype))


def test_ragged_row_is_rejected():
    with pytest.raises(FormatError, match=r"'blk\.0\.ffn_up\.weight'.*Q4_0.*multiple of 32.*33"):
        ggml.dequantize(np.zeros(2 * 18, np.uint8), "Q4_0", (2, 33), tensor_name="blk.0.ffn_up.weight")
    with pytest.raises(FormatError, match="multiple of 256"):
        ggml.row_bytes("Q6_K", 4000)


def test_wrong_byte_count_is_rejected():
    with pytest.raises(FormatError, match=r"needs 36 bytes, got 35"):
        ggml.dequantize(np.zeros(35, np.uint8), "Q4_0", (2, 32))


@pytest.mark.parametrize("name", ["IQ2_XXS", "TQ1_0", "MXFP4", "Q8_K", "IQ4_NL"])
def test_unsupported_types(name):
    with pytest.raises(UnsupportedError) as err:
        ggml.check_type(name, "blk.3.attn_v.weight")
    message = str(err.value)
    assert "blk.3.attn_v.weight" in message and name in message and "Q4_K" in message
    with pytest.raises(UnsupportedError, match=name):
        ggml.dequantize(np.zeros(64, np.uint8), name, (1, 256), tensor_name="x")
    ggml.check_type("Q4_K", "blk.3.attn_v.weight")  # supported: no error


# ---------------------------------------------------------------- MLX


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mlx_round_trip(bits, group_size, rng):
    rows, cols = 6, 256
    w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)) * 0.05
    w[1] += 0.3  # a row with every group one-sided (all positive)
    w[2, :group_size] = 0.25  # constant group
    words, scales, biases = quantize_mlx(w, bits, group_size)
    assert words.dtype == torch.int32 and words.shape == (rows, cols * bits // 32)
    assert scales.shape == biases.shape == (rows, cols // group_size)

    back = dequantize_mlx(words, scales, biases, bits, group_size)
    assert back.dtype == torch.float32 and back.shape == w.shape

    g = (rows, cols // group_size, group_size)
    step = scales.abs().unsqueeze(-1)
    err = (back - w).abs().view(g)
    tiny = 4 * torch.finfo(torch.float32).eps * w.abs().view(g).amax(-1, keepdim=True)
    # MLX's zero-preserving scale nudge may clip the far edge of a group by up to a
    # full step; everything inside the grid is within half a step.
    pos = (w.view(g) - biases.unsqueeze(-1)) / scales.unsqueeze(-1)
    inside = (pos >= -0.5) & (pos <= (1 << bits) - 0.5)
    assert torch.all(err[inside] <= (step / 2 + tiny).expand(g)[inside])
    assert torch.all(err <= step + tiny)
    assert back[2, :group_size].eq(0.25).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlx_representable_values_are_exact(bits, group_size, dtype, rng):
    rows, cols = 4, 256
    n_bins = (1 << bits) - 1
    n_groups = cols // group_size
    q = rng.integers(0, n_bins + 1, (rows, n_groups, group_size))
    q[..., 0], q[..., 1] = 0, n_bins  # pin the grid's ends to the group's min and max
    q = rng.permuted(q, axis=-1)
    zero = rng.integers(0, n_bins + 1, (rows, n_groups, 1))  # grid index of 0.0
    step = 2.0 ** -rng.integers(3, 12, (rows, n_groups, 1))
    w = torch.from_numpy((step * (q - zero)).astype(np.float32).reshape(rows, cols))

    words, scales, biases = quantize_mlx(w, bits, group_size, dtype=dtype)
    assert scales.dtype == biases.dtype == dtype
    assert torch.equal(dequantize_mlx(words, scales, biases, bits, group_size), w)


def test_mlx_packing_order_and_input_forms():
    q = np.arange(64) % 16  # element 0 in the lowest 4 bits of word 0
    words = np.array([0x76543210, 0xFEDCBA98] * 4, dtype=np.uint32).reshape(1, 8)
    scales = np.array([[0.5, 2.0]], dtype=np.float16)
    biases = np.array([[-1.0, 3.0]], dtype=np.float16)
    expected = torch.from_numpy(
        (np.repeat([0.5, 2.0], 32) * q + np.repeat([-1.0, 3.0], 32)).astype(np.float32)
    ).view(1, 64)
    for packed in (words, words.view(np.int32), torch.from_numpy(words.view(np.int32)),
                   torch.from_numpy(words.view(np.int32)).view(torch.uint32)):
        for s, b in ((scales, biases), (torch.from_numpy(scales).bfloat16(), torch.from_numpy(biases))):
            assert torch.equal(dequantize_mlx(packed, s, b, 4, 32), expected)

    # q - 15 spans [-15, 0]: scale 1, bias -15, so quantize must give back these words.
    ours, s, b = quantize_mlx(torch.from_numpy(q.astype(np.float32) - 15).view(1, 64), 4, 32)
    assert torch.equal(ours, torch.from_numpy(words.view(np.int32)))
    assert torch.equal(s, torch.ones(1, 2)) and torch.equal(b, torch.full((1, 2), -15.0))


def test_mlx_leading_dims_and_errors():
    w = torch.randn(2, 3, 128)
    words, s, b = quantize_mlx(w, 8, 64)
    assert words.shape == (2, 3, 32) and s.shape == (2, 3, 2)
    assert dequantize_mlx(words, s, b, 8, 64).shape == (2, 3, 128)
    with pytest.raises(FormatError, match="scales and biases of shape"):
        dequantize_mlx(words, s[..., :1], b[..., :1], 8, 64)
    with pytest.raises(FormatError, match="uint32"):
        dequantize_mlx(words.float(), s, b, 8, 64)
    with pytest.raises(UnsupportedError, match="3 bits"):
        dequantize_mlx(words, s, b, 3, 64)
    with pytest.raises(UnsupportedError, match="group size 16"):
        quantize_mlx(w, 4, 16)
