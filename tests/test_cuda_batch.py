"""Several sequences decoded together on the CUDA backend (batch buckets, a scratch cache slot for the
padding rows, one graph per bucket on a GPU) against the reference backend run one sequence at a time."""

import pytest
import torch

import ingot
from ingot.backends.cuda.backend import buckets_for, cache_slots
from ingot.errors import IngotError
from tests.tiny_models import make_hf_model, save_hf

PROMPTS = [[3, 17, 42, 5, 9], [7, 1, 2, 8, 11, 30, 4, 6, 12], [21, 13, 2]]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def models(request, tmp_path_factory):
    """The CUDA / reference pair of a tiny llama, or of the family a test asks for (indirect)."""
    from tests.conftest import KERNEL_DEVICE

    family = getattr(request, "param", "llama")
    path = tmp_path_factory.mktemp(family)
    save_hf(make_hf_model(family), path)
    fast = ingot.load(path, device=KERNEL_DEVICE, backend="cuda", max_context=40, max_batch=4)
    ref = ingot.load(path, device=KERNEL_DEVICE, backend="reference", dtype=torch.float32, max_context=40)
    return fast, ref


def test_buckets():
    assert buckets_for(1) == (1,)
    assert buckets_for(4) == (1, 2, 4)
    assert buckets_for(12) == (1, 2, 4, 8, 12)
    assert buckets_for(32) == (1, 2, 4, 8, 16, 32)
    assert cache_slots(1) == 1 and cache_slots(4) == 5
    with pytest.raises(ValueError):
        buckets_for(33)


@pytest.mark.parametrize("models", ["llama", "qwen3moe"], indirect=True)  # qwen3moe: the padding row routes too
def test_batched_logits_match_one_at_a_time(models):
    fast, ref = models
    steps = [[4, 9, 14], [2, 19, 6], [33, 1, 8]]  # forced next tokens per step, one per sequence
    want = []
    for p in PROMPTS:
        rows = [ref.runner.prefill(p).clone()]
        for s in steps:
            rows.append(ref.runner.decode(s[len(want)]).clone())
        want.append(rows)
    got = fast.runner.prefill_batch(PROMPTS)  # 3 sequences: bucket 4, one padding row in the scratch slot
    for i in range(3):
        assert _rel(got[i], want[i][0]) < 5e-3
    for j, s in enumerate(steps):
        got = fast.runner.decode_batch(s)
        assert got.shape[0] == 3
        for i in range(3):
            assert _rel(got[i], want[i][j + 1]) < 5e-3, (i, j)
    # Two of the sequences alone use bucket 2; its buffers (and graph) are separate from bucket 4's.
    got = fast.runner.prefill_batch(PROMPTS[:2])
    for i in range(2):
        assert _rel(got[i], want[i][0]) < 5e-3


def test_generate_batch_matches_greedy_one_at_a_time(models):
    fast, ref = models
    want = [ref.generate_ids(p, max_tokens=6) for p in PROMPTS]
    assert fast.generate_batch_ids(PROMPTS, max_tokens=6) == want
    assert fast.last_stats.generated_tokens == sum(map(len, want))
    # The single-sequence path still works after a batch (slot 0 is reused).
    assert fast.generate_ids(PROMPTS[1], max_tokens=6) == want[1]


def test_batch_errors(models):
    fast, _ = models
    with pytest.raises(IngotError, match="1..4 prompts"):
        fast.generate_batch_ids([[1, 2]] * 5, max_tokens=2)
    with pytest.raises(IngotError, match="empty"):
        fast.generate_batch_ids([[1, 2], []], max_tokens=2)
    with pytest.raises(ValueError, match="running sequences"):
        fast.runner.prefill_batch(PROMPTS)
        fast.runner.decode_batch([1, 2])


def test_max_batch_needs_the_cuda_backend(tmp_path):
    save_hf(make_hf_model("llama"), tmp_path)
    with pytest.raises(IngotError, match="only the CUDA backend"):
        ingot.load(tmp_path, device="cpu", backend="reference", max_batch=2)
    with pytest.raises(IngotError, match="between 1 and 32"):
        ingot.load(tmp_path, device="cpu", backend="cuda", max_batch=64)


def test_bench_batch(models):
    from ingot.bench.bench import run_bench

    fast, _ = models
    rows = run_bench(fast, n_prompt=(8,), n_gen=(3,), reps=1, warmup=0, batch=2)
    assert [r["test"] for r in rows] == ["pp8 b2", "tg3 b2"] and all(r["tps_mean"] > 0 for r in rows)
