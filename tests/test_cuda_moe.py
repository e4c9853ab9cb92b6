"""The mixture-of-experts kernels (router, decode selected-experts path, prefill grouped GEMMs) against a
plain torch MoE on the dequantized weights, under the interpreter on machines without a GPU.

Sizes are small and not powers of two (hidden 160, expert width 96, 8 experts); inputs are fresh random
each run (INGOT_TEST_SEED fixes them). The router is steered so that one expert takes most rows and one
gets none, the uneven loads a grouped GEMM must pad and skip."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from ingot.backends.cuda import gemv, moe
from ingot.quant.pack import PackedLinear, to_device
from tests.test_cuda_gemm import make_weight

SEED = int(os.environ.get("INGOT_TEST_SEED", torch.seed() % 2**31))
print(f"test_cuda_moe seed: INGOT_TEST_SEED={SEED}")

E, H, FF, EPS = 8, 160, 96, 1e-6
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
DECODE_BLOCK_N = (64, 32)  # fewer, larger programs than on the GPU (the interpreter pays per program)


def make_layer(kind, mins, top_k, gen, skew=True, norm_topk=True) -> tuple[moe.MoEWeights, torch.Tensor]:
    """Random expert weights and a router; with `skew`, rows (see make_x) favour expert 0 and never pick 3."""
    router = torch.randn(E, H, generator=gen) * 0.1
    if skew:
        router[0] += 0.3 * _direction()
        router[3] -= 0.3 * _direction()
    gate_up = make_weight(kind, E * 2 * FF, H, 32, mins, gen)
    down = make_weight(kind, E * H, FF, 32, mins, gen)
    w = moe.MoEWeights(router=router, gate_up=gate_up, down=down, top_k=top_k, norm_topk=norm_topk)
    return w, torch.rand(H, generator=gen) + 0.5


def _direction() -> torch.Tensor:
    return torch.ones(H)


def make_x(t, gen) -> torch.Tensor:
    return torch.randn(t, H, generator=gen) + 0.5


def on(w: moe.MoEWeights, device) -> moe.MoEWeights:
    opt = lambda t: None if t is None else t.to(device)  # noqa: E731
    return moe.MoEWeights(w.router.to(device), to_device(w.gate_up, device), to_device(w.down, device),
                          w.top_k, w.norm_topk, opt(w.router_norm), opt(w.expert_scale))


def reference_route(x, w: moe.MoEWeights, norm_weight):
    rms = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS)
    xn = x.double() * rms * norm_weight.double()
    router_in = xn if w.router_norm is None else x.double() * rms * w.router_norm.double()
    probs = (router_in @ w.router.double().T).softmax(-1)
    weights, ids = probs.topk(w.top_k, dim=-1)
    if w.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    if w.expert_scale is not None:
        weights = weights * w.expert_scale.double()[ids]
    return xn, ids, weights


def reference_block(x, w: moe.MoEWeights, norm_weight, residual=True):
    """[x +] MoE(x) in float64, one expert at a time."""
    xn, ids, weights = reference_route(x, w, norm_weight)
    gu = w.gate_up.dequantize().double().view(E, 2 * FF, H)
    down = w.down.dequantize().double().view(E, H, FF)
    out = x.double().clone() if residual else torch.zeros_like(x, dtype=torch.float64)
    for e in range(E):
        rows, choice = (ids == e).nonzero(as_tuple=True)
        h = F.silu(xn[rows] @ gu[e, :FF].T) * (xn[rows] @ gu[e, FF:].T)
        out.index_add_(0, rows, (h @ down[e].T) * weights[rows, choice, None])
    return out


def rel_err(got, want):
    return float((got.double().cpu() - want).norm() / want.norm())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(SEED)


@pytest.fixture
def decode_path(request, monkeypatch):
    """The decode experts' scheme (INGOT_MOE_DECODE) for this test: its `path` parameter."""
    monkeypatch.setattr(moe, "DECODE", request.param)
    return request.param


# 1 and 7 rows take the decode tiles of the router's logits kernel, 40 the prefill ones.
@pytest.mark.parametrize("top_k,norm_topk,rows", [(2, True, 7), (8, True, 40), (3, False, 1)])
def test_router_picks_and_weighs_like_softmax_topk(gen, kernel_device, top_k, norm_topk, rows):
    w, nw = make_layer("f16", False, top_k, gen, skew=False, norm_topk=norm_topk)
    x = make_x(rows, gen)
    ids, weights = moe.route(x.to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS)
    _, want_ids, want_w = reference_route(x, w, nw)
    assert torch.equal(ids.cpu().long(), want_ids), f"seed {SEED}"
    torch.testing.assert_close(weights.cpu().double(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tiles", [(16, 16, 128), (32, 16, 128), (16, 16, 256)])
def test_prefill_router_tiles_pick_alike(gen, kernel_device, monkeypatch, tiles):
    """moe_check's prefill router tiles (ROUTER_PREFILL_TILES): 70 rows over several row blocks, K over one
    or several steps, the last step partial."""
    monkeypatch.setattr(moe, "ROUTER_PREFILL_TILES", tiles)
    w, nw = make_layer("f16", False, 8, gen, skew=False)
    x = make_x(70, gen)
    ids, weights = moe.route(x.to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS)
    _, want_ids, want_w = reference_route(x, w, nw)
    assert torch.equal(ids.cpu().long(), want_ids), f"seed {SEED}"
    torch.testing.assert_close(weights.cpu().double(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_experts", [96, 8])
def test_one_row_router_ranks_many_experts_and_breaks_ties_by_id(gen, kernel_device, n_experts):
    """The one-row router's top-k by rank: 96 experts (not a power of two, over several 16-wide blocks
    of comparisons), and two identical router rows among the chosen, which rank by id, the lower first."""
    router = torch.randn(n_experts, H, generator=gen) * 0.1
    router[5] = router[n_experts - 2] = router[0] + 0.2  # a tie, ahead of the rest
    w = moe.MoEWeights(router=router, gate_up=make_weight("f16", n_experts * 2 * FF, H, 32, False, gen),
                       down=make_weight("f16", n_experts * H, FF, 32, False, gen), top_k=min(8, n_experts - 2),
                       norm_topk=True, expert_scale=torch.rand(n_experts, generator=gen) + 0.5)
    x, nw = make_x(1, gen), torch.rand(H, generator=gen) + 0.5
    ids, weights = moe.route(x.to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS)
    _, want_ids, want_w = reference_route(x, w, nw)
    ids = ids.cpu().long()
    assert set(ids[0, :2].tolist()) == {5, n_experts - 2} and ids[0, 0] == 5, f"seed {SEED}"
    assert torch.equal(ids[0, 2:], want_ids[0, 2:]), f"seed {SEED}"
    torch.testing.assert_close(weights.cpu().double().sort(-1).values, want_w.sort(-1).values, rtol=1e-5,
                               atol=1e-6)


# Each weight form, one or several rows (expert 0 picked by several), top-2 and top-8, on both decode schemes
# ("word" is q4/q8 only; f16 always takes "byte"). The interpreter is slow: few cases; the whole-model test in
# test_cuda_backend.py adds q4 affine decode and f16 prefill.
@pytest.mark.parametrize("decode_path,kind,mins,rows,top_k", [
    ("byte", "q4", True, 2, 8), ("byte", "q8", False, 5, 2), ("byte", "f16", False, 1, 2),
    ("word", "q4", True, 2, 8), ("word", "q4", False, 1, 8), ("word", "q8", False, 5, 2)], indirect=["decode_path"])
def test_decode_block_matches_reference(gen, kernel_device, decode_path, kind, mins, rows, top_k):
    w, nw = make_layer(kind, mins, top_k, gen)
    x = make_x(rows, gen)
    got = moe.decode_block(x.clone().to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS,
                           block_n=DECODE_BLOCK_N)
    assert rel_err(got, reference_block(x, w, nw)) < 1e-5, f"seed {SEED}"


@pytest.mark.parametrize("decode_path,kind,mins", [("byte", "q4", False), ("byte", "q4", True), ("byte", "q8", False)],
                         indirect=["decode_path"])
def test_byte_decode_over_several_k_steps(gen, kernel_device, decode_path, kind, mins, monkeypatch):
    """The byte kernels' K loops over several steps, the last one partial (hidden 160 in steps of 64, expert
    width 96 in steps of 64), as at real widths (Qwen3-30B-A3B: 8 gate/up steps, 6 down), where the default
    steps take these small sizes in one."""
    monkeypatch.setattr(moe, "GATE_UP_BLOCK_K", 64)
    monkeypatch.setattr(moe, "DOWN_BLOCK_K", 64)
    w, nw = make_layer(kind, mins, 8, gen)
    x = make_x(2, gen)
    got = moe.decode_block(x.clone().to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS,
                           block_n=DECODE_BLOCK_N)
    assert rel_err(got, reference_block(x, w, nw)) < 1e-5, f"seed {SEED}"


@pytest.mark.parametrize("decode_path,kind", [("word", "q4"), ("word", "q8")], indirect=["decode_path"])
def test_word_decode_whole_tiles(gen, kernel_device, decode_path, kind, monkeypatch):
    """Widths that fill whole tiles and K steps (hidden 512, expert width 256): the word kernel's unmasked
    loads and its last step's reload in place of a prefetch past K."""
    monkeypatch.setattr(sys.modules[__name__], "H", 512)
    monkeypatch.setattr(sys.modules[__name__], "FF", 256)
    w, nw = make_layer(kind, False, 2, gen)
    x = make_x(3, gen)
    got = moe.decode_block(x.clone().to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS,
                           block_n=DECODE_BLOCK_N)
    assert rel_err(got, reference_block(x, w, nw)) < 1e-5, f"seed {SEED}"


@pytest.mark.parametrize("decode_path", ["byte", "word"], indirect=True)
def test_decode_block_into_buffers_sized_for_more_rows(gen, kernel_device, decode_path):
    """The graph path: buffers of a bigger batch bucket, reused across calls."""
    w, nw = make_layer("q4", False, 2, gen)
    dw, dnw = on(w, kernel_device), nw.to(kernel_device)
    buffers = moe.DecodeBuffers.for_layers([dw], 4, kernel_device)
    for rows in (3, 1):
        x = make_x(rows, gen)
        got = moe.decode_block(x.clone().to(kernel_device), dw, dnw, EPS, buffers=buffers, block_n=DECODE_BLOCK_N)
        assert rel_err(got, reference_block(x, w, nw)) < 1e-5


@pytest.mark.parametrize("decode_path,kind", [("byte", "q4"), ("word", "q8")], indirect=["decode_path"])
def test_decode_block_hands_its_row_on_normed(gen, kernel_device, decode_path, kind):
    """norm_out: one row's block output also as out * weight, and its sum of squares in norm_parts pieces
    (one per down tile: the byte kernel's tiles of all k experts, the word kernel's split over choices)."""
    w, nw = make_layer(kind, False, 2, gen)
    x, nxt = make_x(1, gen), torch.rand(H, generator=gen) + 0.5
    dw, dev = on(w, kernel_device), kernel_device
    block_n = (64, 32)
    hand = gemv.NormOut(nxt.to(dev), torch.full((1, H), float("nan"), device=dev),
                        torch.full((64,), float("nan"), device=dev))
    got = moe.decode_block(x.clone().to(dev), dw, nw.to(dev), EPS, block_n=block_n, norm_out=hand)
    want = reference_block(x, w, nw)
    assert rel_err(got, want) < 1e-5
    parts = -(-H // block_n[1])
    assert moe.norm_parts(dw) == -(-H // moe._down_block_n(dw))
    assert rel_err(hand.xn, want * nxt.double()) < 1e-5
    assert abs(hand.ss[:parts].sum().item() / want.pow(2).sum().item() - 1) < 1e-5
    # and a block reading its own input so (router and gate/up on x * nw, rstd from the sums of squares)
    xs = x.to(dev)
    split = torch.stack([xs[0, :100].pow(2).sum(), xs[0, 100:].pow(2).sum()])
    got = moe.decode_block(xs.clone(), dw, nw.to(dev), EPS, block_n=block_n, normed=(xs * nw.to(dev), split))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("decode_path,kind,rows,normed", [("word", "q4", 1, True), ("word", "q8", 3, False)],
                         indirect=["decode_path"])
def test_word_gate_up_split_over_k(gen, kernel_device, decode_path, kind, rows, normed, monkeypatch):
    """WORD_GATE_UP_SPLIT: the word gate/up over K in parts (hidden 160 in 32-wide steps: 5 steps in splits of
    2, 2 and 1), the last of each tile's programs adding the partials (and, unnormed, the sums of squares for
    the rstd), twice through the same buffers (the tickets go back to zero)."""
    monkeypatch.setattr(moe, "WORD_GATE_UP_SPLIT", 3)
    monkeypatch.setattr(gemv, "_plan_word", lambda *a, **k: gemv.GemvConfig(1, 32, 32, 1))
    w, nw = make_layer(kind, False, 8, gen)
    dw, dnw = on(w, kernel_device), nw.to(kernel_device)
    buffers = moe.DecodeBuffers.for_layers([dw], rows, kernel_device)
    for _ in range(2):
        x = make_x(rows, gen)
        xd = x.clone().to(kernel_device)
        hand = (xd * dnw, xd.pow(2).sum(-1)) if normed else None
        got = moe.decode_block(xd, dw, dnw, EPS, buffers=buffers, block_n=(32, 32), normed=hand)
        assert rel_err(got, reference_block(x, w, nw)) < 1e-5, f"seed {SEED}"
    assert not buffers.gate_up_tickets.any()


def test_grouping_pads_each_expert_and_skips_empty_ones(kernel_device):
    ids = torch.tensor([[0, 5], [0, 2], [5, 0], [0, 7], [2, 0]], dtype=torch.int32, device=kernel_device)
    g = moe.group_by_expert(ids, E, block_m=4)
    slots = g.pair_of_slot.cpu().view(-1, 4)
    tile_expert = g.tile_expert.cpu().tolist()
    # expert 0: 5 pairs -> 2 tiles; 2: 2 pairs -> 1; 5: 2 -> 1; 7: 1 -> 1; then unused tiles (expert E)
    assert tile_expert == [0, 0, 2, 5, 7] + [E] * (len(tile_expert) - 5)
    flat = ids.cpu().reshape(-1)
    seen = []
    for tile, expert in enumerate(tile_expert):
        pairs = [p for p in slots[tile].tolist() if p >= 0]
        assert all(int(flat[p]) == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == list(range(flat.numel()))


def _stable_sort_groups(ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What group_by_expert must give, by torch's stable argsort: each expert's pairs in their order, padded."""
    flat = ids.reshape(-1).long().cpu()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    expert = flat[order]
    slot = pad_end[expert] - padded[expert] + torch.arange(flat.numel()) - (counts.cumsum(0) - counts)[expert]
    tiles = -(-flat.numel() // block_m) + min(n_experts, flat.numel())
    pair_of_slot = torch.full((tiles * block_m,), -1, dtype=torch.int32)
    pair_of_slot[slot] = order.to(torch.int32)
    return pair_of_slot, torch.searchsorted(pad_end, torch.arange(tiles) * block_m, right=True).to(torch.int32)


@pytest.mark.parametrize("rows,top_k,n_experts,block_m", [(1, 8, 128, 32), (37, 2, 8, 16), (300, 8, 128, 64),
                                                          (700, 8, 128, 32), (64, 4, 60, 16)])
def test_grouping_is_a_stable_sort_by_expert(gen, kernel_device, rows, top_k, n_experts, block_m):
    """Over several pair blocks (700 x 8 pairs: 64 programs of 128, each 4 steps of 32), a busy expert, idle ones."""
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(rows)]).to(torch.int32)
    ids[: rows // 3, 0] = 0
    g = moe.group_by_expert(ids.to(kernel_device), n_experts, block_m)
    pair_of_slot, tile_expert = _stable_sort_groups(ids, n_experts, block_m)
    assert torch.equal(g.pair_of_slot.cpu(), pair_of_slot), f"seed {SEED}"
    assert torch.equal(g.tile_expert.cpu(), tile_expert), f"seed {SEED}"


@pytest.mark.parametrize("kind,mins,rows,top_k,swap", [("q4", False, 37, 2, 0), ("q4", True, 5, 8, 0),
                                                       ("q8", False, 21, 2, 0), ("q4", False, 37, 2, 1),
                                                       ("q8", True, 21, 8, 1)])
def test_prefill_block_matches_reference(gen, kernel_device, kind, mins, rows, top_k, swap):
    w, nw = make_layer(kind, mins, top_k, gen)
    x = make_x(rows, gen)
    if top_k == 2:  # the load the test promises: expert 0 busy, expert 3 idle
        _, ids, _ = reference_route(x, w, nw)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        assert counts[3] == 0 and counts[0] > 2 * counts.float().mean(), counts
    got = moe.prefill_block(x.clone().to(kernel_device), on(w, kernel_device), nw.to(kernel_device), EPS,
                            tiles=dict(SMALL_TILES, SWAP=swap))
    assert rel_err(got, reference_block(x, w, nw)) < 3e-3, f"seed {SEED}"


# the selected-experts path on either scheme; the grouped GEMMs
@pytest.mark.parametrize("rows,decode_path", [(3, "byte"), (3, "word"), (35, "byte")], indirect=["decode_path"])
def test_gemma4_router_scales_and_separate_output(gen, kernel_device, rows, decode_path):
    """Gemma 4's experts: the router normalises its input with its own weight (not the experts' norm), the
    chosen weights are scaled per expert, and the output goes to its own buffer, x left as it was."""
    w, nw = make_layer("q8", False, 2, gen)
    w.router_norm, w.expert_scale = torch.rand(H, generator=gen) + 0.5, torch.rand(E, generator=gen) + 0.5
    x = make_x(rows, gen)
    xd = x.clone().to(kernel_device)
    out = torch.full_like(xd, float("nan"))
    if rows <= moe.MAX_DECODE_ROWS:  # fp32 math
        got = moe.decode_block(xd, on(w, kernel_device), nw.to(kernel_device), EPS, block_n=DECODE_BLOCK_N, out=out)
        tol = 1e-5
    else:  # fp16 tensor-core operands
        got = moe.prefill_block(xd, on(w, kernel_device), nw.to(kernel_device), EPS, tiles=SMALL_TILES, out=out)
        tol = 3e-3
    assert got is out and torch.equal(xd.cpu(), x)
    assert rel_err(out, reference_block(x, w, nw, residual=False)) < tol, f"seed {SEED}"


def test_bad_input_is_refused(gen, kernel_device):
    w, nw = make_layer("q8", False, 2, gen)
    with pytest.raises(ValueError, match="1..32 rows"):
        moe.decode_block(make_x(33, gen), w, nw, EPS)
    with pytest.raises(ValueError, match="does not match hidden"):
        moe.route(torch.zeros(2, H + 32), w, nw, EPS)
    with pytest.raises(ValueError, match="do not fit"):
        moe.MoEWeights(w.router[:7], w.gate_up, w.down, 2, True)
    bad_k = PackedLinear("f16", E * H, FF + 32, 0, torch.zeros(E * H, FF + 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="down's k"):
        moe.MoEWeights(w.router, w.gate_up, bad_k, 2, True)


def test_tiny_qwen3moe_on_the_cuda_backend_matches_reference(tmp_path, kernel_device):
    """Whole model: a grouped-GEMM prefill (> 32 rows) and decode steps on the selected-experts path,
    against the reference backend (top-2 of 8; top-8 is covered kernel by kernel above)."""
    import ingot
    from tests.tiny_models import make_hf_model, save_hf

    save_hf(make_hf_model("qwen3moe"), tmp_path)
    fast = ingot.load(tmp_path, device=kernel_device, backend="cuda", max_context=64)
    ref = ingot.load(tmp_path, device=kernel_device, backend="reference", dtype=torch.float32, max_context=64)
    # Fixed ids: with random ones, a near-tie between two router logits now and then picks a different
    # expert than the fp32 reference does, a discrete flip rather than a rounding error.
    ids = torch.randint(0, fast.spec.vocab_size, (36,), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = fast.runner.prefill(ids[:34]).clone(), ref.runner.prefill(ids[:34])
    assert rel_err(a, b.double().cpu()) < 5e-3
    for t in ids[34:]:
        a, b = fast.runner.decode(t).clone(), ref.runner.decode(t)
        assert rel_err(a, b.double().cpu()) < 5e-3


def test_tiny_qwen3moe_word_decode_matches_byte(tmp_path, kernel_device, monkeypatch):
    """Whole model quantized to q4 (with mins) at load, the word scheme's steps against the byte scheme's: a
    6-token prefill (under 32 rows, the decode path) and two decode steps (the tiny model's f16 experts above
    never take the word kernels)."""
    import ingot
    from tests.tiny_models import make_hf_model, save_hf

    save_hf(make_hf_model("qwen3moe"), tmp_path)
    logits = {}
    for path, handoff in (("byte", True), ("word", True), ("byte", False)):  # a model each (a graph each on a GPU)
        monkeypatch.setattr(moe, "DECODE", path)
        m = ingot.load(tmp_path, device=kernel_device, backend="cuda", max_context=64, quant="q4")
        assert m.backend.w.layers[0].moe.down.kind == "q4" and m.backend._handoff
        m.backend._handoff = handoff  # the experts hand their row on to the next qkv and lm_head, or not
        ids = torch.randint(0, m.spec.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
        steps = [m.runner.prefill(ids[:6]).clone()] + [m.runner.decode(t).clone() for t in ids[6:]]
        logits[path, handoff] = torch.stack([s.double().cpu() for s in steps])
    assert rel_err(logits["word", True], logits["byte", True]) < 1e-4  # fp32 both: 2.8e-6 apart when written
    assert rel_err(logits["byte", True], logits["byte", False]) < 1e-5


def test_gguf_experts_pack_per_expert_exactly(tmp_path):
    """Stacked GGUF Q4_0 experts [E, F, H] -> one gate/up matrix with each expert's gate rows then its up
    rows, bit for bit the file's own dequantization; the router stays fp32 (F32 values fp16 cannot hold)."""
    from ingot.backends.cuda.weights import load_weights
    from ingot.bench.synthetic import write_synthetic_gguf
    from ingot.formats import open_checkpoint
    from ingot.models import build_spec

    small = dict(hidden_size=64, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024)
    path = write_synthetic_gguf("qwen3-30b-a3b", "q4_0", tmp_path / "m.gguf", layers=1, progress=False,
                                overrides=small)
    ckpt = open_checkpoint(path)
    w = load_weights(ckpt, build_spec(ckpt.arch, ckpt.config), "cpu").layers[0].moe
    t = {n: ckpt.tensors[f"blk.0.{n}.weight"].dequantize() for n in ("ffn_gate_exps", "ffn_up_exps",
                                                                      "ffn_down_exps", "ffn_gate_inp")}
    want = torch.cat([t["ffn_gate_exps"], t["ffn_up_exps"]], dim=1).reshape(-1, 64)
    assert torch.equal(w.gate_up.dequantize(), want) and w.gate_up.source == "Q4_0 exact"
    assert torch.equal(w.down.dequantize(), t["ffn_down_exps"].reshape(-1, 96))
    assert w.router.dtype == torch.float32 and torch.equal(w.router, t["ffn_gate_inp"])
    assert (w.n_experts, w.ffn, w.hidden, w.top_k) == (4, 96, 64, 2)


def test_moe_kernels_compile_for_sm90a_without_spills():
    """benchmarks/kernel_regs.py --moe (a process without the interpreter: Triton and its ptxas for sm_90a):
    the grouping kernel, the byte decode kernels at their default and one-step tiles, and the q4 grouped
    GEMM's tiles compile, and none spills (the interpreter runs code the GPU compiler may still reject)."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_regs.py"), "--moe", str(root)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    # kernel, case, registers, spill bytes, shared memory, then the main loop's mix
    rows = [re.match(r"(\S+)\s+(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s\s(\d+:|no loop)", line)
            for line in out.stdout.splitlines()[1:]]
    assert all(rows) and len(rows) == 13, out.stdout
    assert [r[1] for r in rows].count("grouping") == 2, out.stdout
    for r in rows:
        assert int(r[4]) == 0 and int(r[3]) <= 255, r[0]
