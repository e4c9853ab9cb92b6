"""The prefill GEMM against x @ W.dequantize().T in fp32, under the interpreter on machines without a GPU.

Operands go through fp16 on the tensor cores, so results are compared by relative error of the whole
output (norm), not elementwise. INGOT_TEST_SEED fixes the otherwise fresh random inputs.
"""

import os
import pytest
import torch
import torch.nn.functional as F

from ingot.backends import reference
from ingot.backends.cuda import gemm
from ingot.backends.cuda.gemm import matmul, pick_tiles, rms_norm_half, workspace_numel
from ingot.quant.pack import PackedLinear, quantize, to_device

SEED = int(os.environ.get("INGOT_TEST_SEED", torch.seed() % 2**31))
print(f"test_cuda_gemm seed: INGOT_TEST_SEED={SEED}")

# Small tiles keep the interpreter quick while still crossing tile edges in M, N and K.
SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2)


def make_weight(kind, n, k, group, mins, gen, scale_dtype=torch.float16, unsigned=False) -> PackedLinear:
    """Random quants and scales straight in the packed layout (quantize() only makes a few of the forms)."""
    if kind == "f16":
        return PackedLinear("f16", n, k, 0, (torch.randn(n, k, generator=gen) * 0.1).half())
    ng = k // group
    scales = (torch.rand(n, ng, generator=gen) * 0.02 + 0.005).to(scale_dtype)
    mn = (torch.randn(n, ng, generator=gen) * 0.05).to(scale_dtype) if mins else None
    if kind == "q4" or unsigned:
        size = (n, k // 2) if kind == "q4" else (n, k)
        qw = torch.randint(0, 256, size, generator=gen, dtype=torch.int32).to(torch.uint8)
    else:
        qw = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
    return PackedLinear(kind, n, k, group, qw, scales, mn)


def to(w: PackedLinear, device) -> PackedLinear:
    return to_device(w, device)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check(got, want, tol=3e-3):
    got = got.cpu()
    assert not got.isnan().any(), "some outputs were never written"
    err = rel_err(got, want)
    assert err < tol, f"relative error {err:.2e} (seed {SEED})"


def poisoned(shape, device):
    return torch.full(shape, float("nan"), device=device, dtype=torch.float32)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(SEED)


@pytest.mark.parametrize("kind,group,mins", [
    ("q4", 16, False), ("q4", 32, False), ("q4", 32, True), ("q4", 64, True), ("q4", 128, False),
    ("q8", 16, True), ("q8", 32, False), ("q8", 64, True), ("q8", 128, False), ("q8", 128, True),
    ("f16", 0, False),
])
@pytest.mark.parametrize("M", [17, 40])
def test_plain(kind, group, mins, M, gen, kernel_device):
    N, K = 72, 128 if group != 128 else 256
    w = make_weight(kind, N, K, group, mins, gen)
    x = torch.randn(M, K, generator=gen)
    out = poisoned((M, N), kernel_device)
    tiles = dict(SMALL, BLOCK_K=max(64, group)) if kind == "q4" else SMALL
    got = matmul(x.to(kernel_device), to(w, kernel_device), out=out, tiles=tiles)
    assert got is out
    check(got, x @ w.dequantize().T)


@pytest.mark.parametrize("kind,group,block_k,K", [
    ("q8", 128, 64, 384), ("q8", 16, 32, 192), ("q8", 32, 128, 160), ("q4", 32, 128, 192), ("q4", 16, 32, 176),
])
def test_tile_spans_groups(kind, group, block_k, K, gen, kernel_device):
    """K tiles inside one group, across several, and K that ends mid-tile (fp32 scales and mins here)."""
    M, N = 17, 40
    w = make_weight(kind, N, K, group, True, gen, scale_dtype=torch.float32)
    x = torch.randn(M, K, generator=gen).half()
    got = matmul(x.to(kernel_device), to(w, kernel_device), tiles=dict(SMALL, BLOCK_K=block_k))
    check(got, x.float() @ w.dequantize().T)


def test_quantized_real_weights(gen, kernel_device):
    """quantize()'s output (affine q4, symmetric q8) and MLX-style uint8 q8 with mins, via the real type."""
    M, N, K = 40, 72, 192
    x = torch.randn(M, K, generator=gen)
    dense = torch.randn(N, K, generator=gen) * 0.05
    for w in (quantize(dense, "q4", 64), quantize(dense, "q4", 32, sym=True), quantize(dense, "q8", 32),
              make_weight("q8", N, K, 64, True, gen, unsigned=True)):
        got = matmul(x.to(kernel_device), to(w, kernel_device), out=poisoned((M, N), kernel_device),
                     tiles=dict(SMALL, BLOCK_K=64))
        check(got, x @ w.dequantize().T)


@pytest.mark.parametrize("fast,swap", [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1)])
@pytest.mark.parametrize("kind,group,mins,scale_dtype,unsigned", [
    ("q4", 32, False, torch.float16, False), ("q4", 64, True, torch.float32, False),
    ("q8", 32, False, torch.float16, False), ("q8", 16, False, torch.float32, False),
    ("q8", 32, True, torch.float16, False), ("q8", 64, True, torch.float16, True),
])
def test_dequant_paths(kind, group, mins, scale_dtype, unsigned, fast, swap, gen, kernel_device):
    """Every dequantization path (FAST 0: through fp32, 1: fp16 bit tricks, 2: the same in PTX, run as 1 by
    the interpreter) with W as the dot's right operand or, swapped, its left one; plain and gated."""
    M, N, K = 40, 72, 192
    w = make_weight(kind, N, K, group, mins, gen, scale_dtype=scale_dtype, unsigned=unsigned)
    x = torch.randn(M, K, generator=gen)
    tiles = dict(SMALL, BLOCK_K=64, FAST=fast, SWAP=swap)
    got = matmul(x.to(kernel_device), to(w, kernel_device), out=poisoned((M, N), kernel_device), tiles=tiles)
    dq = w.dequantize()
    check(got, x @ dq.T)
    res = torch.randn(M, N // 2, generator=gen)
    got = matmul(x.to(kernel_device), to(w, kernel_device), gated="silu", residual=res.to(kernel_device),
                 tiles=tiles)
    check(got, F.silu(x @ dq[:N // 2].T) * (x @ dq[N // 2:].T) + res)


def test_fast_q4_bit_trick_exact(gen, kernel_device):
    """The fp16 bit trick reproduces every nibble pair: weights that are the quants themselves (scale 1)."""
    N, K = 32, 256
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128).repeat(16, 1)
    w = PackedLinear("q4", N, K, 32, q, torch.ones(N, K // 32, dtype=torch.float16))
    x = torch.eye(K)[:40]
    got = matmul(x.to(kernel_device), to(w, kernel_device), tiles=dict(SMALL, BLOCK_K=64, FAST=1, SWAP=1))
    assert torch.equal(got.cpu(), (x @ w.dequantize().T))


@pytest.mark.parametrize("kind", ["q4", "q8", "f16"])
def test_residual_aliases_out(kind, gen, kernel_device):
    M, N, K = 40, 72, 128
    w = make_weight(kind, N, K, 32, False, gen)
    x = torch.randn(M, K, generator=gen)
    res = torch.randn(M, N, generator=gen)
    want = res + x @ w.dequantize().T
    buf = res.clone().to(kernel_device)
    got = matmul(x.to(kernel_device), to(w, kernel_device), out=buf, residual=buf, tiles=SMALL)
    assert got is buf
    check(got, want)
    # A separate residual, too.
    out = poisoned((M, N), kernel_device)
    matmul(x.to(kernel_device), to(w, kernel_device), out=out, residual=res.to(kernel_device), tiles=SMALL)
    check(out, want)


@pytest.mark.parametrize("kind,act", [("q4", "silu"), ("q8", "gelu_tanh"), ("f16", "silu")])
def test_gated(kind, act, gen, kernel_device):
    M, F_, K = 40, 36, 128
    w = make_weight(kind, 2 * F_, K, 64, kind == "q8", gen)
    x = torch.randn(M, K, generator=gen)
    dq = w.dequantize()
    want = reference.activation(act, x @ dq[:F_].T) * (x @ dq[F_:].T)
    out = poisoned((M, F_), kernel_device)
    got = matmul(x.to(kernel_device), to(w, kernel_device), out=out, gated=act, tiles=SMALL)
    check(got, want)
    res = torch.randn(M, F_, generator=gen)
    got = matmul(x.to(kernel_device), to(w, kernel_device), gated=act, residual=res.to(kernel_device), tiles=SMALL)
    check(got, want + res)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_norm_prologue(x_dtype, gen, kernel_device):
    M, N, K, eps = 17, 72, 192, 1e-5
    w = make_weight("q4", N, K, 64, True, gen)
    x = (torch.randn(M, K, generator=gen) * 3).to(x_dtype)
    nw = torch.rand(K, generator=gen) + 0.5
    normed = reference.rms_norm(x.float(), nw, eps)
    buf = torch.full((M, K), float("nan"), device=kernel_device, dtype=torch.float16)
    got = matmul(x.to(kernel_device), to(w, kernel_device), norm_weight=nw.to(kernel_device), eps=eps,
                 norm_out=buf, tiles=dict(SMALL, BLOCK_K=128))
    torch.testing.assert_close(buf.cpu().float(), normed, rtol=1e-3, atol=1e-3)
    check(got, normed @ w.dequantize().T)
    # Norm and gate together, with the wrapper allocating the fp16 buffer.
    wg = make_weight("q8", 2 * 36, K, 32, False, gen)
    dq = wg.dequantize()
    got = matmul(x.to(kernel_device), to(wg, kernel_device), norm_weight=nw.to(kernel_device), eps=eps,
                 gated="silu", tiles=SMALL)
    check(got, F.silu(normed @ dq[:36].T) * (normed @ dq[36:].T))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_rms_norm_half_multi_block(dtype, tol, gen, kernel_device):
    x = torch.randn(5, 200, generator=gen)
    nw = torch.randn(200, generator=gen)
    got = rms_norm_half(x.to(kernel_device), nw.to(kernel_device), 1e-6, dtype=dtype, block=64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), reference.rms_norm(x, nw, 1e-6), rtol=tol, atol=tol)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="triton 3.6's interpreter multiplies bf16 bit patterns as uint16 in tl.dot")
def test_bf16_operands(gen, kernel_device):
    """dot_dtype=bf16 keeps activations beyond fp16's range finite (here 1e5, which fp16 would make inf)."""
    M, N, K = 17, 40, 128
    w = make_weight("q4", 2 * N, K, 32, True, gen)
    x = torch.randn(M, K, generator=gen) * 1e5
    dq = w.dequantize()
    got = matmul(x.to(kernel_device), to(w, kernel_device), gated="silu", dot_dtype=torch.bfloat16, tiles=SMALL)
    check(got, F.silu(x @ dq[:N].T) * (x @ dq[N:].T), tol=2e-2)
    nw = torch.rand(K, generator=gen) + 0.5
    buf = torch.empty(M, K, device=kernel_device, dtype=torch.bfloat16)
    got = matmul(x.to(kernel_device), to(w, kernel_device), norm_weight=nw.to(kernel_device), norm_out=buf,
                 dot_dtype=torch.bfloat16, tiles=SMALL)
    check(got, reference.rms_norm(x, nw, 1e-6) @ dq.T, tol=1e-2)


@pytest.mark.parametrize("kind,act,swap", [("q4", "silu", 0), ("q8", None, 1), ("q4", None, 1), ("f16", "gelu_tanh", 0)])
def test_split_k(kind, act, swap, gen, kernel_device):
    """Short calls split K across programs (gemv's tickets): plain, gated, with a residual that aliases out,
    a K whose last split is shorter, twice on one workspace (the counters go back to 0)."""
    M, F_, K = 12, 40, 5 * 64
    w = make_weight(kind, 2 * F_ if act else F_, K, 32, kind == "q8", gen)
    x = torch.randn(M, K, generator=gen)
    dq = w.dequantize()
    want = reference.activation(act, x @ dq[:F_].T) * (x @ dq[F_:].T) if act else x @ dq.T
    tiles = dict(SMALL, SWAP=swap, SPLIT=3)  # 5 K steps in splits of 2, 2, 1
    ws = torch.zeros(4096, device=kernel_device)
    for _ in range(2):
        res = torch.randn(M, F_, generator=gen)
        buf = res.clone().to(kernel_device)
        got = matmul(x.to(kernel_device), to(w, kernel_device), out=buf, residual=buf, gated=act, tiles=tiles,
                     workspace=ws)
        check(got, want + res)
        assert not ws[: gemm.gemv.SPLIT_COUNTERS].any(), "ticket counters left non-zero"
    with pytest.raises(ValueError, match="one M tile"):
        matmul(torch.randn(40, K).to(kernel_device), to(w, kernel_device), gated=act, tiles=tiles)


def test_split_plan():
    """A short call with few column tiles splits towards SPLIT_PROGRAMS programs, whole K steps each; a long
    one or a wide one does not; the workspace it asks for is the split layout's."""
    w = quantize(torch.randn(2048, 8192), "q4", group=32, sym=True)
    cfg = pick_tiles(16, 2048, 8192, "q4", 32, False)
    splits = gemm._splits(16, 2048, 8192, cfg)
    assert splits > 1 and -(-2048 // cfg["BLOCK_N"]) * splits <= 2 * gemm.SPLIT_PROGRAMS
    assert workspace_numel(w, 16) > 0
    assert gemm._splits(512, 2048, 8192, pick_tiles(512, 2048, 8192, "q4", 32, False)) == 1
    # one M tile but more rows than the workspaces are sized for (a 96- or 128-row prefill bucket): no split
    for m in (96, 128, 256):
        assert gemm._splits(m, 2048, 8192, pick_tiles(m, 2048, 8192, "q4", 32, False, 4)) == 1
        assert workspace_numel(w, m) == 0
    assert gemm._splits(16, 128256, 2048, pick_tiles(16, 128256, 2048, "q4", 32, False)) == 1


def test_bad_arguments(gen, kernel_device):
    w = to(make_weight("q4", 8, 64, 32, False, gen), kernel_device)
    x = torch.randn(17, 64, device=kernel_device)
    with pytest.raises(ValueError, match="features"):
        matmul(torch.randn(17, 32, device=kernel_device), w)
    with pytest.raises(ValueError, match="gated"):
        matmul(x, w, gated="relu")
    with pytest.raises(ValueError, match="BLOCK_K"):
        matmul(x, w, tiles=dict(SMALL, BLOCK_K=16))
    with pytest.raises(ValueError, match="out"):
        matmul(x, w, out=torch.empty(17, 8, device=kernel_device, dtype=torch.float16))
    with pytest.raises(ValueError, match="dot_dtype"):
        matmul(x, w, dot_dtype=torch.float32)


def test_pick_tiles_h100_shapes():
    """Tile choices stay tensor-core shaped, group-aligned for q4, and within shared memory."""
    for M, N, K, kind, group, gated in [(2048, 4096, 4096, "q4", 32, False), (512, 14336, 4096, "q4", 128, True),
                                        (40, 4096, 4096, "q8", 32, False), (1024, 151936, 2048, "f16", 1, False)]:
        for x_bytes in (2, 4):
            t = pick_tiles(M, N, K, kind, group, gated, x_bytes)
            assert t["BLOCK_M"] in (64, 128, 256) and t["BLOCK_N"] in (64, 128) and t["BLOCK_K"] >= 64
            assert kind != "q4" or t["BLOCK_K"] % group == 0
            assert 2 <= t["num_stages"] <= 4 and t["num_warps"] in (4, 8)
            assert t["FAST"] in (0, 1, 2) and t["SWAP"] in (0, 1)
    assert pick_tiles(2048, 4096, 4096, "q4", 32, False)["BLOCK_M"] == 128


def test_prefill_q4_weight_tiles_copy_in_16_byte_pieces():
    """The M = 512 q4 GEMMs of Qwen3-8B compiled for sm_90a (benchmarks/kernel_regs.py --gemm, a process
    without the interpreter): qkv, o and down stream their weight tiles in 16-byte async copies only. When the
    split-K loop start lost its BLOCK_K alignment (78e9749), some became 8-byte copies (gate_up's 8-byte ones
    are its 4-scale rows, as before)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_regs.py"), "--gemm", str(root)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip()}
    assert set(lines) == {"qkv", "o", "gate_up", "down"}, out.stdout
    for case in ("qkv", "o", "down"):
        assert "cp.async" in lines[case] and "x16B" in lines[case], lines[case]
        assert "x8B" not in lines[case] and "x4B" not in lines[case], lines[case]
