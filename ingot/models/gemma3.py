"""Gemma 3 text: sliding-window layers with a local RoPE base between global layers, q/k norms,
extra norms around attention and MLP, GELU-tanh gated MLP, embeddings scaled by sqrt(hidden)."""

import math

from ingot.models.base import LayerSpec, ModelSpec, common_dims, rope_from_config


def spec(cfg: dict, max_context: int | None = None) -> ModelSpec:
    cfg = cfg.get("text_config", cfg)  # multimodal Gemma3ForConditionalGeneration configs nest the text model
    dims = common_dims(cfg, max_context)
    hd = dims["head_dim"]
    global_rope = rope_from_config(cfg, hd, "full_attention", default_theta=1000000.0)
    local_rope = rope_from_config(cfg, hd, "sliding_attention", default_theta=10000.0)
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % (cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern", 6)) == 0 else "sliding_attention"
        for i in range(n)
    ]
    window = cfg.get("sliding_window")
    layers = [
        LayerSpec(local_rope, sliding_window=window) if t == "sliding_attention" else LayerSpec(global_rope)
        for t in types
    ]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        from ingot.errors import UnsupportedError

        raise UnsupportedError(f"gemma3: activation '{act}' is not supported (gelu_pytorch_tanh is)")
    return ModelSpec(
        arch="gemma3",
        layers=layers,
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        qk_norm=True,
        sandwich_norm=True,
        activation="gelu_tanh",
        embed_scale=math.sqrt(dims["hidden_size"]),
        attn_scale=cfg.get("query_pre_attn_scalar", hd) ** -0.5,
        **dims,
    )
