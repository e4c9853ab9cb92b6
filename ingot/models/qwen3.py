"""Qwen3 dense: Llama's block plus an RMSNorm over each head of q and k."""

from ingot.models.base import LayerSpec, ModelSpec, common_dims, rope_from_config


def spec(cfg: dict, max_context: int | None = None) -> ModelSpec:
    dims = common_dims(cfg, max_context)
    rope = rope_from_config(cfg, dims["head_dim"], default_theta=1000000.0)
    return ModelSpec(
        arch="qwen3",
        layers=[LayerSpec(rope) for _ in range(cfg["num_hidden_layers"])],
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        qk_norm=True,
        **dims,
    )
