"""Each family on a tiny random config: our reference backend's logits equal transformers' (fp32), and
prefill + step-by-step decode through the KV cache equals the full-sequence forward."""

import pytest
import torch

import ingot
from tests.tiny_models import GEMMA4_MOE, make_hf_model, save_hf

# variant -> (family, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "qwen3moe": ("qwen3moe", {}),
    "gemma3": ("gemma3", {}),
    "gemma4": ("gemma4", {}),
    "gemma4-moe": ("gemma4", GEMMA4_MOE),
}
SEQ = 24  # longer than the tiny Gemmas' sliding window, so both masks are exercised


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ids(vocab, n=SEQ, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    hf = make_hf_model(family, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    save_hf(hf, path)
    return hf, ingot.load(path, device="cpu", max_context=64)


def test_logits_equal_transformers(pair):
    hf, ours = pair
    ids = _ids(ours.spec.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    got = ours.logits(ids)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-4


def test_decode_steps_equal_full_sequence(pair):
    _, ours = pair
    ids = _ids(ours.spec.vocab_size, seed=1)
    full = ours.logits(ids)
    ours.runner.tokens = []
    steps = [ours.runner.prefill(ids[:5])]
    for t in ids[5:]:
        steps.append(ours.runner.decode(t))
    stepped = torch.stack(steps)
    assert _rel(stepped, full[4:]) < 1e-5


def test_chunked_prefill_equals_one_chunk(pair):
    _, ours = pair
    ids = _ids(ours.spec.vocab_size, seed=2)
    ours.runner.tokens = []
    whole = ours.runner.prefill(ids)
    ours.runner.tokens, ours.runner.prefill_chunk = [], 7
    try:
        chunked = ours.runner.prefill(ids)
    finally:
        ours.runner.prefill_chunk = 512
    assert _rel(chunked, whole) < 1e-5


def test_qwen3moe_top8_of_8(tmp_path):
    hf = make_hf_model("qwen3moe", num_experts_per_tok=8)
    save_hf(hf, tmp_path)
    ours = ingot.load(tmp_path, device="cpu", max_context=64)
    assert ours.spec.layers[0].moe.top_k == 8
    ids = _ids(ours.spec.vocab_size, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert _rel(ours.logits(ids), ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folders(tmp_path, dtype):
    hf = make_hf_model("qwen3")
    save_hf(hf, tmp_path, dtype=dtype)
    ours = ingot.load(tmp_path, device="cpu", max_context=64)
    ref_model = make_hf_model("qwen3")
    ref_model.load_state_dict({k: v.to(dtype).float() for k, v in hf.state_dict().items()})
    ids = _ids(ours.spec.vocab_size, seed=4)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    assert _rel(ours.logits(ids), ref) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma4"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_mlx_folder_matches_dequantized_reference(tmp_path, family, bits, group):
    """An MLX-quantized folder runs the same function as transformers on the dequantized weights."""
    from ingot.quant.mlx import dequantize_mlx, quantize_mlx
    from tests.tiny_models import save_mlx

    hf = make_hf_model(family)
    save_mlx(hf, tmp_path, bits, group)
    ours = ingot.load(tmp_path, device="cpu", max_context=64)
    assert ours.format == "mlx"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "norm" not in name and p.shape[-1] % group == 0:
                p.copy_(dequantize_mlx(*quantize_mlx(p.float(), bits, group), bits, group))
    ids = _ids(ours.spec.vocab_size, seed=5)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert _rel(ours.logits(ids), ref) < 1e-4
