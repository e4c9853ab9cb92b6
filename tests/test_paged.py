"""The paged KV cache on the reference backend: paged attention and a mixed step of several sequences equal
the contiguous path; the block manager's reference counts, prefix hash chain and LRU eviction."""

import random

import pytest
import torch

import ingot
from ingot.backends.reference import attend, paged_decode_attention
from ingot.engine.block_manager import BlockManager, OutOfBlocks
from tests.tiny_models import make_hf_model, save_hf


def scatter_paged(k, v, lens, n_blocks, bs, gen):
    """Contiguous per-sequence K/V [B, S, Hkv, D] copied into randomly chosen blocks of a paged cache whose
    other rows hold NaN (a read through a wrong table entry shows up); returns caches and block tables."""
    B, _, hkv, d = k.shape
    kc = torch.full((n_blocks, bs, hkv, d), float("nan"), dtype=k.dtype)
    vc = kc.clone()
    order = torch.randperm(n_blocks, generator=gen).tolist()
    width = max(-(-n // bs) for n in lens)
    tables = torch.zeros(B, width, dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(-(-n // bs)):
            blk = order.pop()
            tables[b, j] = blk
            rows = min(bs, n - j * bs)
            kc[blk, :rows] = k[b, j * bs:j * bs + rows]
            vc[blk, :rows] = v[b, j * bs:j * bs + rows]
    return kc, vc, tables


@pytest.mark.parametrize("hkv,g,window,bs", [(2, 1, 0, 16), (1, 4, 0, 8), (2, 3, 10, 16), (4, 2, 0, 4)])
def test_paged_decode_attention_equals_contiguous(hkv, g, window, bs):
    gen = torch.Generator().manual_seed(hkv * 100 + g * 10 + bs)
    d, lens = 32, [1, bs, bs + 1, 3 * bs + 5, 7]  # on, just past and well past block boundaries
    S = max(lens)
    k = torch.randn(len(lens), S, hkv, d, generator=gen)
    v = torch.randn(len(lens), S, hkv, d, generator=gen)
    q = torch.randn(len(lens), hkv * g, d, generator=gen)
    kc, vc, tables = scatter_paged(k, v, lens, 40, bs, gen)
    got = paged_decode_attention(q, kc, vc, tables, torch.tensor(lens), 0.2, window)
    for b, n in enumerate(lens):
        want = attend(q[b:b + 1], k[b, :n], v[b, :n], torch.tensor([n - 1]), 0.2, window)
        torch.testing.assert_close(got[b:b + 1], want, rtol=0, atol=0)


@pytest.fixture(scope="module", params=["llama", "gemma3", "gemma4"])  # gemma3: a sliding window of 4, qk-norm;
# gemma4: KV-shared layers, per-layer head dims, values from the keys
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf(make_hf_model(request.param), path)
    return ingot.load(path, device="cpu", max_context=64)


def test_mixed_step_equals_contiguous_forward(tiny):
    """Sequences prefilled in chunks of different sizes, decoded together with another one's prefill,
    through scattered block tables: every step's logits equal the contiguous cache's."""
    backend, bs = tiny.backend, 4
    rng = random.Random(0)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (9, 3, 17)]
    want = [tiny.runner.forward_all(p) for p in prompts]
    cache = backend.new_paged_cache(32, bs)
    free = list(range(32))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-len(p) // bs))] for p in prompts]
    # step 1: 5 tokens of prompt 0 and all of prompt 1; step 2: all of prompt 2 and the rest of prompt 0
    out1 = backend.forward_paged([(prompts[0][:5], 0, tables[0]), (prompts[1], 0, tables[1])], cache)
    out2 = backend.forward_paged([(prompts[2], 0, tables[2]), (prompts[0][5:], 5, tables[0])], cache)
    for got, w in zip(list(out1) + list(out2), [want[0][4], want[1][-1], want[2][-1], want[0][-1]]):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)
    # then one decode step of all three (lengths 9 -> 10, 3 -> 4, 17 -> 18: prompt 2's table needs a block)
    nxt = [int(w[-1].argmax()) for w in want]
    for p, t, table in zip(prompts, nxt, tables):
        if len(p) + 1 > len(table) * bs:
            table.append(free.pop())
    out3 = backend.forward_paged([([t], len(p), table) for p, t, table in zip(prompts, nxt, tables)], cache)
    for got, p, t in zip(out3, prompts, nxt):
        torch.testing.assert_close(got, tiny.runner.forward_all(p + [t])[-1], rtol=1e-4, atol=1e-4)


def test_mixed_step_refuses_a_short_table(tiny):
    cache = tiny.backend.new_paged_cache(4, 4)
    with pytest.raises(ValueError, match="blocks"):
        tiny.backend.forward_paged([([1, 2, 3, 4, 5], 0, [0])], cache)


# -- the block manager -----------------------------------------------------------------------------------------
def test_allocate_release_and_out_of_blocks():
    m = BlockManager(4, block_size=2)
    a = m.allocate(3)
    assert len(set(a)) == 3 and m.used == 3 and m.free == 1
    with pytest.raises(OutOfBlocks):
        m.allocate(2)
    m.release(a)
    assert m.used == 0 and m.free == 4 and all(m.refs(b) == 0 for b in a)
    with pytest.raises(RuntimeError):
        m.release(a[:1])


def test_prefix_blocks_are_shared_and_counted():
    m = BlockManager(8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    first = m.allocate(3)
    parent = None
    for j, b in enumerate(first[:2]):  # two full blocks, computed
        parent = m.register(b, parent, tuple(tokens[2 * j:2 * j + 2]))
    found, keys = m.match(tokens, limit=len(tokens) - 1)
    assert found == first[:2] and keys[-1] == parent
    assert m.refs(first[0]) == 2 and m.used == 3
    assert m.match([1, 2, 9, 9], limit=4)[0] == first[:1]  # the chain breaks at the first different block
    assert m.match([9, 2, 3, 4], limit=4)[0] == []
    assert m.match(tokens, limit=3)[0] == first[:1]  # never past the limit
    m.release(first)
    m.release(found)
    m.release(first[:1])
    m.release(first[:1])
    assert m.used == 0 and m.cached == 2  # unheld, still findable
    again, _ = m.match(tokens, limit=4)
    assert again == first[:2] and m.cached == 0 and m.used == 2
    m.release(again)


def test_cached_blocks_are_evicted_least_recently_released_first():
    m = BlockManager(3, block_size=1)
    a, b = m.allocate(1), m.allocate(1)
    m.register(a[0], None, (7,))
    m.register(b[0], None, (8,))
    m.release(b)  # released first: evicted first
    m.release(a)
    fresh = m.allocate(2)  # the empty block, then b's
    assert b[0] in fresh and a[0] not in fresh
    assert m.match([8, 0], limit=1)[0] == []  # b's content is gone
    assert m.match([7, 0], limit=1)[0] == a
    with pytest.raises(OutOfBlocks):
        m.allocate(1)
    m.release(fresh + a)
    assert m.used == 0


def test_without_prefix_cache_nothing_is_found():
    m = BlockManager(2, block_size=1, prefix_cache=False)
    b = m.allocate(1)
    m.register(b[0], None, (5,))
    m.release(b)
    assert m.match([5, 6], limit=1) == ([], []) and m.cached == 0 and m.free == 2


def test_a_duplicate_block_stays_private():
    m = BlockManager(4, block_size=1)
    a, b = m.allocate(1), m.allocate(1)
    assert m.register(a[0], None, (3,)) == m.register(b[0], None, (3,))
    m.release(b)  # not registered: back to empty, not cached
    assert m.cached == 0
    m.release(a)
    assert m.cached == 1 and m.match([3, 0], limit=1)[0] == a
    m.release(a)


def test_random_use_leaks_no_block():
    """Random sequences take matched and fresh blocks, register and release them: every count adds up."""
    rng = random.Random(1)
    m = BlockManager(16, block_size=2)
    held = []
    for _ in range(500):
        if held and (rng.random() < 0.4 or m.free < 3):
            m.release(held.pop(rng.randrange(len(held))))
            continue
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
        found, keys = m.match(tokens, limit=len(tokens) - 1)
        need = -(-len(tokens) // 2) - len(found)
        if need > m.free:
            m.release(found)
            continue
        table = found + m.allocate(need)
        parent = keys[-1] if keys else None
        for j in range(len(found), len(tokens) // 2):
            parent = m.register(table[j], parent, tuple(tokens[2 * j:2 * j + 2]))
        m.note_lookup(len(tokens), 2 * len(found))
        held.append(table)
        assert m.used == len({b for t in held for b in t}) and m.used + m.free == 16
    for t in held:
        m.release(t)
    assert m.used == 0 and m.free == 16
    assert 0 < m.hit_rate() < 1
