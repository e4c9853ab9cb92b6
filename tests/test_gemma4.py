"""Gemma 4 text beyond the shared family tests: step-by-step decode against transformers itself, the layer
structure the config implies (KV sharing, global heads, k_eq_v, double-wide MLPs, proportional rope), the two
config.json spellings of the global attention dims, clear errors for configs it cannot run, and what the CUDA
backend would refuse."""

import json

import pytest
import torch

import ingot
from ingot.errors import FormatError, UnsupportedError
from ingot.models import build_spec
from tests.tiny_models import GEMMA4_MOE, make_hf_model, save_hf

VARIANTS = {"dense": {}, "moe": GEMMA4_MOE}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ids(n=20, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = make_hf_model("gemma4", **VARIANTS[request.param])
    path = save_hf(hf, tmp_path_factory.mktemp(f"gemma4-{request.param}"))
    return hf, ingot.load(path, device="cpu", max_context=64), path


def test_decode_steps_equal_transformers(pair):
    """Prefill 3 tokens then decode one at a time; every step's logits are transformers' at that position."""
    hf, ours, _ = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours.runner.tokens = []
    steps = [ours.runner.prefill(ids[:3])] + [ours.runner.decode(t) for t in ids[3:]]
    assert _rel(torch.stack(steps), ref[2:]) < 1e-5


def test_transformers_cached_decode_agrees(pair):
    """transformers' own cached decode (its KV sharing through the cache) gives the same logits as ours."""
    hf, ours, _ = pair
    ids = _ids(seed=1)
    with torch.no_grad():
        out = hf(torch.tensor([ids[:4]]), use_cache=True)
        cache, theirs = out.past_key_values, [out.logits[0, -1]]
        for t in ids[4:]:
            out = hf(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            theirs.append(out.logits[0, -1])
    ours.runner.tokens = []
    mine = [ours.runner.prefill(ids[:4])] + [ours.runner.decode(t) for t in ids[4:]]
    assert _rel(torch.stack(mine), torch.stack(theirs).float()) < 1e-5


def _spec(**overrides):
    return build_spec("gemma4", make_hf_model("gemma4", **overrides).config.to_dict())


def test_dense_layer_structure():
    s = _spec()
    assert [l.kv_source for l in s.layers] == [None, None, None, None, 2, 3]
    assert [l.k_eq_v for l in s.layers] == [False, True] * 3
    assert [s.attn_dims(i) for i in range(6)] == [(16, 2), (32, 1)] * 3
    assert [l.intermediate_size for l in s.layers] == [None] * 4 + [192, 192]
    names = s.weights()
    assert "blk.4.attn_k.weight" not in names and "blk.4.attn_k_norm.weight" not in names
    assert "blk.1.attn_v.weight" not in names and names["blk.1.attn_k.weight"] == (32, 64)
    assert names["per_layer_token_embd.weight"] == (128, 6 * 8)
    # 25% of the global head's 16 frequency pairs rotate, with exponents over the whole 32 dims
    inv = s.layers[1].rope.inv_freq()
    assert inv.shape == (16,) and inv[4:].eq(0).all() and inv[:4].gt(0).all()
    assert torch.allclose(inv[1], torch.tensor(1e6 ** (-2 / 32)))
    # the shared layers keep no cache of their own
    from ingot.backends.reference import ReferenceBackend

    zeros = {n: torch.zeros(shape) for n, shape in s.weights().items()}
    cache = ReferenceBackend(s, zeros, "cpu", torch.float32).new_cache(8)
    assert cache.k[4] is None and cache.v[5] is None and cache.k[3].shape == (8, 1, 32)


def test_moe_layer_structure():
    s = _spec(**GEMMA4_MOE)
    assert all(l.moe == s.layers[0].moe for l in s.layers)
    moe = s.layers[0].moe
    assert (moe.n_experts, moe.top_k, moe.intermediate_size, moe.parallel_dense) == (8, 2, 32, True)
    names = s.weights()
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_exp_scale.weight"} <= set(names)
    assert "per_layer_token_embd.weight" not in names


def test_google_config_spelling_gives_the_same_spec(pair):
    """Google's config.json names the global dims global_head_dim / num_global_key_value_heads; transformers
    5.15 writes per_layer_config instead. Both describe one model."""
    hf, ours, _ = pair
    cfg = json.loads(json.dumps(hf.config.to_dict()))
    del cfg["per_layer_config"]
    cfg["global_head_dim"] = 32
    cfg["num_global_key_value_heads"] = 1 if hf.config.attention_k_eq_v else None
    spec = build_spec("gemma4", cfg)
    assert spec.layers == ours.spec.layers and spec.weights() == ours.spec.weights()


def test_nested_text_config(tmp_path):
    """Gemma4ForConditionalGeneration's config nests the text model; the text tensors sit under language_model."""
    hf = make_hf_model("gemma4")
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in hf.state_dict().items()}
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
           "text_config": hf.config.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = ingot.load(tmp_path, device="cpu", max_context=64)
    ids = _ids(seed=2)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert _rel(ours.logits(ids), ref) < 1e-5


@pytest.mark.parametrize("change,field", [
    ({"num_kv_shared_layers": 6}, "num_kv_shared_layers"),
    ({"num_kv_shared_layers": 5, "layer_types": ["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"]},
     "num_kv_shared_layers"),
    ({"enable_moe_block": True, "num_experts": None}, "num_experts"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"per_layer_config": {"1": {"sliding_window": 8}}}, "per_layer_config"),
])
def test_unsupported_configs_name_the_field(pair, change, field):
    hf, _, _ = pair
    cfg = json.loads(json.dumps(hf.config.to_dict())) | change
    with pytest.raises(UnsupportedError, match=field):
        build_spec("gemma4", cfg)


def test_cuda_backend_refuses_only_what_it_does_not_cover(pair, monkeypatch):
    """Every feature the spec uses beyond one repeated block is one the CUDA backend covers (it runs Gemma 4:
    tests/test_cuda_gemma4.py); a feature it did not cover would be refused by name, before any packing."""
    from ingot.backends.cuda import backend

    _, ours, path = pair
    assert set(ours.spec.beyond_uniform()) <= backend.COVERED
    monkeypatch.setattr(backend, "COVERED", backend.COVERED - {"v norm"})
    with pytest.raises(UnsupportedError, match="CUDA backend does not cover gemma4's v norm yet.*backend='reference'"):
        ingot.load(path, device="cpu", backend="cuda", max_context=64)


def _write_gguf(hf, path, rotary_swa=None):
    """A GGUF laid out as llama.cpp's convert_hf_to_gguf writes gemma4 (float32 tensors): gguf-py's tensor
    names, the router scales as ffn_gate_inp.scale / ffn_down_exps.scale, the fused expert gate_up, per-layer
    arrays for the sliding pattern, kv heads and MLP widths, and rope_freqs for the proportional rope."""
    import gguf
    import numpy as np

    c = hf.config
    n = c.num_hidden_layers
    w = gguf.GGUFWriter(str(path), "gemma4")
    swa = [t == "sliding_attention" for t in c.layer_types]
    w.add_block_count(n)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    shared = c.num_kv_shared_layers
    ff = [c.intermediate_size * (2 if c.use_double_wide_mlp and i >= n - shared else 1) for i in range(n)]
    w.add_feed_forward_length(ff if c.use_double_wide_mlp else c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    local, full = (c.per_layer_config[c.layer_types.index(t)] for t in ("sliding_attention", "full_attention"))
    kv, global_kv, global_hd = local.num_key_value_heads, full.num_key_value_heads, full.head_dim
    w.add_head_count_kv([kv if s else global_kv for s in swa] if global_kv != kv else kv)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(global_hd)
    w.add_value_length(global_hd)
    w.add_key_length_swa(local.head_dim)
    w.add_value_length_swa(local.head_dim)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
    w.add_rope_dimension_count(global_hd)
    w.add_rope_dimension_count_swa(rotary_swa or local.head_dim)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input or 0)
    if c.enable_moe_block:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_vocab_size(c.vocab_size)  # no tokenizer here: the logits are all that is compared
    rotated = int(global_hd * c.rope_parameters["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (global_hd // 2 - rotated), np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        bid = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("router.scale"):
            name = f"blk.{bid}.ffn_gate_inp.scale"
        elif key.endswith("router.per_expert_scale"):
            name = f"blk.{bid}.ffn_down_exps.scale"
        else:
            suffixed = key if key.endswith(".weight") else key + ".weight"
            name = names.get_name(suffixed, try_suffixes=(".weight",))
        w.add_tensor(name, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_cpp_gguf_equals_transformers(pair, tmp_path):
    hf, _, _ = pair
    ours = ingot.load(_write_gguf(hf, tmp_path / "g4.gguf"), device="cpu", max_context=64)
    assert ours.format == "gguf" and ours.arch == "gemma4"
    ids = _ids(seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert _rel(ours.logits(ids), ref) < 1e-5


def test_gguf_with_partial_local_rotary_is_refused(pair, tmp_path):
    hf, _, _ = pair
    half = hf.config.per_layer_config[hf.config.layer_types.index("sliding_attention")].head_dim // 2
    with pytest.raises(FormatError, match=f"'gemma4.rope.dimension_count_swa' is {half}"):
        ingot.load(_write_gguf(hf, tmp_path / "g4.gguf", rotary_swa=half), device="cpu", max_context=64)


# Google's published text configs (transformers' convert_gemma4_weights), the keys that differ from the defaults.
_E2B_TYPES = ["sliding_attention"] * 4 + ["full_attention"]
_DEFAULT_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
PUBLISHED = {
    "e2b": dict(hidden_size=1536, hidden_size_per_layer_input=256, intermediate_size=6144, num_hidden_layers=35,
                layer_types=_E2B_TYPES * 7, num_attention_heads=8, num_key_value_heads=1, num_kv_shared_layers=20,
                use_double_wide_mlp=True, final_logit_softcapping=30.0),
    "e4b": dict(hidden_size=2560, hidden_size_per_layer_input=256, intermediate_size=10240, num_hidden_layers=42,
                layer_types=_DEFAULT_TYPES * 7, num_attention_heads=8, num_key_value_heads=2, global_head_dim=512,
                num_kv_shared_layers=18, final_logit_softcapping=30.0),
    "26b-a4b": dict(hidden_size=2816, hidden_size_per_layer_input=0, intermediate_size=2112, num_hidden_layers=30,
                    layer_types=_DEFAULT_TYPES * 5, num_attention_heads=16, num_key_value_heads=8,
                    num_global_key_value_heads=2, attention_k_eq_v=True, use_bidirectional_attention="vision",
                    enable_moe_block=True, num_experts=128, moe_intermediate_size=704, top_k_experts=8,
                    sliding_window=1024, final_logit_softcapping=30.0, max_position_embeddings=262144),
}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_published_shapes_match_transformers_parameters(variant):
    """At the real shapes, the spec names exactly transformers' parameters, with their shapes (built on the meta
    device, so nothing is allocated)."""
    import transformers

    from tests.tiny_models import hf_reference_tensors

    config = transformers.Gemma4TextConfig(**PUBLISHED[variant])
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(config)
    want = {n: tuple(t.shape) for n, t in hf_reference_tensors(model).items()}
    spec = build_spec("gemma4", json.loads(json.dumps(config.to_dict())))
    assert spec.weights() == want
