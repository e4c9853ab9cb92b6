"""Hugging Face and MLX safetensors folders load under canonical names with the documented conversions."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ingot.errors import FormatError, UnsupportedError
from ingot.formats import open_checkpoint
from ingot.formats.hf import MLXTensor
from ingot.models import build_spec
from ingot.quant.mlx import dequantize_mlx
from tests.tiny_models import TINY_CONFIGS, hf_reference_tensors, make_hf_model, save_hf, save_mlx

FAMILIES = sorted(TINY_CONFIGS)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@pytest.fixture(scope="module")
def models():
    return {f: make_hf_model(f) for f in FAMILIES}


def check_against(ckpt, model, dtype=torch.float32):
    build_spec(ckpt.arch, ckpt.config).check_tensors(ckpt.tensors, str(ckpt.path))
    ref = hf_reference_tensors(copy.deepcopy(model).to(dtype))
    assert set(ckpt.tensors) == set(ref)
    for name, want in ref.items():
        got = ckpt.tensors[name].dequantize()
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", list(DTYPES))
def test_float_folder(models, family, qtype, tmp_path):
    model = models[family]
    save_hf(model, tmp_path, dtype=DTYPES[qtype])
    ckpt = open_checkpoint(tmp_path)
    assert (ckpt.format, ckpt.arch) == ("hf", family)
    assert ckpt.config["num_hidden_layers"] == model.config.num_hidden_layers
    assert ckpt.load_tokenizer() is None  # no tokenizer.json written
    gemma_norm = lambda n: family == "gemma3" and n.endswith("norm.weight")  # noqa: E731
    assert {t.qtype for n, t in ckpt.tensors.items() if not gemma_norm(n)} == {qtype}
    check_against(ckpt, model, DTYPES[qtype])


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_with_and_without_index(models, family, tmp_path):
    save_hf(models[family], tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    check_against(open_checkpoint(tmp_path), models[family])
    (tmp_path / "model.safetensors.index.json").unlink()
    check_against(open_checkpoint(tmp_path), models[family])


def test_transformers_writes_per_expert_tensors(models, tmp_path):
    save_hf(models["qwen3moe"], tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_fused_experts_and_dense_layer(tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj / experts.down_proj), one dense layer."""
    model = make_hf_model("qwen3moe", mlp_only_layers=[0])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    ckpt = open_checkpoint(tmp_path)
    assert "blk.0.ffn_gate.weight" in ckpt.tensors and "blk.1.ffn_gate_exps.weight" in ckpt.tensors
    check_against(ckpt, model)


def test_multimodal_gemma3(tmp_path):
    import transformers

    _, _, base = TINY_CONFIGS["gemma3"]
    text = {k: v for k, v in base.items() if k != "dtype"}
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=127, boi_token_index=125, eoi_token_index=126,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.arch == "gemma3" and ckpt.config["model_type"] == "gemma3_text"
    lm = model.model.language_model
    build_spec(ckpt.arch, ckpt.config).check_tensors(ckpt.tensors, "mm")
    assert torch.equal(ckpt.tensors["token_embd.weight"].dequantize(), lm.embed_tokens.weight)
    pre_ffw = lm.layers[1].pre_feedforward_layernorm.weight
    assert torch.equal(ckpt.tensors["blk.1.ffn_norm.weight"].dequantize(), pre_ffw + 1)


def test_gemma3_sparse_text_config(models, tmp_path):
    """Multimodal Gemma 3 configs omit most text keys; the loader fills Gemma3TextConfig's defaults."""
    save_hf(models["gemma3"], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "sliding_window", "vocab_size")
    text = {k: cfg[k] for k in keep} | {"num_hidden_layers": 12}  # only the config is checked here
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    assert (ckpt.config["num_attention_heads"], ckpt.config["head_dim"]) == (8, 256)


def check_mlx(ckpt, folder, model, bits, group_size):
    """Every quantized tensor is dequantize_mlx of what was written and within one step of the original."""
    build_spec(ckpt.arch, ckpt.config).check_tensors(ckpt.tensors, str(folder))
    ref = hf_reference_tensors(model)
    assert set(ckpt.tensors) == set(ref)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    n_quantized = 0
    for name, t in ckpt.tensors.items():
        got = t.dequantize()
        assert got.shape == ref[name].shape, name
        if not isinstance(t, MLXTensor):
            assert torch.equal(got, ref[name]), name
            continue
        n_quantized += 1
        w, scales, biases = t.packed()
        assert t.qtype == f"MLX{t.bits}" and w.dtype == torch.uint32
        if t.bits == bits:
            assert t.group_size == group_size
        if got.dim() == 2:  # stored under its own name: compare with the file directly
            stem = next(k[: -len(".scales")] for k, v in written.items() if k.endswith(".scales") and v.equal(scales))
            assert torch.equal(got, dequantize_mlx(written[stem + ".weight"], scales, biases, t.bits, t.group_size))
        # One quantization step, plus what storing scale and bias in their dtype may round away.
        rounding = (biases.float().abs() + ((1 << t.bits) - 1) * scales.float().abs()) * torch.finfo(scales.dtype).eps
        tol = (scales.float().abs() * 1.001 + rounding).repeat_interleave(t.group_size, dim=-1) + 1e-6
        assert ((got - ref[name]).abs() <= tol).all(), name
    assert n_quantized


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mlx_llama(bits, group_size, tmp_path):
    model = make_hf_model("llama", hidden_size=128, intermediate_size=256)
    save_mlx(model, tmp_path, bits, group_size)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "mlx" and ckpt.arch == "llama"
    assert ckpt.tensors["blk.0.attn_q.weight"].qtype == f"MLX{bits}"
    assert ckpt.tensors["token_embd.weight"].qtype == f"MLX{bits}"
    assert ckpt.tensors["blk.0.attn_norm.weight"].qtype == "F32"
    check_mlx(ckpt, tmp_path, model, bits, group_size)


def test_mlx_qwen3moe_with_router_override(tmp_path):
    model = make_hf_model("qwen3moe")
    save_mlx(model, tmp_path, 4, 64, dtype=torch.bfloat16)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.tensors["blk.0.ffn_gate_exps.weight"].qtype == "MLX4"
    assert ckpt.tensors["blk.0.ffn_gate_exps.weight"].shape == (8, 64, 64)
    assert ckpt.tensors["blk.0.ffn_gate_inp.weight"].qtype == "MLX8"  # the per-layer override
    assert ckpt.tensors["blk.0.attn_norm.weight"].qtype == "BF16"
    check_mlx(ckpt, tmp_path, copy.deepcopy(model).to(torch.bfloat16), 4, 64)


@pytest.mark.parametrize("bits, group_size", [(3, 64), (4, 16), (2, 64)])
def test_mlx_unsupported_params(models, bits, group_size, tmp_path):
    save_mlx(models["llama"], tmp_path, 4, 32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization"] = cfg["quantization_config"] = {"bits": bits, "group_size": group_size}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="not supported"):
        open_checkpoint(tmp_path)


def test_missing_config(models, tmp_path):
    save_hf(models["llama"], tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json"):
        open_checkpoint(tmp_path)


def test_unknown_model_type_lists_supported(models, tmp_path):
    save_hf(models["llama"], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="mistral.*gemma3, gemma4, llama, qwen3, qwen3moe"):
        open_checkpoint(tmp_path)


def test_no_safetensors(models, tmp_path):
    save_hf(models["llama"], tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="no .*safetensors"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors(models, tmp_path):
    save_hf(models["llama"], tmp_path)
    f = tmp_path / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    with pytest.raises(FormatError, match="truncated or corrupt"):
        open_checkpoint(tmp_path)


def test_integer_weights_in_unquantized_folder(models, tmp_path):
    save_hf(models["llama"], tmp_path)
    f = tmp_path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        state = {k: h.get_tensor(k) for k in h.keys()}
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].to(torch.int32)
    save_file(state, str(f))
    with pytest.raises(FormatError, match="I32"):
        open_checkpoint(tmp_path)


def test_mlx_gemma3_norms(models, tmp_path):
    save_mlx(models["gemma3"], tmp_path, 4, 32)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.tensors["blk.0.post_ffw_norm.weight"].qtype == "F32"
    check_mlx(ckpt, tmp_path, models["gemma3"], 4, 32)


@pytest.mark.parametrize("moe", [False, True])
def test_mlx_gemma4(tmp_path, moe):
    """mlx-lm's Gemma 4 names: HF's, with the experts stacked under experts.switch_glu; norms stay plain."""
    from tests.tiny_models import GEMMA4_MOE

    model = make_hf_model("gemma4", **(GEMMA4_MOE if moe else {}))
    save_mlx(model, tmp_path, 4, 32)
    ckpt = open_checkpoint(tmp_path)
    assert (ckpt.format, ckpt.arch) == ("mlx", "gemma4")
    assert ckpt.tensors["blk.0.attn_q.weight"].qtype == "MLX4"
    if moe:
        assert ckpt.tensors["blk.0.ffn_gate_exps.weight"].qtype == "MLX4"
        assert ckpt.tensors["blk.0.ffn_gate_inp.weight"].qtype == "MLX8"
    else:
        assert ckpt.tensors["per_layer_model_proj.weight"].qtype == "MLX4"
    check_mlx(ckpt, tmp_path, model, 4, 32)


def test_linear_bias_is_refused(tmp_path):
    from tests.tiny_models import make_hf_model, save_hf

    model = make_hf_model("llama", attention_bias=True)
    save_hf(model, tmp_path)
    with pytest.raises(UnsupportedError, match="bias"):
        open_checkpoint(tmp_path)
