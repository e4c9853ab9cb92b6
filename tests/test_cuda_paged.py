"""The CUDA backend's paged step (the server's continuous batching) against the reference backend: on the
GPU when there is one, else under the Triton interpreter."""

import random

import pytest
import torch

from tests.test_cuda_backend import _rel, pair  # noqa: F401  (the CUDA / reference pair of a tiny model)

# gemma3: sliding window, qk-norm, sandwich norms; qwen3moe: the experts in a batched step (the server's path
# for Qwen3-30B-A3B: up to 32 rows on the decode kernels, more on the grouped GEMMs)
pytestmark = pytest.mark.parametrize("pair", ["llama", "gemma3", "qwen3moe"], indirect=True)


def test_mixed_steps_match_reference(pair):
    """Chunked prefills of different lengths beside another sequence's (the second step 41 rows: past the MoE
    decode kernels' 32), then decode steps of all three together, through shuffled block tables: each step's
    logits are the full-sequence reference's."""
    fast, ref = pair
    backend, bs = fast.backend, 4
    rng = random.Random(0)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (9, 3, 37)]
    cache = backend.new_paged_cache(32, bs)
    # 32 blocks for sequences and a spare one for the padding rows of a decode step's batch bucket
    assert cache.k[0].dtype == torch.float16 and cache.k[0].shape == (33, bs, fast.spec.n_kv_heads, fast.spec.head_dim)
    assert cache.spare_block == 32
    free = list(range(32))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-len(p) // bs))] for p in prompts]
    out1 = backend.forward_paged([(prompts[0][:5], 0, tables[0]), (prompts[1], 0, tables[1])], cache)
    out2 = backend.forward_paged([(prompts[2], 0, tables[2]), (prompts[0][5:], 5, tables[0])], cache)
    wants = [ref.runner.forward_all(prompts[0][:5])[-1], ref.runner.forward_all(prompts[1])[-1],
             ref.runner.forward_all(prompts[2])[-1], ref.runner.forward_all(prompts[0])[-1]]
    for got, want in zip(list(out1) + list(out2), wants):
        assert _rel(got, want) < 5e-3
    seqs = [list(p) for p in prompts]
    for _ in range(3):  # decode steps: one token each, a new block where a sequence fills its last
        nxt = [int(ref.runner.forward_all(s)[-1].argmax()) for s in seqs]
        for s, t, table in zip(seqs, nxt, tables):
            if len(s) + 1 > len(table) * bs:
                table.append(free.pop())
        out = backend.forward_paged([([t], len(s), table) for s, t, table in zip(seqs, nxt, tables)], cache)
        for s, t in zip(seqs, nxt):
            s.append(t)
        for got, s in zip(out, seqs):
            assert _rel(got, ref.runner.forward_all(s)[-1]) < 5e-3


def test_paged_cache_sizes_and_refusals(pair):
    fast, _ = pair
    s = fast.spec
    assert fast.backend.paged_block_bytes(16) == 2 * s.n_layers * 16 * s.n_kv_heads * s.head_dim * 2
    cache = fast.backend.new_paged_cache(4, 4)
    with pytest.raises(ValueError, match="blocks"):
        fast.backend.forward_paged([([1, 2, 3, 4, 5], 0, [0])], cache)
