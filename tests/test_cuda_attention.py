"""Decode and prefill attention against a plain-torch reference (float64 math on the fp16 cache values),
under the interpreter on machines without a GPU.

Cache positions a call must not read hold NaN, so a stray read shows up in the output. Queries go through
fp16 on the tensor cores, so results are compared by relative error of the whole output (norm).
INGOT_TEST_SEED fixes the otherwise fresh random inputs.
"""

import os

import pytest
import torch

from ingot.backends.cuda.attention import decode_attention, decode_scratch, prefill_attention

SEED = int(os.environ.get("INGOT_TEST_SEED", torch.seed() % 2**31))
print(f"test_cuda_attention seed: INGOT_TEST_SEED={SEED}")
TOL = 2e-3


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(SEED)


def reference(q, k, v, qpos, scale, window):
    """q [T, Hq, D] at positions qpos [T]; k, v [S, Hkv, D] hold positions 0..S-1."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * scale
    kpos = torch.arange(k.shape[0])
    allowed = kpos[None, :] <= qpos[:, None]
    if window:
        allowed &= qpos[:, None] - kpos[None, :] < window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def rel_err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def make_cache(gen, max_batch, max_ctx, hkv, d, device):
    """Random fp16 K/V (with a spread of key norms so the softmax is not flat), all NaN until filled."""
    shape = (max_batch, max_ctx, hkv, d)
    k = (torch.randn(shape, generator=gen) * torch.rand(shape[:3] + (1,), generator=gen) * 2).half()
    v = torch.randn(shape, generator=gen).half()
    nan = torch.full(shape, float("nan"), dtype=torch.float16)
    return k, v, nan.clone().to(device), nan.clone().to(device)


# (head_dim, kv heads, group, window, seq_lens, slots); seq_lens cross the 32-key chunks in the small config.
DECODE_CASES = [
    (64, 2, 1, 0, [1, 33, 96], [2, 0, 3]),
    (128, 2, 4, 0, [70], [1]),
    (256, 1, 8, 0, [32, 5, 64], [3, 1, 2]),
    (64, 1, 8, 20, [1, 41, 96], [1, 3, 0]),
    (128, 2, 1, 13, [12, 50, 77], [0, 2, 1]),
    (64, 2, 3, 0, [17, 65, 31], [3, 2, 1]),
    (128, 1, 4, 40, [90], [2]),
    (512, 1, 8, 0, [40, 7], [1, 0]),  # Gemma 4's global heads
]


# small: one 32-key split per program; strided: 6 splits of 16 keys shared by 4 programs; default: H100 sizes.
CONFIGS = {"small": (32, 16, 64), "strided": (16, 16, 4), "default": (128, None, 64)}


@pytest.mark.parametrize("d,hkv,g,window,lens,slots", DECODE_CASES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", [True, False], ids=["one_launch", "split_reduce"])
def test_decode(kernel_device, gen, d, hkv, g, window, lens, slots, config, fused):
    max_batch, max_ctx, B, hq = 4, 96, len(lens), hkv * g
    scale = 0.07 if d == 256 else d**-0.5  # Gemma-style scales are not 1/sqrt(D)
    k_full, v_full, k_cache, v_cache = make_cache(gen, max_batch, max_ctx, hkv, d, kernel_device)
    for s, n in zip(slots, lens):
        k_cache[s, :n], v_cache[s, :n] = k_full[s, :n].to(kernel_device), v_full[s, :n].to(kernel_device)
    dtype = torch.float16 if d == 128 else torch.float32
    q = torch.randn(B, hq, d, generator=gen).to(dtype)
    chunk, block_n, programs = CONFIGS[config]
    scratch = decode_scratch(max_batch, hq, d, max_ctx, kernel_device, chunk=chunk, programs=programs)
    out = torch.full((B, hq, d), float("nan"), device=kernel_device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=kernel_device)
    slot_t = torch.tensor(slots, dtype=torch.int32, device=kernel_device)
    got = decode_attention(q.to(kernel_device), k_cache, v_cache, seq_lens, slot_t, scale=scale, window=window,
                           out=out, scratch=scratch, block_n=block_n, fused=fused)
    assert got is out and not out.isnan().any()
    assert (scratch.count == 0).all(), "the single-launch counters must be back at zero for the next launch"
    for b, (s, n) in enumerate(zip(slots, lens)):
        want = reference(q[b : b + 1], k_full[s, :n], v_full[s, :n], torch.tensor([n - 1]), scale, window)
        err = rel_err(out[b : b + 1], want)
        assert err < TOL, f"row {b} (len {n}): relative error {err:.2e} (seed {SEED})"


def test_decode_steps_reuse_buffers(kernel_device, gen):
    """Growing lengths through the same out/scratch, as a replayed CUDA graph would; an empty row gives 0."""
    d, hkv, g, max_ctx = 64, 1, 4, 48
    k_full, v_full, k_cache, v_cache = make_cache(gen, 2, max_ctx, hkv, d, kernel_device)
    scratch = decode_scratch(2, hkv * g, d, max_ctx, kernel_device, chunk=16, programs=2)
    out = torch.empty(2, hkv * g, d, device=kernel_device)
    seq_lens = torch.zeros(2, dtype=torch.int32, device=kernel_device)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=kernel_device)
    for n in (15, 16, 17, 40):
        k_cache[1, :n], v_cache[1, :n] = k_full[1, :n].to(kernel_device), v_full[1, :n].to(kernel_device)
        seq_lens.copy_(torch.tensor([n, 0]))
        q = torch.randn(2, hkv * g, d, generator=gen)
        decode_attention(q.to(kernel_device), k_cache, v_cache, seq_lens, slots, scale=0.125, window=24,
                         out=out, scratch=scratch, block_n=16)
        want = reference(q[:1], k_full[1, :n], v_full[1, :n], torch.tensor([n - 1]), 0.125, 24)
        assert rel_err(out[:1], want) < TOL, f"len {n} (seed {SEED})"
        assert (out[1] == 0).all()
        assert (scratch.count == 0).all()


@pytest.mark.parametrize("d,g,window", [(128, 2, 0), (64, 4, 0), (128, 1, 0), (64, 4, 700)])
def test_decode_long_and_short_same_capture(kernel_device, gen, d, g, window):
    """H100 defaults (128-key splits, up to 64 programs) with a long max_ctx: the grid is fixed as a captured
    graph's would be, and the device picks the path per length: one program writing the output directly
    (short rows), several programs each holding many strided splits merged by the last one (long rows)."""
    hkv, max_ctx = 2, 9000
    hq = hkv * g
    k_full, v_full, k_cache, v_cache = make_cache(gen, 2, max_ctx, hkv, d, kernel_device)
    lens_seq = [[40, 8999], [128, 129], [1, 8192], [2000, 7]]
    n_max = max(max(l) for l in lens_seq)
    for s in (0, 1):
        k_cache[s, :n_max] = k_full[s, :n_max].to(kernel_device)
        v_cache[s, :n_max] = v_full[s, :n_max].to(kernel_device)
    scratch = decode_scratch(2, hq, d, max_ctx, kernel_device)
    assert scratch.m.shape[2] == 64
    out = torch.empty(2, hq, d, device=kernel_device)
    seq_lens = torch.zeros(2, dtype=torch.int32, device=kernel_device)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=kernel_device)
    for lens in lens_seq:
        seq_lens.copy_(torch.tensor(lens))
        q = torch.randn(2, hq, d, generator=gen)
        decode_attention(q.to(kernel_device), k_cache, v_cache, seq_lens, slots, scale=d**-0.5, window=window,
                         out=out, scratch=scratch)
        assert (scratch.count == 0).all()
        for b, (s, n) in enumerate(zip([1, 0], lens)):
            want = reference(q[b : b + 1], k_full[s, :n], v_full[s, :n], torch.tensor([n - 1]), d**-0.5, window)
            assert rel_err(out[b : b + 1], want) < TOL, f"len {n} (seed {SEED})"


# (head_dim, kv heads, group, window, start, T, block_m, block_n)
PREFILL_CASES = [
    (64, 2, 1, 0, 0, 37, 16, 16),  # first chunk, T not a multiple of the tile
    (128, 1, 4, 0, 29, 40, 16, 16),  # second chunk
    (64, 1, 8, 20, 0, 53, 16, 16),  # window wider than a tile: masked, unmasked and diagonal key tiles
    (64, 2, 4, 5, 31, 33, 16, 16),  # window narrower than a tile
    (256, 1, 2, 0, 20, 19, 16, 16),
    (128, 2, 3, 24, 50, 46, 32, 16),
    (64, 1, 4, 0, 11, 70, None, None),  # H100 tiles
    (128, 1, 2, 30, 40, 50, None, None),
    (512, 1, 2, 0, 9, 20, None, None),  # Gemma 4's global heads, at their H100 tiles
]


@pytest.mark.parametrize("d,hkv,g,window,start,T,block_m,block_n", PREFILL_CASES)
def test_prefill(kernel_device, gen, d, hkv, g, window, start, T, block_m, block_n):
    max_batch, max_ctx, slot, hq, end = 3, 96, 2, hkv * g, start + T
    scale = 0.07 if d == 256 else d**-0.5
    k_full, v_full, k_cache, v_cache = make_cache(gen, max_batch, max_ctx, hkv, d, kernel_device)
    k_cache[slot, :end] = k_full[slot, :end].to(kernel_device)
    v_cache[slot, :end] = v_full[slot, :end].to(kernel_device)
    in_dtype = torch.float16 if start else torch.float32
    q = torch.randn(T, hq, d, generator=gen).to(in_dtype)
    out_dtype = torch.float16 if d == 256 else torch.float32
    out = torch.full((T, hq, d), float("nan"), dtype=out_dtype, device=kernel_device)
    got = prefill_attention(q.to(kernel_device), k_cache, v_cache, slot, start, scale=scale, window=window, out=out,
                            block_m=block_m, block_n=block_n)
    assert got is out and not out.isnan().any()
    want = reference(q, k_full[slot, :end], v_full[slot, :end], torch.arange(start, end), scale, window)
    err = rel_err(out, want)
    assert err < TOL, f"relative error {err:.2e} (seed {SEED})"


def test_prefill_default_out(kernel_device, gen):
    k_full, v_full, k_cache, v_cache = make_cache(gen, 1, 32, 1, 64, kernel_device)
    k_cache[0, :9], v_cache[0, :9] = k_full[0, :9].to(kernel_device), v_full[0, :9].to(kernel_device)
    q = torch.randn(9, 2, 64, generator=gen)
    out = prefill_attention(q.to(kernel_device), k_cache, v_cache, 0, 0, scale=0.125)
    assert out.dtype == torch.float32 and out.shape == (9, 2, 64)
    assert rel_err(out, reference(q, k_full[0, :9], v_full[0, :9], torch.arange(9), 0.125, 0)) < TOL


# (head_dim, kv heads, group, window, seq_lens, slots, q/k norm)
ROPE_CASES = [
    (64, 2, 1, 0, [1, 33, 70], [2, 0, 3], False),
    (128, 2, 4, 0, [70, 5], [1, 0], True),
    (256, 1, 8, 20, [32, 41], [3, 1], True),
    (64, 1, 4, 13, [12, 50, 77], [0, 2, 1], False),
]


@pytest.mark.parametrize("d,hkv,g,window,lens,slots,qk_norm", ROPE_CASES)
@pytest.mark.parametrize("config", ["small", "strided"])
def test_decode_with_rope_from_qkv(kernel_device, gen, d, hkv, g, window, lens, slots, qk_norm, config):
    """Decode straight from the qkv rows equals rope.qk_norm_rope_store then decode_attention on q, and
    leaves the same keys and values in the cache (the new ones at position seq_len - 1)."""
    from ingot.backends.cuda.attention import DecodeRope
    from ingot.backends.cuda.rope import qk_norm_rope_store

    max_batch, max_ctx, B, hq = 4, 96, len(lens), hkv * g
    k_full, v_full, k_a, v_a = make_cache(gen, max_batch, max_ctx, hkv, d, kernel_device)
    for s, n in zip(slots, lens):  # everything before the new token's position
        k_a[s, : n - 1], v_a[s, : n - 1] = k_full[s, : n - 1].to(kernel_device), v_full[s, : n - 1].to(kernel_device)
    k_b, v_b = k_a.clone(), v_a.clone()
    qkv = torch.randn(B, (hq + 2 * hkv) * d, generator=gen).to(kernel_device)
    inv_freq = (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)).to(kernel_device)
    qn = (1 + 0.3 * torch.randn(d, generator=gen)).to(kernel_device) if qk_norm else None
    kn = (1 + 0.3 * torch.randn(d, generator=gen)).to(kernel_device) if qk_norm else None
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=kernel_device)
    slot_t = torch.tensor(slots, dtype=torch.int32, device=kernel_device)
    chunk, block_n, programs = CONFIGS[config]

    q = qk_norm_rope_store(qkv, n_heads=hq, n_kv_heads=hkv, head_dim=d, q_norm=qn, k_norm=kn, eps=1e-6,
                           inv_freq=inv_freq, positions=seq_lens - 1, slots=slot_t, k_cache=k_b, v_cache=v_b)
    want = decode_attention(q, k_b, v_b, seq_lens, slot_t, scale=d**-0.5, window=window, block_n=block_n,
                            scratch=decode_scratch(max_batch, hq, d, max_ctx, kernel_device, chunk=chunk,
                                                   programs=programs))
    scratch = decode_scratch(max_batch, hq, d, max_ctx, kernel_device, chunk=chunk, programs=programs)
    got = decode_attention(qkv, k_a, v_a, seq_lens, slot_t, scale=d**-0.5, window=window, block_n=block_n,
                           scratch=scratch, rope=DecodeRope(inv_freq, qn, kn, 1e-6), n_heads=hq)
    assert (scratch.count == 0).all()
    err = rel_err(got, want.double().cpu())
    assert err < 1e-4, f"relative error {err:.2e} (seed {SEED})"
    for s, n in zip(slots, lens):  # the same math in another kernel: equal up to fp16 rounding
        torch.testing.assert_close(k_a[s, :n].cpu(), k_b[s, :n].cpu(), atol=2e-3, rtol=2e-3)
        assert torch.equal(v_a[s, :n].cpu(), v_b[s, :n].cpu())


@pytest.mark.parametrize("kv_in_row", [1, 0])
def test_decode_with_rope_from_gemma4_rows(kernel_device, gen, kv_in_row):
    """Gemma 4's rows: q and k only (values = the key projection, normed without a weight), or q alone (the
    layer reads the cache of the layer it shares, where the new token's key already is, and writes nothing).
    Equal to rope.qk_norm_rope_store then decode_attention on q."""
    from ingot.backends.cuda.attention import DecodeRope
    from ingot.backends.cuda.rope import qk_norm_rope_store

    d, hkv, g, max_batch, max_ctx, lens, slots = 64, 1, 4, 3, 64, [12, 40], [2, 0]
    hq, B = hkv * g, len(lens)
    k_full, v_full, k_a, v_a = make_cache(gen, max_batch, max_ctx, hkv, d, kernel_device)
    known = [n - (kv_in_row > 0) for n in lens]  # a sharing layer finds the new position filled
    for s, n in zip(slots, known):
        k_a[s, :n], v_a[s, :n] = k_full[s, :n].to(kernel_device), v_full[s, :n].to(kernel_device)
    k_b, v_b = k_a.clone(), v_a.clone()
    qkv = torch.randn(B, (hq + kv_in_row * hkv) * d, generator=gen).to(kernel_device)
    inv_freq = (1e6 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)).to(kernel_device)
    inv_freq[d // 8:] = 0.0  # proportional rope: a quarter of the pairs rotate
    qn, kn = (1 + 0.3 * torch.randn(2, d, generator=gen)).to(kernel_device)
    kn = kn if kv_in_row else None
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=kernel_device)
    slot_t = torch.tensor(slots, dtype=torch.int32, device=kernel_device)
    q = qk_norm_rope_store(qkv, n_heads=hq, n_kv_heads=hkv, head_dim=d, q_norm=qn, k_norm=kn, eps=1e-6,
                           inv_freq=inv_freq, positions=seq_lens - 1, slots=slot_t, k_cache=k_b, v_cache=v_b,
                           kv_in_row=kv_in_row, v_norm=True)
    want = decode_attention(q, k_b, v_b, seq_lens, slot_t, scale=1.0)
    rope = DecodeRope(inv_freq, qn, kn, 1e-6, kv_in_row=kv_in_row, v_norm=True)
    got = decode_attention(qkv, k_a, v_a, seq_lens, slot_t, scale=1.0, rope=rope, n_heads=hq)
    assert rel_err(got, want.double().cpu()) < 1e-4, f"seed {SEED}"
    for s, n in zip(slots, lens):
        torch.testing.assert_close(k_a[s, :n].cpu(), k_b[s, :n].cpu(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(v_a[s, :n].cpu(), v_b[s, :n].cpu(), atol=2e-3, rtol=2e-3)
        assert k_a[s, n:].isnan().all()
    with pytest.raises(ValueError, match=r"n_heads \+ 2 \* kv_heads"):
        decode_attention(qkv, k_a, v_a, seq_lens, slot_t, scale=1.0, rope=DecodeRope(inv_freq), n_heads=hq)


# (head_dim, kv heads, group, window, start, count, T rows launched, block_m): start and count come from
# device memory; rows count..T-1 are padding, whole tiles of it and part of the last real one.
DEVICE_SPAN_CASES = [
    (64, 2, 4, 0, 0, 37, 64, 16),
    (128, 1, 3, 0, 23, 29, 32, 16),
    (64, 1, 8, 13, 41, 19, 48, 32),  # sliding window, start past the window
    (64, 2, 1, 0, 5, 50, 50, 16),  # no padding
]


@pytest.mark.parametrize("d,hkv,g,window,start,count,T,block_m", DEVICE_SPAN_CASES)
def test_prefill_device_span(kernel_device, gen, d, hkv, g, window, start, count, T, block_m):
    max_ctx, hq, end = 96, hkv * g, start + count
    k_full, v_full, k_cache, v_cache = make_cache(gen, 1, max_ctx, hkv, d, kernel_device)
    k_cache[0, :end], v_cache[0, :end] = k_full[0, :end].to(kernel_device), v_full[0, :end].to(kernel_device)
    q = torch.randn(T, hq, d, generator=gen)
    out = torch.full((T, hq, d), float("nan"), device=kernel_device)
    span = torch.tensor([start, count], dtype=torch.int32, device=kernel_device)
    prefill_attention(q.to(kernel_device), k_cache, v_cache, 0, span, scale=d**-0.5, window=window, out=out,
                      block_m=block_m, block_n=16)
    # Real rows never read the padding's keys (NaN in the cache here); padding rows are not written at all.
    assert out[count:].isnan().all()
    want = reference(q[:count], k_full[0, :end], v_full[0, :end], torch.arange(start, end), d**-0.5, window)
    err = rel_err(out[:count], want)
    assert err < TOL, f"relative error {err:.2e} (seed {SEED})"


def test_prefill_bad_span(kernel_device):
    q = torch.zeros(4, 2, 64, device=kernel_device)
    k = torch.zeros(1, 16, 1, 64, dtype=torch.float16, device=kernel_device)
    with pytest.raises(ValueError, match="outside the cache"):
        prefill_attention(q, k, k, 0, 13, scale=0.125)
    with pytest.raises(ValueError, match="span must be an int32"):
        prefill_attention(q, k, k, 0, torch.tensor([0, 4], device=kernel_device), scale=0.125)
