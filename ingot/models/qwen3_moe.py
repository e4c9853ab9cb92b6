"""Qwen3-MoE: Qwen3's attention; the MLP is a router over many small experts, top-k of them per token."""

from ingot.models.base import LayerSpec, ModelSpec, MoESpec, common_dims, rope_from_config


def spec(cfg: dict, max_context: int | None = None) -> ModelSpec:
    dims = common_dims(cfg, max_context)
    rope = rope_from_config(cfg, dims["head_dim"], default_theta=1000000.0)
    moe = MoESpec(
        n_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=cfg.get("norm_topk_prob", True),
    )
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step", 1) or 1

    def is_moe(i: int) -> bool:
        return i not in dense_layers and (i + 1) % step == 0

    return ModelSpec(
        arch="qwen3moe",
        layers=[LayerSpec(rope, moe=moe if is_moe(i) else None) for i in range(cfg["num_hidden_layers"])],
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        qk_norm=True,
        **dims,
    )
