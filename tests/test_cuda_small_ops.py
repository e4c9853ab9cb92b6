"""The small fused CUDA kernels (RMSNorm, q/k norm + RoPE + cache store, argmax, sampling) against plain torch.

Inputs are fresh random numbers each run; INGOT_TEST_SEED=<n> replays a run (the seed is printed)."""

import os
import random

import pytest
import torch

from ingot.backends.cuda import norm, rope, sampling
from ingot.backends.reference import apply_rope, rms_norm
from ingot.models.base import RopeSpec

SEED = int(os.environ.get("INGOT_TEST_SEED", random.randrange(2**31)))


@pytest.fixture
def g():
    print(f"INGOT_TEST_SEED={SEED}")
    return torch.Generator().manual_seed(SEED)


def randn(g, *shape, device, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def assert_close(actual, expected, rel):
    a, e = actual.double().cpu(), expected.double().cpu()
    assert not a.isnan().any(), "an output element was not written"
    err = (a - e).norm() / e.norm()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


# --- RMSNorm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, 64])  # one pass in registers; the looped two-pass path
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float32, torch.float16)])
def test_rms_norm(g, kernel_device, block, x_dtype, out_dtype):
    M, K = 3, 200
    base = randn(g, M, K + 24, device=kernel_device, dtype=x_dtype) * 3
    x = base[:, 5:5 + K]  # rows with a stride, not a contiguous block
    w = randn(g, K, device=kernel_device)
    out = torch.full((M, K), float("nan"), device=kernel_device, dtype=out_dtype)
    got = norm.rms_norm(x, w, 1e-6, out=out, block=block)
    assert got is out
    assert_close(out, rms_norm(x.float(), w, 1e-6), 1e-5 if out_dtype == torch.float32 else 2e-3)
    if out_dtype == x_dtype:  # without out= the result takes x's dtype
        assert norm.rms_norm(x, w, 1e-6, block=block).dtype == x_dtype


@pytest.mark.parametrize("block", [None, 64])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.float16])
def test_add_rms_norm(g, kernel_device, block, h_dtype):
    M, K = 5, 200
    h = randn(g, M, K, device=kernel_device, dtype=h_dtype)
    w = randn(g, K, device=kernel_device)
    residual = randn(g, M, K, device=kernel_device)
    expected = residual + rms_norm(h.float(), w, 1e-5)
    assert norm.add_rms_norm(residual, h, w, 1e-5, block=block) is residual
    assert_close(residual, expected, 1e-5)


def test_add_rms_norm_then_scale(g, kernel_device):
    """Gemma 4's layer output scale, a device scalar, applied after the residual add."""
    h, residual = randn(g, 3, 96, device=kernel_device), randn(g, 3, 96, device=kernel_device)
    w, scale = randn(g, 96, device=kernel_device), randn(g, 1, device=kernel_device)
    expected = (residual + rms_norm(h, w, 1e-6)) * scale
    norm.add_rms_norm(residual, h, w, 1e-6, scale=scale)
    assert_close(residual, expected, 1e-5)
    with pytest.raises(ValueError, match="one value"):
        norm.add_rms_norm(residual, h, w, 1e-6, scale=w)


def test_add_rms_norm_hands_its_rows_on_normed(g, kernel_device):
    """norm_out: the new residual rows times the next norm's weight, and each row's sum of squares (what
    gemv.linear's norm_parts reads); after the layer scale where there is one."""
    from ingot.backends.cuda.gemv import NormOut

    M, K, dev = 2, 200, kernel_device
    h, residual = randn(g, M, K, device=dev), randn(g, M, K, device=dev)
    w, nxt, scale = randn(g, K, device=dev), randn(g, K, device=dev), randn(g, 1, device=dev)
    expected = (residual + rms_norm(h, w, 1e-6)) * scale
    hand = NormOut(nxt, torch.full((M, K), float("nan"), device=dev), torch.full((4,), float("nan"), device=dev))
    norm.add_rms_norm(residual, h, w, 1e-6, scale=scale, norm_out=hand)
    assert_close(residual, expected, 1e-5)
    assert_close(hand.xn, expected * nxt, 1e-5)
    assert_close(hand.ss[:M], expected.pow(2).sum(1), 1e-5)
    with pytest.raises(ValueError, match="one-pass"):
        norm.add_rms_norm(residual, h, w, 1e-6, block=64, norm_out=hand)


def test_rms_norm_heads(g, kernel_device):
    x = randn(g, 3, 4, 128, device=kernel_device)
    w = randn(g, 128, device=kernel_device)
    out = torch.full_like(x, float("nan"))
    norm.rms_norm_heads(x, w, 1e-6, out=out)
    assert_close(out, rms_norm(x, w, 1e-6), 1e-5)


# --- q/k norm + RoPE + KV-cache store -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("qk_norm", [False, True])
# Head counts that are not powers of two leave padded rows in the per-token [heads, D/2] tiles.
@pytest.mark.parametrize("D,Hq,Hkv", [(64, 4, 2), (128, 4, 1), (256, 2, 1), (64, 6, 3), (128, 16, 8)])
def test_qk_norm_rope_store(g, kernel_device, mode, qk_norm, D, Hq, Hkv):
    dev = kernel_device
    max_batch, max_ctx = 3, 600
    if mode == "prefill":  # one sequence in slot 1, consecutive positions not starting at 0
        T = 5
        positions = torch.arange(T, dtype=torch.int32) + 37
        slots = torch.full((T,), 1, dtype=torch.int32)
    else:  # one row per sequence, each at its own position
        T = 3
        positions = torch.tensor([590, 3, 211], dtype=torch.int32)
        slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    qkv = randn(g, T, (Hq + 2 * Hkv) * D, device=dev) * 2
    inv_freq = RopeSpec(theta=10000.0, dim=D).inv_freq().to(dev)
    q_norm = (randn(g, D, device=dev) + 1) if qk_norm else None
    k_norm = (randn(g, D, device=dev) + 1) if qk_norm else None
    k_cache = torch.full((max_batch, max_ctx, Hkv, D), float("nan"), device=dev, dtype=torch.float16)
    v_cache = torch.full_like(k_cache, float("nan"))
    q_dtype = torch.float16 if (D == 128 and qk_norm) else torch.float32
    q_out = torch.full((T, Hq, D), float("nan"), device=dev, dtype=q_dtype)

    got = rope.qk_norm_rope_store(qkv, n_heads=Hq, n_kv_heads=Hkv, head_dim=D, q_norm=q_norm, k_norm=k_norm,
                                  eps=1e-6, inv_freq=inv_freq, positions=positions.to(dev), slots=slots.to(dev),
                                  k_cache=k_cache, v_cache=v_cache, q_out=q_out, num_warps=2 if Hq == 6 else None)
    assert got is q_out

    freqs = positions.float().to(dev)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    if qk_norm:
        q, k = rms_norm(q, q_norm, 1e-6), rms_norm(k, k_norm, 1e-6)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    assert_close(q_out, q, 1e-5 if q_dtype == torch.float32 else 2e-3)
    s, p = slots.long().to(dev), positions.long().to(dev)
    assert_close(k_cache[s, p], k, 2e-3)
    assert torch.equal(v_cache[s, p], v.half())
    written = torch.zeros(max_batch, max_ctx, dtype=torch.bool, device=dev)
    written[s, p] = True
    assert not k_cache[written].isnan().any() and k_cache[~written].isnan().all()
    assert v_cache[~written].isnan().all()


@pytest.mark.parametrize("kv_in_row", [0, 1])
def test_rope_store_gemma4_rows(g, kernel_device, kv_in_row):
    """Gemma 4's qkv rows: k only (values are the key projection before its norm and rotation, then normed
    without a weight), or q alone (a layer reading another's cache: nothing is written)."""
    dev, T, Hq, Hkv, D = kernel_device, 4, 4, 2, 32
    positions, slots = torch.arange(T, dtype=torch.int32) + 5, torch.zeros(T, dtype=torch.int32)
    qkv = randn(g, T, (Hq + kv_in_row * Hkv) * D, device=dev) * 2
    inv_freq = RopeSpec(1e6, D, {"rope_type": "proportional", "partial_rotary_factor": 0.25}).inv_freq().to(dev)
    q_norm, k_norm = randn(g, D, device=dev) + 1, randn(g, D, device=dev) + 1
    k_cache = torch.full((1, 16, Hkv, D), float("nan"), device=dev, dtype=torch.float16)
    v_cache = torch.full_like(k_cache, float("nan"))
    caches = (k_cache, v_cache) if kv_in_row else (None, None)
    q_out = rope.qk_norm_rope_store(qkv, n_heads=Hq, n_kv_heads=Hkv, head_dim=D, q_norm=q_norm, k_norm=k_norm,
                                    inv_freq=inv_freq, positions=positions.to(dev), slots=slots.to(dev),
                                    k_cache=caches[0], v_cache=caches[1], kv_in_row=kv_in_row, v_norm=True)
    emb = torch.cat([positions.float().to(dev)[:, None] * inv_freq[None]] * 2, dim=-1)
    q = apply_rope(rms_norm(qkv[:, :Hq * D].view(T, Hq, D), q_norm, 1e-6), emb.cos(), emb.sin())
    assert_close(q_out, q, 1e-5)
    if kv_in_row:
        k = qkv[:, Hq * D:].view(T, Hkv, D)
        assert_close(k_cache[0, 5:9], apply_rope(rms_norm(k, k_norm, 1e-6), emb.cos(), emb.sin()), 2e-3)
        assert_close(v_cache[0, 5:9], rms_norm(k, None, 1e-6), 2e-3)
        assert k_cache[0, 9:].isnan().all() and k_cache[0, :5].isnan().all()
    with pytest.raises(ValueError, match=rf"qkv must be \[T, {(Hq + 2 * Hkv) * D}\]"):
        rope.qk_norm_rope_store(qkv, n_heads=Hq, n_kv_heads=Hkv, head_dim=D, inv_freq=inv_freq,
                                positions=positions.to(dev), slots=slots.to(dev), k_cache=k_cache, v_cache=v_cache)


def test_rope_long_positions(g, kernel_device):
    """Angles of ~10^5 radians need cos/sin with a full-range argument reduction."""
    dev, D, T = kernel_device, 64, 2
    positions = torch.tensor([131000, 131071], dtype=torch.int32)
    qkv = randn(g, T, 3 * D, device=dev)
    inv_freq = RopeSpec(theta=500000.0, dim=D).inv_freq().to(dev)
    cache = torch.zeros((1, 131072, 1, D), device=dev, dtype=torch.float16)
    q_out = rope.qk_norm_rope_store(qkv, n_heads=1, n_kv_heads=1, head_dim=D, inv_freq=inv_freq,
                                    positions=positions.to(dev), slots=torch.zeros(T, dtype=torch.int32, device=dev),
                                    k_cache=cache, v_cache=torch.zeros_like(cache))
    freqs = positions.to(dev).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    assert_close(q_out, apply_rope(qkv[:, :D].view(T, 1, D), emb.cos(), emb.sin()), 1e-5)


# --- argmax -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [256, sampling.ARGMAX_BLOCK])
def test_argmax(g, kernel_device, block):
    M, V = 6, 3001
    x = randn(g, M, V, device="cpu")
    x[0, [700, 5, 2999]] = 50.0  # ties across blocks: the lowest index wins
    x[1, 300:] = float("-inf")
    x[2] = float("-inf")  # torch says 0
    x[3, 2000] = float("inf")
    x[4, [17, 1500]] = float("nan")  # the first NaN, like torch
    x[5, [256, 255]] = x[5].max() + 1  # a tie on either side of a block boundary
    x = x.to(kernel_device)
    out = torch.full((M,), -1, dtype=torch.int64, device=kernel_device)
    ws = sampling.argmax_workspace(M, V, kernel_device, block)
    assert sampling.argmax(x, out=out, workspace=ws, block=block) is out
    assert out.tolist() == x.cpu().argmax(-1).tolist()


# --- sampling -----------------------------------------------------------------------------------------

def _params(M, dev, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0):
    def col(v, dt):
        return torch.as_tensor(v, dtype=dt).expand(M).contiguous().to(dev)

    return dict(temperature=col(temperature, torch.float32), top_k=col(top_k, torch.int32),
                top_p=col(top_p, torch.float32), min_p=col(min_p, torch.float32),
                seed_offset=col(seed, torch.int64))


def _chain_probs(logits, top_k, top_p, min_p, temperature):
    """llama.cpp's chain on one row, in float64 plain torch, following ingot.engine.sampler.Sampler."""
    x = logits.double().clone()
    if top_k:
        x[x < x.topk(min(top_k, x.numel())).values[-1]] = float("-inf")
    if top_p < 1.0:
        s, order = x.sort(descending=True)
        p = s.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        drop[0] = False  # llama.cpp keeps at least one token
        x[order[drop]] = float("-inf")
    if min_p:
        p = x.softmax(-1)
        x[p < min_p * p.max()] = float("-inf")
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(), x.numel()).double()
    return (x / temperature).softmax(-1)


def _between(a, b):
    """A threshold halfway between two neighbouring cumulative masses or probability ratios, so that float32
    and float64 agree on which side of it every token falls."""
    return float((a + b) / 2)


def test_sample_greedy_and_top_k_1_are_argmax(g, kernel_device):
    M, V = 8, 300
    x = randn(g, M, V, device="cpu")
    x[1, [40, 7]] = x[1].max() + 1  # tie: both argmax and the stable sort pick 7
    x[2] = float("-inf")
    x = x.to(kernel_device)
    expected = x.cpu().argmax(-1)
    for block in (64, sampling.SAMPLE_BLOCK):
        ws = sampling.sample_workspace(M, V, kernel_device)
        out = torch.full((M,), -1, dtype=torch.int64, device=kernel_device)
        sampling.sample(x, **_params(M, kernel_device, temperature=0.0, top_p=0.5, seed=3), out=out, workspace=ws,
                        block=block)
        assert out.cpu().tolist() == expected.tolist()
        out = sampling.sample(x, **_params(M, kernel_device, temperature=2.0, top_k=1, seed=3), block=block)
        assert out.cpu().tolist() == expected.tolist()
        out = sampling.sample(x, **_params(M, kernel_device, temperature=1.0, top_p=0.0, seed=3), block=block)
        assert out.cpu().tolist() == expected.tolist()  # top-p 0 still keeps one token, like llama.cpp


def test_sample_reproducible(g, kernel_device):
    M, V = 8, 50
    x = (randn(g, 1, V, device="cpu") * 0.3).expand(M, V).contiguous().to(kernel_device)  # nearly flat
    p = _params(M, kernel_device, temperature=1.0, top_p=0.95)
    p["seed_offset"] = torch.arange(M, dtype=torch.int64, device=kernel_device) * 2**32 + 12345
    a = sampling.sample(x, **p, block=16)
    b = sampling.sample(x, **p, block=16)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 1  # different counters, different draws
    p["seed_offset"] += 1  # the next step
    assert not torch.equal(sampling.sample(x, **p, block=16), a)


def _configs(logits):
    """Chains where each filter in turn is the one that binds, thresholds placed between tokens."""
    s = logits.double().sort(descending=True).values
    p = s.softmax(-1)
    cum = p.cumsum(-1)
    ratio = p / p[0]
    top7 = s[:7].softmax(-1).cumsum(-1)  # top-p works on the distribution top-k left, renormalised
    top8 = s[:8].softmax(-1).cumsum(-1)
    return [
        dict(top_k=4, temperature=1.0),
        dict(top_p=_between(cum[4], cum[5]), temperature=0.7),  # keeps 6 (the mass before rank 5 < p)
        dict(min_p=_between(ratio[4], ratio[5]), temperature=1.5),  # keeps 5
        dict(top_k=7, top_p=_between(top7[2], top7[3]), min_p=_between(ratio[5], ratio[6]), temperature=0.8),
        dict(top_k=8, top_p=_between(top8[5], top8[6]), min_p=_between(ratio[2], ratio[3]), temperature=1.2),
        dict(temperature=1.3),  # nothing filters; the -inf token must still never come up
    ]


def test_sample_inverse_cdf_is_exact(g, kernel_device):
    """With a stratified grid of uniforms in place of Philox, the counts are the distribution's quantiles:
    within 1.5 of N p for every token, 0 for every filtered token, and the boundary draws hit the first
    and the last token kept."""
    V, N = 10, 32
    logits = randn(g, V, device="cpu") * 1.5
    logits[3] = float("-inf")
    configs = _configs(logits)
    grid = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    us = torch.cat([grid, torch.tensor([0.0, 1 - 2**-24], dtype=torch.float64)]).float()
    R = len(us)
    M = R * len(configs)
    cols = {k: [] for k in ("temperature", "top_k", "top_p", "min_p")}
    for c in configs:
        for k, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
            cols[k] += [c.get(k, default)] * R
    params = dict(temperature=torch.tensor(cols["temperature"]), top_k=torch.tensor(cols["top_k"], dtype=torch.int32),
                  top_p=torch.tensor(cols["top_p"]), min_p=torch.tensor(cols["min_p"]),
                  seed_offset=torch.zeros(M, dtype=torch.int64))
    params = {k: v.to(kernel_device) for k, v in params.items()}
    out = sampling.sample(logits.expand(M, V).contiguous().to(kernel_device), **params,
                          uniforms=us.repeat(len(configs)).to(kernel_device), block=4).cpu()
    order = logits.sort(descending=True, stable=True).indices
    for i, c in enumerate(configs):
        probs = _chain_probs(logits, c.get("top_k", 0), c.get("top_p", 1.0), c.get("min_p", 0.0), c["temperature"])
        draws = out[i * R:(i + 1) * R]
        counts = torch.bincount(draws[:N], minlength=V).double()
        assert ((counts - N * probs).abs() <= 1.5).all(), (c, counts.tolist(), (N * probs).tolist())
        assert (counts[probs == 0] == 0).all(), c
        kept = [t for t in order.tolist() if probs[t] > 0]
        assert draws[N].item() == kept[0] and draws[N + 1].item() == kept[-1], (c, draws[N:].tolist(), kept)


def test_sample_philox_distribution(g, kernel_device):
    """Real Philox draws: filtered tokens never appear and the frequencies sit within 5 sigma of the chain's
    probabilities (a bound a correct sampler breaks about once in a million runs)."""
    V, N = 8, 128
    logits = randn(g, V, device="cpu")
    logits[5] = float("-inf")
    s = logits.double().sort(descending=True).values
    top6 = s[:6].softmax(-1).cumsum(-1)
    c = dict(top_k=6, top_p=_between(top6[2], top6[3]), temperature=0.9)  # keeps 4
    params = _params(N, kernel_device, **c)
    params["seed_offset"] = (torch.arange(N, dtype=torch.int64) + SEED * N).to(kernel_device)
    out = sampling.sample(logits.expand(N, V).contiguous().to(kernel_device), **params).cpu()
    probs = _chain_probs(logits, c["top_k"], c["top_p"], 0.0, c["temperature"])
    freq = torch.bincount(out, minlength=V).double() / N
    assert (freq[probs == 0] == 0).all()
    bound = 5 * (probs * (1 - probs) / N).sqrt() + 1 / N
    assert ((freq - probs).abs() <= bound).all(), (freq.tolist(), probs.tolist())


# --- Gemma 4's per-layer inputs, their gate, the final softcap ------------------------------------------

def test_per_layer_inputs_and_gate(g, kernel_device):
    from ingot.backends.cuda import gemma4_ops

    T, L, P, H = 3, 4, 24, 64
    proj, own = randn(g, T, L * P, device=kernel_device) * 5, randn(g, T, L * P, device=kernel_device)
    w = randn(g, P, device=kernel_device)
    want = (rms_norm((proj * H**-0.5).view(T, L, P), w, 1e-6).view(T, L * P) + own) * 2**-0.5
    assert gemma4_ops.per_layer_inputs(proj, own, w, 1e-6, H**-0.5) is own
    assert_close(own, want, 1e-5)
    gate = randn(g, T, P, device=kernel_device) * 3
    want = torch.nn.functional.gelu(gate, approximate="tanh") * own[:, P:2 * P]
    assert_close(gemma4_ops.gelu_gate(gate, own[:, P:2 * P]), want, 1e-5)
    with pytest.raises(ValueError, match="P dividing"):
        gemma4_ops.per_layer_inputs(proj, own, randn(g, 25, device=kernel_device), 1e-6, 1.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy, on the 1e30 inputs
def test_softcap(g, kernel_device):
    from ingot.backends.cuda import gemma4_ops

    x = randn(g, 2, 3000, device=kernel_device) * 40
    x[0, :2] = torch.tensor([1e30, -1e30])  # saturates to exactly +-cap, no NaN
    want = torch.tanh(x / 30.0) * 30.0
    assert_close(gemma4_ops.softcap_(x, 30.0), want, 1e-6)
    assert x[0, 0] == 30.0 and x[0, 1] == -30.0
