"""Tiny random transformers models of each family, saved as HF or MLX folders, for format and logits tests.

Nothing is downloaded: models are built from configs with seeded random weights. Norm weights are random
too, so that a loader or backend using the wrong norm convention (w vs 1 + w) produces wrong numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # larger than the default 0.02 so logits and routing are not near-uniform
    dtype="float32",
)

# family -> (transformers config class, causal-LM class, config kwargs)
TINY_CONFIGS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            _COMMON,
            head_dim=16,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            # original context 64 with head_dim 16 puts frequencies in all three llama3 bands
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        # head_dim * heads != hidden, as in real Qwen3
        dict(_COMMON, head_dim=32, num_hidden_layers=2, tie_word_embeddings=False),
    ),
    "qwen3moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            _COMMON,
            head_dim=16,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            num_experts=8,
            num_experts_per_tok=2,  # override with 8 for the all-experts path
            moe_intermediate_size=64,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _COMMON,
            head_dim=32,
            num_hidden_layers=4,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,  # not head_dim, so a backend that ignores it is caught
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
    # Every Gemma 4 feature but the MoE block (GEMMA4_MOE turns it on): global layers with a wider head, fewer
    # kv heads and values from the key projection; the last two layers reading layers 2 and 3's keys and values
    # with double-wide MLPs; per-layer input embeddings; a softcap small enough to bend these logits.
    "gemma4": (
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        dict(
            _COMMON,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            num_hidden_layers=6,
            layer_types=["sliding_attention", "full_attention"] * 3,
            sliding_window=4,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=128,
            final_logit_softcapping=2.0,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
}
# The MoE variant (as 26B-A4B): experts beside the dense MLP on every layer, separate k and v projections,
# no KV sharing, no per-layer inputs.
GEMMA4_MOE = dict(
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    attention_k_eq_v=False,
    num_global_key_value_heads=None,
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
    hidden_size_per_layer_input=0,
)


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A seeded random transformers causal LM of the family, in eval mode (fp32, eager attention)."""
    import transformers

    config_cls, model_cls, base = TINY_CONFIGS[family]
    kwargs = copy.deepcopy(base)
    kwargs.update(overrides)
    if family == "gemma3" and "num_hidden_layers" in overrides and "layer_types" not in overrides:
        kwargs["layer_types"] = [
            "full_attention" if i % 2 else "sliding_attention" for i in range(kwargs["num_hidden_layers"])
        ]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gemma = family == "gemma3"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Gemma 3 stores w of a (1 + w) multiplier; the others store the multiplier itself.
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if gemma else 1.0))
            elif name.endswith("scale"):  # Gemma 4's router scales, initialised to ones
                p.copy_(torch.randn_like(p) * 0.2 + 1.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale, initialised to one
                b.copy_(torch.rand_like(b) + 0.5)
    return model


def save_hf(model, dir, dtype=torch.float32, max_shard_size=None) -> Path:
    """save_pretrained of a copy cast to dtype, sharded (with an index) when max_shard_size is given."""
    dir = Path(dir)
    m = copy.deepcopy(model).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    m.save_pretrained(dir, **kwargs)
    return dir


def _mlx_state(model) -> dict[str, torch.Tensor]:
    """The state dict under mlx-lm's names: tied lm_head dropped, MoE experts stacked as switch_mlp
    (Gemma 4: experts.switch_glu)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for k in [k for k in state if k.endswith("experts.gate_up_proj")]:
        gate_up = state.pop(k)
        down = state.pop(k.replace("gate_up_proj", "down_proj"))
        f = gate_up.shape[-2] // 2
        switch = "switch_mlp." if k.endswith("mlp.experts.gate_up_proj") else "experts.switch_glu."
        base = k[: -len("experts.gate_up_proj")] + switch
        state[base + "gate_proj.weight"] = gate_up[:, :f].contiguous()
        state[base + "up_proj.weight"] = gate_up[:, f:].contiguous()
        state[base + "down_proj.weight"] = down.contiguous()
    return state


def save_mlx(model, dir, bits, group_size, dtype=torch.float32) -> Path:
    """An mlx-lm style folder: every linear, stacked expert and the embedding whose last dim divides by
    group_size quantized with quantize_mlx (uint32 weight, scales, biases in dtype); the rest in dtype.
    MoE routers get an 8-bit per-layer override, as MLX converters keep them precise."""
    from ingot.quant.mlx import quantize_mlx

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    overrides = {}
    out = {}
    for name, t in _mlx_state(model).items():
        module = name[: -len(".weight")]
        is_matrix = name.endswith(".weight") and t.dim() >= 2 and "norm" not in name
        b, g = bits, group_size
        if is_matrix and module.endswith(("mlp.gate", "router.proj")):
            b, g = 8, 64 if t.shape[-1] % 64 == 0 else group_size
            overrides[module] = {"group_size": g, "bits": b}
        if is_matrix and t.shape[-1] % g == 0:
            words, scales, biases = quantize_mlx(t.float(), b, g, dtype=dtype)
            out[name] = words.view(torch.uint32)
            out[module + ".scales"] = scales
            out[module + ".biases"] = biases
        else:
            out[name] = t.to(dtype).contiguous()
    save_file(out, str(dir / "model.safetensors"), metadata={"format": "mlx"})
    cfg = model.config.to_dict()
    cfg["quantization"] = {"group_size": group_size, "bits": bits, **overrides}
    cfg["quantization_config"] = cfg["quantization"]
    (dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return dir


def hf_reference_tensors(model) -> dict[str, torch.Tensor]:
    """Canonical name -> float32 tensor from the model's parameters, written independently of the loader:
    Gemma 3 norms as 1 + w, MoE experts stacked (gate is the first half of transformers' gate_up_proj)."""
    gemma = model.config.model_type.startswith("gemma")
    one_plus_w = model.config.model_type.startswith("gemma3")
    top = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
        "model.embed_tokens_per_layer.weight": "per_layer_token_embd",
        "model.per_layer_model_projection.weight": "per_layer_model_proj",
        "model.per_layer_projection_norm.weight": "per_layer_proj_norm",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "post_attention_norm" if gemma else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "mlp.gate": "ffn_gate_inp",
        "pre_feedforward_layernorm_2": "pre_ffw_norm_2",
        "post_feedforward_layernorm_1": "post_ffw_norm_1",
        "post_feedforward_layernorm_2": "post_ffw_norm_2",
        "router.proj": "ffn_gate_inp",
        "router.scale": "ffn_gate_inp_scale",
        "router.per_expert_scale": "ffn_exp_scale",
        "per_layer_input_gate": "inp_gate",
        "per_layer_projection": "proj",
        "post_per_layer_input_norm": "post_norm",
        "layer_scalar": "layer_output_scale",
    }
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name in top:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            canon = top[name]
        else:
            parts = name.split(".")
            if parts[:2] != ["model", "layers"]:
                continue
            i, rest = parts[2], ".".join(parts[3:])
            experts = rest.removeprefix("mlp.")  # Gemma 4's experts sit beside its mlp
            if experts == "experts.gate_up_proj":
                f = t.shape[-2] // 2
                out[f"blk.{i}.ffn_gate_exps.weight"] = t[:, :f]
                out[f"blk.{i}.ffn_up_exps.weight"] = t[:, f:]
                continue
            if experts == "experts.down_proj":
                out[f"blk.{i}.ffn_down_exps.weight"] = t
                continue
            module = rest.removesuffix(".weight")
            if module not in per_layer:
                continue
            canon = f"blk.{i}.{per_layer[module]}"
        if one_plus_w and canon.endswith("norm"):
            t = t + 1.0
        out[canon + ".weight"] = t
    return out
