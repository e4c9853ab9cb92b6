"""Decode GEMV kernels against x @ W.dequantize().T in fp32 (after the same norm / activation in torch).

Shapes are odd on purpose: N not a multiple of BLOCK_N, K a multiple of the group but not of BLOCK_K. The
interpreter is slow, so the (kind, mins, group) x M matrix is covered with two shapes rather than all four.
Random data every run; the seed is printed (replay: INGOT_TEST_SEED).
"""

import os
from dataclasses import replace

import pytest
import torch

from ingot.backends import reference
from ingot.backends.cuda import gemv
from ingot.backends.cuda.gemv import SPLIT_COUNTERS, TARGET_PROGRAMS, GemvConfig, embed_rows, linear, plan, workspace_numel
from ingot.quant.pack import PackedLinear, quantize, to_device


@pytest.fixture
def gen():
    seed = int(os.environ.get("INGOT_TEST_SEED", torch.seed() % (1 << 31)))
    print(f"INGOT_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def packed(gen, kind, n, k, group, mins):
    """Random packed weights with scales of a realistic size; quants cover their whole range."""
    if kind == "f16":
        return PackedLinear("f16", n, k, 0, (torch.randn(n, k, generator=gen) * 0.05).half())
    s = (torch.rand(n, k // group, generator=gen) * 0.01 + 0.002).half()
    m = (torch.randn(n, k // group, generator=gen) * 0.02).half() if mins else None
    if kind == "q4":
        qw = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    else:
        qw = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return PackedLinear(kind, n, k, group, qw, s, m)


def to(p: PackedLinear, dev) -> PackedLinear:
    return to_device(p, dev)


def normed(x, norm_weight=None, eps=1e-6):
    """x in fp32, after the RMSNorm the kernel fuses in front when there is a norm weight."""
    h = x.float()
    return h if norm_weight is None else reference.rms_norm(h, norm_weight.float(), eps)


def expected(x, w, norm_weight=None, eps=1e-6, residual=None, gated=None):
    y = normed(x, norm_weight, eps) @ w.dequantize().T
    if gated:
        f = w.n // 2
        y = reference.activation(gated, y[:, :f]) * y[:, f:]
    return y + residual if residual is not None else y


def rounding_scale(x, w, norm_weight=None, eps=1e-6, gated=None):
    """Per output, the size of an error of one relative rounding on each product x_i w_ji: their root sum of
    squares, carried through the gated activation to first order. Kernels that round x or the products to fp16
    are held to it, not to the output, which a gate that cancels to near zero leaves far below the rounding."""
    h = normed(x, norm_weight, eps)
    wd = w.dequantize()
    size = ((h * h) @ (wd * wd).T).sqrt()
    if not gated:
        return size
    f = w.n // 2
    y = h @ wd.T
    gate = y[:, :f].clone().requires_grad_()
    act = reference.activation(gated, gate)
    (slope,) = torch.autograd.grad(act.sum(), gate)
    return slope.abs() * y[:, f:].abs() * size[:, :f] + act.detach().abs() * size[:, f:]


def check(out, ref, tol=1e-5, scale=None):
    """Relative error against the reference's norm, or against the norm of `scale` (rounding_scale)."""
    out = out.cpu()
    assert not torch.isnan(out).any(), "an output element was never written"
    err = ((out - ref).norm() / (ref if scale is None else scale).norm()).item()
    assert err < tol, f"relative error {err:.3g}"


def poison(m, n, dev):
    return torch.full((m, n), float("nan"), device=dev)


VARIANTS = [("q4", False), ("q4", True), ("q8", False), ("q8", True)]


@pytest.mark.parametrize("kind,mins", VARIANTS)
@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_kinds_groups_rows(kind, mins, group, gen, kernel_device):
    # K: a multiple of the group, not of BLOCK_K (except q8 with group 128, where BLOCK_K = 128 = group).
    k_small = {16: 96, 32: 96, 64: 192, 128: 384}[group]
    for m, n, k, dtype in ((1, 200, k_small + 2 * group, torch.float32), (3, 72, k_small, torch.float16),
                           (17, 24, k_small, torch.float32)):
        w = packed(gen, kind, n, k, group, mins)
        x = torch.randn(m, k, generator=gen).to(dtype)
        out = linear(x.to(kernel_device), to(w, kernel_device), out=poison(m, n, kernel_device))
        check(out, expected(x, w), 1e-5 if dtype == torch.float32 else 2e-3)


def test_f16_rows(gen, kernel_device):
    for m, n, k in ((1, 200, 100), (3, 72, 40), (17, 24, 72)):  # f16 K needs no group multiple
        w = packed(gen, "f16", n, k, 0, False)
        x = torch.randn(m, k, generator=gen)
        check(linear(x.to(kernel_device), to(w, kernel_device), out=poison(m, n, kernel_device)), expected(x, w), 1e-5)


FUSIONS = {
    "norm": dict(norm=True),
    "residual": dict(residual=True),
    "silu": dict(gated="silu"),
    "gelu": dict(gated="gelu_tanh"),
    "norm+silu": dict(norm=True, gated="silu"),
    "norm+residual": dict(norm=True, residual=True),
    "norm+residual-in-place": dict(norm=True, residual=True, in_place=True),
    "norm+gelu+residual": dict(norm=True, gated="gelu_tanh", residual=True),
}


@pytest.mark.parametrize("split", [False, True], ids=["whole-k", "split-k"])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fusions(fusion, split, gen, kernel_device):
    f = FUSIONS[fusion]
    kind, group = ("q4", 32) if split else ("q8", 64)
    m, n, k = (3, 72, 640) if fusion.startswith("norm+r") else (1, 130, 640)
    w = packed(gen, kind, n, k, group, mins=split)
    f_out = n // 2 if f.get("gated") else n
    x = torch.randn(m, k, generator=gen) * 3
    nw = torch.randn(k, generator=gen) if f.get("norm") else None
    res = torch.randn(m, f_out, generator=gen) if f.get("residual") else None
    dev = kernel_device
    out = res.clone().to(dev) if f.get("in_place") else poison(m, f_out, dev)
    cfg = replace(plan(f_out, k, m, kind, group, bool(f.get("gated"))), split=2 if split else 1)
    ws = torch.zeros(workspace_numel(w, m, f.get("gated"), cfg), device=dev)
    assert (ws.numel() > 0) == split
    got = linear(x.to(dev), to(w, dev), out=out, norm_weight=None if nw is None else nw.to(dev), eps=1e-5,
                 residual=out if f.get("in_place") else (None if res is None else res.to(dev)),
                 gated=f.get("gated"), workspace=ws, config=cfg)
    assert got is out
    ref = expected(x, w, nw, 1e-5, res, f.get("gated"))
    if cfg.unpack == 2:  # plan()'s gated q4 calls multiply in fp16 pairs
        check(out, ref, 2e-3, rounding_scale(x, w, nw, 1e-5, f.get("gated")))
    else:
        check(out, ref)
    tiles_n = -(-f_out // cfg.block_n)  # the workspace starts with one ticket counter per column tile
    assert not ws[:tiles_n].view(torch.int32).any(), "a split-K ticket counter was not reset"


@pytest.mark.parametrize("kind,mins,group", [("q4", False, 16), ("q8", True, 128), ("f16", False, 0)])
def test_split_k_kinds(kind, mins, group, gen, kernel_device):
    for m, n, k, split in ((1, 40, 1152, 3), (17, 24, 384, 2)):
        w = packed(gen, kind, n, k, group, mins)
        x = torch.randn(m, k, generator=gen)
        base = plan(n, k, m, kind, group, False)
        cfg = GemvConfig(base.block_m, base.block_n, base.block_k, split)
        out = linear(x.to(kernel_device), to(w, kernel_device), out=poison(m, n, kernel_device), config=cfg)
        check(out, expected(x, w), 1e-5)


def test_plan_heuristic():
    # Few output rows, long K: split so that the grid covers the SMs several times over.
    c = plan(4096, 4096, 1, "q4", 32, False)
    assert c.split > 1 and c.block_m == 1 and 4096 // c.block_n * c.split >= TARGET_PROGRAMS // 2
    assert plan(128256, 4096, 1, "q4", 32, False).split == 1  # lm_head: rows alone fill the GPU
    assert plan(200, 320, 17, "q8", 128, False).block_m == 32
    for k in (96, 4096, 14336):
        c = plan(4096, k, 1, "q8", 16, False)
        assert c.block_k >= 16 and -(-k // c.block_k) >= c.split  # no empty splits
    with pytest.raises(ValueError):
        plan(64, 64, 33, "q4", 32, False)


def test_quantized_float_weights(gen, kernel_device):
    """The HF path: quantize() output through the kernel matches its own dequantization."""
    w = quantize(torch.randn(72, 320, generator=gen), "q4", group=64)
    x = torch.randn(2, 320, generator=gen)
    check(linear(x.to(kernel_device), to(w, kernel_device)), expected(x, w), 1e-5)


@pytest.mark.parametrize("kind,mins,group", [("q4", False, 32), ("q4", True, 128), ("q8", True, 16),
                                             ("f16", False, 0)])
def test_embed_rows(kind, mins, group, gen, kernel_device):
    vocab, k = 50, 384 if group == 128 else 608 if kind == "f16" else 640 + group
    w = packed(gen, kind, vocab, k, group, mins)
    ids = torch.tensor([7, 0, 49, 7, 23], dtype=torch.int64 if mins else torch.int32)
    out = poison(len(ids), k, kernel_device)
    embed_rows(ids.to(kernel_device), to(w, kernel_device), 1.5, out=out)
    ref = w.dequantize()[ids.long()] * 1.5
    out = out.cpu()
    assert not torch.isnan(out).any()
    assert torch.allclose(out, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("unpack", [0, 1])
@pytest.mark.parametrize("kind,mins,group", [("q4", False, 16), ("q4", True, 32), ("q4", False, 128),
                                             ("q8", False, 32), ("q8", True, 16), ("q8", "u8", 64)])
def test_word_kernel(kind, mins, group, unpack, pairs, gen, kernel_device, monkeypatch):
    """The M = 1 word path (both unpack forms, x read in pairs or one element a load), whole-K and split-K,
    with a K tail; q8 "u8": 0..255 + mins."""
    monkeypatch.setattr(gemv, "X_PAIRS", pairs)
    n, k = 70, 3 * 256 + 2 * group
    w = packed(gen, kind, n, k, group, bool(mins))
    if mins == "u8":
        w = PackedLinear("q8", n, k, group, torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8),
                         w.scales, w.mins)
    x = torch.randn(1, k, generator=gen)
    for block_n, split in ((32, 1), (64, 2)):
        cfg = GemvConfig(1, block_n, max(256 if kind == "q4" else 128, group), split, kernel="word", unpack=unpack)
        out = linear(x.to(kernel_device), to(w, kernel_device), out=poison(1, n, kernel_device), config=cfg)
        check(out, expected(x, w), 1e-5)


@pytest.mark.parametrize("kind,mins,group", [("q4", False, 32), ("q4", True, 32), ("q4", False, 128)])
def test_word_kernel_half2(kind, mins, group, gen, kernel_device):
    """UNPACK 2 (fp16 products): within fp16's error of the fp32 result, whole-K and split-K, with a K tail,
    plain and norm + gated + residual; x large enough (x 2^-8 in fp16: |x| up to ~1e3) not to overflow."""
    n, k = 2 * 70, 3 * 256 + 2 * group
    w = packed(gen, kind, n, k, group, mins)
    x = torch.randn(1, k, generator=gen) * 300
    nw = torch.rand(k, generator=gen) + 0.5
    res = torch.randn(1, n // 2, generator=gen)
    dev = kernel_device
    for block_n, split in ((32, 1), (64, 2)):
        cfg = GemvConfig(1, block_n, 256, split, kernel="word", unpack=2)
        out = linear(x.to(dev), to(w, dev), out=poison(1, n, dev), config=cfg)
        check(out, expected(x, w), 2e-3, rounding_scale(x, w))
        ws = torch.zeros(workspace_numel(w, 1, "silu", cfg), device=dev)
        out = linear(x.to(dev), to(w, dev), out=poison(1, n // 2, dev), norm_weight=nw.to(dev), eps=1e-5,
                     residual=res.to(dev), gated="silu", workspace=ws, config=cfg)
        check(out, expected(x, w, nw, 1e-5, res, "silu"), 2e-3, rounding_scale(x, w, nw, 1e-5, "silu"))


@pytest.mark.parametrize("unpack", [1, 2])
@pytest.mark.parametrize("kind,mins", [("q4", False), ("q4", True), ("q8", False)])
def test_word_kernel_even(kind, mins, unpack, gen, kernel_device):
    """Whole tiles (N a multiple of BLOCK_N, K of BLOCK_K: the unmasked loads, the last step's reload in
    place of a prefetch past its split), plain and norm + gated + residual, at 1, 2 and 4 K splits."""
    if unpack == 2 and kind != "q4":
        pytest.skip("fp16 pairs: q4 only")
    n, k = 2 * 64, 4 * 256
    w = packed(gen, kind, n, k, 32, mins)
    x = torch.randn(1, k, generator=gen)
    nw = torch.rand(k, generator=gen) + 0.5
    res = torch.randn(1, n // 2, generator=gen)
    half2 = unpack == 2
    plain_scale = rounding_scale(x, w) if half2 else None
    gated_scale = rounding_scale(x, w, nw, 1e-5, "silu") if half2 else None
    dev = kernel_device
    for split in (1, 2, 4):
        cfg = GemvConfig(1, 32, 256 if kind == "q4" else 128, split, kernel="word", unpack=unpack)
        check(linear(x.to(dev), to(w, dev), out=poison(1, n, dev), config=cfg), expected(x, w),
              2e-3 if half2 else 1e-5, plain_scale)
        ws = torch.zeros(workspace_numel(w, 1, "silu", cfg), device=dev)
        out = linear(x.to(dev), to(w, dev), out=poison(1, n // 2, dev), norm_weight=nw.to(dev), eps=1e-5,
                     residual=res.to(dev), gated="silu", workspace=ws, config=cfg)
        check(out, expected(x, w, nw, 1e-5, res, "silu"), 2e-3 if half2 else 1e-4, gated_scale)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32])  # fp32: x and norm weight read in pairs
def test_word_kernel_fused_gated(x_dtype, gen, kernel_device):
    """Gated + norm + residual on the word path, split-K, fp16 and fp32 x."""
    n, k = 2 * 40, 512
    w = packed(gen, "q4", n, k, 32, False)
    x = (torch.randn(1, k, generator=gen) * 3).to(x_dtype)
    nw = torch.randn(k, generator=gen)
    res = torch.randn(1, n // 2, generator=gen)
    dev = kernel_device
    for split in (1, 2):
        cfg = GemvConfig(1, 16, 256, split, kernel="word", unpack=1)
        ws = torch.zeros(workspace_numel(w, 1, "silu", cfg), device=dev)
        out = linear(x.to(dev), to(w, dev), out=poison(1, n // 2, dev), norm_weight=nw.to(dev), eps=1e-5,
                     residual=res.to(dev), gated="silu", workspace=ws, config=cfg)
        check(out, expected(x, w, nw, 1e-5, res, "silu"), 2e-3)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("kind,mins", [("q4", False), ("q8", False), ("q4", True)])
def test_word_norm_handoff(kind, mins, split, gen, kernel_device):
    """A residual call hands its row on pre-normed (norm_out: x * weight and per-tile sums of squares), and
    the next call (norm_parts) equals the same call normalizing x itself; odd N (a partial last tile), plain
    and gated consumers, whole and split K on both sides."""
    hidden, k_in, n2 = 224, 256, 2 * 48
    w1 = packed(gen, kind, hidden, k_in, 32, mins)  # the producer: a [hidden, k_in] residual projection
    w2 = packed(gen, kind, n2, hidden, 32, mins)  # the consumer
    a = torch.randn(1, k_in, generator=gen)
    res = torch.randn(1, hidden, generator=gen) * 2
    nw = torch.rand(hidden, generator=gen) + 0.5
    dev = kernel_device
    block_k = 256 if kind == "q4" else 128
    cfg1 = GemvConfig(1, 64, block_k, split, kernel="word")
    x = res.to(dev).clone()
    hand = gemv.NormOut(nw.to(dev), poison(1, hidden, dev), torch.full((8,), float("nan"), device=dev))
    ws = torch.zeros(1 << 14, device=dev)
    linear(a.to(dev), to(w1, dev), residual=x, out=x, workspace=ws, config=cfg1, norm_out=hand)
    x_ref = expected(a, w1, residual=res)
    check(x, x_ref)
    parts = gemv.norm_parts(w1, 1, cfg1)
    assert parts == 4
    check(hand.xn, x_ref * nw)
    assert torch.allclose(hand.ss[:parts].sum().cpu(), (x_ref**2).sum(), rtol=1e-5)
    for gated in (None, "silu"):
        cfg2 = GemvConfig(1, 16, 64 if kind == "q4" else 32, split, kernel="word")
        n_out = n2 // 2 if gated else n2
        got = linear(hand.xn, to(w2, dev), out=poison(1, n_out, dev), norm_parts=hand.ss[:parts], eps=1e-5,
                     gated=gated, workspace=ws, config=cfg2)
        check(got, expected(x_ref, w2, nw, 1e-5, gated=gated), 1e-4)
    with pytest.raises(ValueError, match="norm_weight or norm_parts"):
        linear(hand.xn, to(w2, dev), norm_weight=nw.to(dev), norm_parts=hand.ss[:parts], config=cfg2)


def test_plan_word():
    for n, k, kind in ((3072, 2048, "q4"), (128256, 2048, "q4"), (4096, 12288, "q8")):
        c = plan(n, k, 1, kind, 32, False)
        assert c.kernel == "word" and c.block_m == 1
        tiles, k_tiles = -(-n // c.block_n), -(-k // c.block_k)
        assert tiles * c.split >= min(TARGET_PROGRAMS // 2, tiles * k_tiles) and k_tiles >= c.split
    assert plan(128256, 2048, 1, "q4", 32, False).split == 1
    for n_out, k in ((8192, 2048), (12288, 4096)):  # gated q4: fp16 pairs, 128 rows, ~4 programs per SM
        c = plan(n_out, k, 1, "q4", 32, True)
        assert (c.kernel, c.block_n, c.unpack) == ("word", 128, 2)
        assert gemv.HALF2_PROGRAMS // 2 <= -(-n_out // 128) * c.split <= 2 * gemv.HALF2_PROGRAMS


def test_plan_dp4a(monkeypatch):
    """INGOT_DECODE_GEMV=dp4a: 64-row (q4) / 128-row (q8) tiles, K split towards ~512 programs, no empty split."""
    monkeypatch.setattr(gemv, "DECODE_KERNEL", "dp4a")
    for n, k, kind, gated, block_n in ((3072, 2048, "q4", False, 64), (8192, 2048, "q4", True, 64),
                                       (4096, 12288, "q8", False, 128), (128256, 2048, "q8", False, 128)):
        c = plan(n, k, 1, kind, 32, gated)
        assert (c.kernel, c.block_n, c.block_m) == ("dp4a", block_n, 1)
        tiles, k_tiles = -(-n // c.block_n), -(-k // c.block_k)
        assert k_tiles >= c.split and -(-k_tiles // -(-k_tiles // c.split)) == c.split
        assert tiles * c.split >= min(gemv.DP4A_TARGET_PROGRAMS // 2, tiles * k_tiles)
    assert plan(3072, 2048, 1, "q4", 32, False).split == 8  # 48 tiles x 8 K steps: every K step its own split


@pytest.mark.parametrize("m,kernel", [(1, "word"), (1, "byte"), (5, "byte")])
def test_split_k_repeated_calls(m, kernel, gen, kernel_device):
    """One-launch split-K: the last program of each column tile reduces in split order and resets its ticket
    counter, so calls sharing a workspace (as the decode step's do) stay bit-identical, whatever the shape;
    a call with more column tiles than the last one finds its counters at 0 (not the last call's partials)."""
    dev = kernel_device
    n, k = 2 * 37, 768
    w_cpu = packed(gen, "q4", n, k, 32, False)
    w = to(w_cpu, dev)
    x = torch.randn(m, k, generator=gen).to(dev)
    nw = torch.randn(k, generator=gen).to(dev)
    cfg_a = GemvConfig(triton_pow2(m), 16, 256, 3, kernel=kernel)  # 3 column tiles
    cfg_b = GemvConfig(triton_pow2(m), 16, 256, 2, kernel=kernel)  # 5: counters where cfg_a's data could sit
    ws = torch.zeros(max(workspace_numel(w, m, "silu", cfg_a), workspace_numel(w, m, None, cfg_b)), device=dev)
    first = linear(x, w, norm_weight=nw, gated="silu", workspace=ws, config=cfg_a)
    other = linear(x, w, workspace=ws, config=cfg_b)  # a different tiling in between, same counters
    again = linear(x, w, norm_weight=nw, gated="silu", workspace=ws, config=cfg_a)
    assert torch.equal(first, again)
    assert not ws[:SPLIT_COUNTERS].view(torch.int32).any()  # every counter back at 0
    check(first, expected(x.cpu(), w_cpu, nw.cpu(), gated="silu"), 1e-5)
    check(other, expected(x.cpu(), w_cpu), 1e-5)
    unsplit = linear(x, w, config=replace(cfg_b, split=1))
    check(unsplit, other.cpu(), 1e-6)


def triton_pow2(m):
    return 1 << (m - 1).bit_length()


# ---------------------------------------------------------------- int8-activation (dp4a) path, M = 1


def int8_x(x, w, norm_weight=None):
    """The dp4a kernel's activation quantization in torch: x (times norm_weight) per sub-group (q4: each half
    group, q8: the group), symmetric absmax / 127, round half to even; returns the dequantized x."""
    h = x.float() * (norm_weight.float() if norm_weight is not None else 1.0)
    sub = h.reshape(-1, w.group // 2 if w.kind == "q4" else w.group)
    amax = sub.abs().amax(dim=1, keepdim=True)
    # tensor / tensor: correctly rounded, like the kernel's div_rn (torch's scalar / tensor is not)
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    return (torch.round(sub * inv) * (amax / c127)).reshape(h.shape)


def expected_dp4a(x, w, norm_weight=None, eps=1e-6, residual=None, gated=None):
    y = int8_x(x, w, norm_weight) @ w.dequantize().T
    if norm_weight is not None:
        y = y * torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + eps)
    if gated:
        y = reference.activation(gated, y[:, : w.n // 2]) * y[:, w.n // 2:]
    return y + residual if residual is not None else y


DP4A_WEIGHTS = [("q4", False, 32), ("q4", True, 64), ("q4", False, 16), ("q8", False, 32), ("q8", True, 128),
                ("q8", "u8", 16)]


@pytest.mark.parametrize("kind,mins,group", DP4A_WEIGHTS)
def test_dp4a_kernel(kind, mins, group, gen, kernel_device):
    """Against a torch emulation of the same int8 quantization (fp32 rounding apart), and against the float
    reference with a tolerance for 8-bit activations (~0.5% relative error per output, one rounding of x)."""
    n, k = 70, 3 * 256 + 2 * group
    w = packed(gen, kind, n, k, group, bool(mins))
    if mins == "u8":
        w = PackedLinear("q8", n, k, group, torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8),
                         w.scales, w.mins)
    for dtype, block_n, split in ((torch.float32, 32, 1), (torch.float16, 64, 2)):
        x = torch.randn(1, k, generator=gen).to(dtype)
        cfg = GemvConfig(1, block_n, max(256 if kind == "q4" else 128, group), split, kernel="dp4a")
        out = linear(x.to(kernel_device), to(w, kernel_device), out=poison(1, n, kernel_device), config=cfg)
        check(out, expected_dp4a(x, w), 1e-5)
        check(out, expected(x, w), 2e-2)


@pytest.mark.parametrize("kind,mins", [("q4", False), ("q4", True), ("q8", False), ("q8", "u8")])
def test_dp4a_integer_dot_exact(kind, mins, gen, kernel_device):
    """x already on the int8 grid (each sub-group holds a +-127, so the x scale is 1) and power-of-two weight
    scales: every step is exact in fp32, so the kernel must give the integer dot product bit for bit."""
    n, k, group = 40, 512, 32
    sub = group // 2 if kind == "q4" else group
    x = torch.randint(-127, 128, (k // sub, sub), generator=gen)
    x[torch.arange(k // sub), torch.randint(0, sub, (k // sub,), generator=gen)] = 127
    x = x.reshape(1, k).float()
    w = packed(gen, kind, n, k, group, bool(mins))
    scales = torch.pow(2.0, -torch.randint(0, 3, w.scales.shape, generator=gen).float()).half()
    qw = w.qweight
    if mins == "u8":
        qw = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    mn = torch.randint(-8, 9, w.scales.shape, generator=gen).half() / 4 if mins else None
    w = PackedLinear(kind, n, k, group, qw, scales, mn)
    cfg = GemvConfig(1, 16, 256 if kind == "q4" else 128, 2, kernel="dp4a")
    out = linear(x.to(kernel_device), to(w, kernel_device), config=cfg).cpu()
    exact = (x.double() @ w.dequantize().double().T).float()
    assert torch.equal(out, exact)


def test_dp4a_fused_repeated(gen, kernel_device):
    """Norm + gated + residual on the dp4a path, whole-K and split-K; repeated split calls are bit-identical."""
    dev = kernel_device
    n, k = 2 * 45, 768
    w = packed(gen, "q4", n, k, 32, False)
    x = torch.randn(1, k, generator=gen) * 3
    nw = torch.randn(k, generator=gen)
    res = torch.randn(1, n // 2, generator=gen)
    ref = expected_dp4a(x, w, nw, 1e-5, res, "silu")
    for split in (1, 3):
        cfg = GemvConfig(1, 16, 256, split, kernel="dp4a")
        ws = torch.zeros(workspace_numel(w, 1, "silu", cfg), device=dev)
        outs = [linear(x.to(dev), to(w, dev), norm_weight=nw.to(dev), eps=1e-5, residual=res.to(dev),
                       gated="silu", workspace=ws, config=cfg) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])
        check(outs[0], ref, 1e-5)
