"""q6k kernels (GEMV, row-sliced matmul, embedding rows) against the dequantized weight in fp32 torch, and a tiny
GGUF model whose output matrix is Q6_K on the CUDA backend against the reference backend.

Weights are random planes (every quant 0..63 and every sub-scale sign appear); N is odd and not a multiple of
the row tile; K is a multiple of 256. Random data every run; the seed is printed (replay: INGOT_TEST_SEED).
"""

import os
from dataclasses import replace

import pytest
import torch

from ingot.backends import reference
from ingot.backends.cuda import gemm, gemv, gemv_q6k
from ingot.errors import UnsupportedError
from ingot.quant.pack import PackedLinear, to_device
from tests.test_cuda_gemv import check


@pytest.fixture
def gen():
    seed = int(os.environ.get("INGOT_TEST_SEED", torch.seed() % (1 << 31)))
    print(f"INGOT_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def q6k_weight(gen, n, k) -> PackedLinear:
    def plane(cols, dtype=torch.uint8, lo=0, hi=256):
        return torch.randint(lo, hi, (n, cols), generator=gen, dtype=torch.int16).to(dtype)

    supers = ((torch.rand(n, k // 256, generator=gen) + 0.5) * 2e-4).half()
    return PackedLinear("q6k", n, k, 16, plane(k // 2), plane(k // 16, torch.int8, -128, 128), qhigh=plane(k // 4),
                        supers=supers)


def expected(x, w, norm_weight=None, eps=1e-6, residual=None):
    h = x.float()
    if norm_weight is not None:
        h = reference.rms_norm(h, norm_weight.float(), eps)
    y = h @ w.dequantize().T
    return y + residual if residual is not None else y


def poison(m, n, dev):
    return torch.full((m, n), float("nan"), device=dev)


@pytest.mark.parametrize("m,n,k", [(1, 101, 512), (1, 37, 768), (3, 45, 512), (17, 19, 256)])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_linear(m, n, k, norm, gen, kernel_device):
    dev = kernel_device
    w = q6k_weight(gen, n, k)
    x = torch.randn(m, k, generator=gen) * 2
    nw = torch.randn(k, generator=gen) if norm else None
    out = gemv.linear(x.to(dev), to_device(w, dev), out=poison(m, n, dev), eps=1e-5,
                      norm_weight=None if nw is None else nw.to(dev))  # through gemv's dispatch
    check(out, expected(x, w, nw, 1e-5))


@pytest.mark.parametrize("m", [1, 5])
def test_split_k_residual_fp16(m, gen, kernel_device):
    dev = kernel_device
    n, k = 29, 768
    w = q6k_weight(gen, n, k)
    x = torch.randn(m, k, generator=gen).half()
    nw, res = torch.randn(k, generator=gen), torch.randn(m, n, generator=gen)
    cfg = replace(gemv_q6k.plan(n, k, m), split=3)
    ws = torch.zeros(gemv_q6k.workspace_numel(w, m, cfg), device=dev)  # gemv's layout: counters start at 0
    for _ in range(2):  # the second call finds the ticket counters back at zero
        out = res.clone().to(dev)
        got = gemv_q6k.linear(x.to(dev), to_device(w, dev), out=out, norm_weight=nw.to(dev), residual=out,
                              workspace=ws, config=cfg)
        assert got is out
        check(out, expected(x, w, nw, 1e-6, res))
    assert (ws[: -(-n // cfg.block_n)].view(torch.int32) == 0).all()


def test_prefill_matmul_slices(gen, kernel_device):
    dev = kernel_device
    m, n, k = 40, 23, 256  # two 32-row slices
    w = q6k_weight(gen, n, k)
    x, nw = torch.randn(m, k, generator=gen), torch.randn(k, generator=gen)
    check(gemm.matmul(x.to(dev), to_device(w, dev), norm_weight=nw.to(dev)), expected(x, w, nw))


def test_embed_rows_exact(gen, kernel_device):
    w = q6k_weight(gen, 11, 512)
    ids = torch.tensor([3, 0, 10, 3], dtype=torch.int32)
    out = gemv.embed_rows(ids.to(kernel_device), to_device(w, kernel_device), 0.5)
    assert torch.equal(out.cpu(), w.dequantize()[ids.long()] * 0.5)


def test_plan_and_errors(gen):
    assert gemv_q6k.plan(128256, 2048, 1).split == 1  # an lm_head fills the GPU with rows alone
    c = gemv_q6k.plan(4096, 4096, 1)
    assert c.split > 1 and -(-4096 // c.block_n) * c.split >= gemv_q6k.TARGET_PROGRAMS // 2
    big = q6k_weight(gen, 4096, 4096)
    tiles = -(-4096 // c.block_n)  # gemv's layout: counters, sums of squares, then the partials
    assert gemv_q6k.workspace_numel(big, 1, c) >= tiles + tiles * c.split + c.split * 4096
    assert gemv.workspace_numel(big, 1) == gemv_q6k.workspace_numel(big, 1)  # CPU: the interpreter's plan
    assert gemv_q6k.plan(4096, 4096, 1, interpreted=True).split == 1
    w = q6k_weight(gen, 8, 256)
    with pytest.raises(UnsupportedError):
        gemv_q6k.linear(torch.randn(1, 256), w, gated="silu")
    with pytest.raises(ValueError):
        gemv_q6k.linear(torch.randn(1, 512), w)
    with pytest.raises(ValueError):
        gemv_q6k.linear(torch.randn(33, 256), w)


@pytest.mark.parametrize("native", [False, True])
def test_tiny_gguf_with_q6k_output_matches_reference(native, tmp_path, kernel_device, monkeypatch):
    """A 1-layer Qwen3 with tied embeddings whose token_embd.weight is Q6_K (as llama-quantize writes Q4_0
    files): the CUDA backend holds it as exact q8 with group-16 scales (by default) or keeps it q6k
    (INGOT_Q6K_NATIVE), for the embedding rows and the lm_head, and gives the reference backend's logits,
    in prefill (whole-sequence logits through the matmul path) and decode."""
    import ingot
    from ingot.backends.cuda import weights
    from ingot.bench.synthetic import write_synthetic_gguf

    monkeypatch.setattr(weights, "Q6K_NATIVE", native)

    small = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, vocab_size=8192, tie_word_embeddings=True)
    path = write_synthetic_gguf("qwen3-0.6b", "q4_0", tmp_path / "tiny.gguf", layers=1, progress=False,
                                overrides=small)
    fast = ingot.load(path, device=kernel_device, backend="cuda", max_context=32, progress=False)
    ref = ingot.load(path, device=kernel_device, backend="reference", dtype=torch.float32, max_context=32,
                     progress=False)
    embed = fast.backend.w.embed
    assert fast.backend.w.lm_head is embed and (embed.kind, embed.group) == (("q6k", 16) if native else ("q8", 16))
    ids = torch.randint(0, 8192, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(fast.runner.forward_all(ids[:17]), ref.runner.forward_all(ids[:17])) < 5e-3  # > DECODE_ROWS
    for t in ids[17:]:
        assert rel(fast.runner.decode(t), ref.runner.decode(t)) < 5e-3
