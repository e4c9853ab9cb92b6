"""Llama 3.x (and SmolLM2, which is the same architecture): RoPE with llama3 scaling, optional tied embeddings."""

from ingot.models.base import LayerSpec, ModelSpec, common_dims, rope_from_config


def spec(cfg: dict, max_context: int | None = None) -> ModelSpec:
    dims = common_dims(cfg, max_context)
    rope = rope_from_config(cfg, dims["head_dim"], default_theta=10000.0)
    return ModelSpec(
        arch="llama",
        layers=[LayerSpec(rope) for _ in range(cfg["num_hidden_layers"])],
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        **dims,
    )
