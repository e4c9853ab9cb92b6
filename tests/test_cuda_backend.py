"""The whole CUDA backend (every Triton kernel composed into blocks) against the reference backend, on
tiny models: on the GPU when there is one, else under the Triton interpreter on the CPU."""

import pytest
import torch

import ingot
from tests.tiny_models import make_hf_model, save_hf


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def pair(request, tmp_path_factory):
    from tests.conftest import KERNEL_DEVICE

    path = tmp_path_factory.mktemp(request.param)
    save_hf(make_hf_model(request.param), path)
    fast = ingot.load(path, device=KERNEL_DEVICE, backend="cuda", max_context=48)
    ref = ingot.load(path, device=KERNEL_DEVICE, backend="reference", dtype=torch.float32, max_context=48)
    return fast, ref


def test_prefill_and_decode_match_reference(pair):
    fast, ref = pair
    ids = torch.randint(0, fast.spec.vocab_size, (26,), generator=torch.Generator().manual_seed(0)).tolist()
    fast.runner.prefill_chunk = ref.runner.prefill_chunk = 20  # two prefill chunks, the second at start > 0
    a, b = fast.runner.prefill(ids[:22]).clone(), ref.runner.prefill(ids[:22])
    assert _rel(a, b) < 5e-3
    for t in ids[22:]:
        a, b = fast.runner.decode(t).clone(), ref.runner.decode(t)
        assert _rel(a, b) < 5e-3


def test_greedy_tokens_match_reference(pair):
    fast, ref = pair
    prompt = [3, 17, 42, 5, 9]
    assert fast.generate_ids(prompt, max_tokens=8) == ref.generate_ids(prompt, max_tokens=8)


def test_memory_is_reported(pair):
    fast, _ = pair
    mem = fast.memory
    assert mem["weights"] > 0 and mem["kv_cache"] > 0 and mem["buffers"] > 0
    assert mem["total"] == mem["weights"] + mem["kv_cache"] + mem["buffers"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU sampler runs where the logits are: on a GPU")
def test_gpu_sampling_through_the_api(pair):
    fast, _ = pair
    prompt = [3, 17, 42, 5, 9]
    args = dict(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    first = fast.generate_ids(prompt, **args)
    assert first == fast.generate_ids(prompt, **args)  # a seed reproduces the run
    assert fast.generate_ids(prompt, max_tokens=8, temperature=1.0, top_k=1, seed=3) == \
        fast.generate_ids(prompt, max_tokens=8)  # top-k 1 is greedy


def test_a_model_that_does_not_fit_fails_with_the_numbers(pair):
    from ingot.backends.cuda.backend import CudaKVCache
    from ingot.backends.cuda.weights import check_fits, kv_cache_bytes
    from ingot.errors import IngotError

    fast, _ = pair
    assert kv_cache_bytes(fast.spec, 48) == CudaKVCache(fast.spec, 48, "cpu").nbytes
    need = {"weights": 3 * 2**30, "KV cache": 2 * 2**30}
    check_fits(need, 6 * 2**30, "cuda:0")
    with pytest.raises(IngotError, match=r"needs 5.00 GiB on cuda:0 \(weights 3.00 GiB, KV cache 2.00 GiB\); "
                                         r"only 4.00 GiB is free"):
        check_fits(need, 4 * 2**30, "cuda:0")
