"""Gemma 4 text, as transformers' Gemma4TextConfig / modeling_gemma4 define it.

Gemma 3's block (q/k norms, sandwich norms, GELU-tanh MLP, sqrt(hidden) embeddings, sliding layers between
global ones) with: plain norm multipliers (not 1 + w); an unweighted norm over v; softmax scale 1; global layers
with their own (larger) head_dim, proportional rope over part of it, and, where attention_k_eq_v is set, values
taken from the key projection with num_global_key_value_heads heads; the last num_kv_shared_layers layers reading
the keys and values of the last earlier layer of their type (and, with use_double_wide_mlp, twice as wide an
MLP); per-layer input embeddings; a stored scalar on each layer's output; an optional MoE block beside the dense
MLP on every layer; final logit softcapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ingot.errors import UnsupportedError
from ingot.models.base import LayerSpec, ModelSpec, MoESpec, common_dims, rope_from_config

# Gemma4TextConfig's defaults, for keys a config.json leaves out.
DEFAULTS = dict(
    vocab_size=262144,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=30,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    global_head_dim=512,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    sliding_window=512,
    vocab_size_per_layer_input=262144,
    hidden_size_per_layer_input=256,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class Gemma4Config:
    """The fields of a Gemma 4 text config that shape the model, validated."""

    layer_types: list[str]
    head_dims: list[int]
    kv_heads: list[int]
    kv_sources: list[int | None]
    k_eq_v: bool
    double_wide_mlp: bool
    sliding_window: int
    per_layer_dim: int
    per_layer_vocab: int
    final_softcap: float
    moe: MoESpec | None

    @classmethod
    def from_dict(cls, cfg: dict) -> Gemma4Config:
        n = cfg["num_hidden_layers"]
        types = list(cfg.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                for i in range(n)])
        if len(types) != n or set(types) - set(_LAYER_TYPES):
            raise UnsupportedError(f"gemma4: layer_types must be {n} of {_LAYER_TYPES}, got {types}")
        types[-1] = "full_attention"  # as Gemma4TextConfig forces it
        if cfg.get("use_bidirectional_attention") == "all":
            raise UnsupportedError("gemma4: use_bidirectional_attention 'all' is not supported (causal text is)")
        if cfg.get("attention_bias"):
            raise UnsupportedError("gemma4: attention_bias is not supported")
        act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedError(f"gemma4: hidden_activation '{act}' is not supported (gelu_pytorch_tanh is)")
        k_eq_v = bool(cfg.get("attention_k_eq_v"))
        head_dims, kv_heads = _attention_dims(cfg, types, k_eq_v)
        return cls(
            layer_types=types,
            head_dims=head_dims,
            kv_heads=kv_heads,
            kv_sources=_kv_sources(types, cfg.get("num_kv_shared_layers") or 0),
            k_eq_v=k_eq_v,
            double_wide_mlp=bool(cfg.get("use_double_wide_mlp")),
            sliding_window=cfg["sliding_window"],
            per_layer_dim=cfg.get("hidden_size_per_layer_input") or 0,
            per_layer_vocab=cfg.get("vocab_size_per_layer_input") or cfg["vocab_size"],
            final_softcap=cfg.get("final_logit_softcapping") or 0.0,
            moe=_moe(cfg),
        )


def _attention_dims(cfg: dict, types: list[str], k_eq_v: bool) -> tuple[list[int], list[int]]:
    """Each layer's head_dim and kv heads. transformers >= 5.1x writes them as per_layer_config overrides;
    Google's checkpoints (and earlier transformers) as global_head_dim / num_global_key_value_heads."""
    head_dim, kv = cfg["head_dim"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_layer = cfg.get("per_layer_config")
    if per_layer is not None:
        # keyed by layer index (zero-padded to the widest index in config.json: "04") or by layer type
        by_index = {int(k): v for k, v in per_layer.items() if str(k).isdigit()}
        stray = [k for k in per_layer if not str(k).isdigit() and k not in _LAYER_TYPES]
        if stray:
            raise UnsupportedError(f"gemma4: per_layer_config keys {stray} are neither layer indices nor types")
        dims, heads = [], []
        for i, t in enumerate(types):
            o = by_index.get(i) or per_layer.get(t) or {}
            unknown = set(o) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise UnsupportedError(f"gemma4: per_layer_config[{i}] overrides {sorted(unknown)}, not supported")
            dims.append(o.get("head_dim", head_dim))
            heads.append(o.get("num_key_value_heads", kv))
        return dims, heads
    global_kv = (cfg.get("num_global_key_value_heads") if k_eq_v else None) or kv
    full = [t == "full_attention" for t in types]
    return ([cfg["global_head_dim"] if f else head_dim for f in full], [global_kv if f else kv for f in full])


def _kv_sources(types: list[str], n_shared: int) -> list[int | None]:
    """The last num_kv_shared_layers layers read the keys and values of the last earlier layer of their type."""
    n = len(types)
    if not 0 <= n_shared < n:
        raise UnsupportedError(f"gemma4: num_kv_shared_layers {n_shared} must be below num_hidden_layers {n}")
    first = n - n_shared
    last_of_type = {t: i for i, t in enumerate(types[:first])}
    sources: list[int | None] = []
    for i, t in enumerate(types):
        if i < first:
            sources.append(None)
        elif t not in last_of_type:
            raise UnsupportedError(
                f"gemma4: layer {i} ({t}) shares keys and values (num_kv_shared_layers {n_shared}), "
                f"but no earlier layer of that type computes them"
            )
        else:
            sources.append(last_of_type[t])
    return sources


def _moe(cfg: dict) -> MoESpec | None:
    if not cfg.get("enable_moe_block"):
        return None
    for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if not cfg.get(key):
            raise UnsupportedError(f"gemma4: enable_moe_block is set but '{key}' is missing")
    return MoESpec(
        n_experts=cfg["num_experts"],
        top_k=cfg["top_k_experts"],
        intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=True,
        parallel_dense=True,
        router_scales=True,
    )


def spec(cfg: dict, max_context: int | None = None) -> ModelSpec:
    cfg = {**DEFAULTS, **cfg.get("text_config", cfg)}  # Gemma4ForConditionalGeneration nests the text model
    g = Gemma4Config.from_dict(cfg)
    dims = common_dims(cfg, max_context)
    ropes = {}  # one RopeSpec per (type, head_dim), so backends compute each frequency table once
    layers = []
    for i, t in enumerate(g.layer_types):
        hd, kv, src = g.head_dims[i], g.kv_heads[i], g.kv_sources[i]
        rope = ropes.setdefault((t, hd), rope_from_config(cfg, hd, t))
        layers.append(LayerSpec(
            rope,
            sliding_window=g.sliding_window if t == "sliding_attention" else None,
            moe=g.moe,
            head_dim=hd if hd != dims["head_dim"] else None,
            n_kv_heads=kv if kv != dims["n_kv_heads"] else None,
            intermediate_size=2 * dims["intermediate_size"] if g.double_wide_mlp and src is not None else None,
            kv_source=src,
            k_eq_v=g.k_eq_v and t == "full_attention",
        ))
    return ModelSpec(
        arch="gemma4",
        layers=layers,
        tie_embeddings=cfg["tie_word_embeddings"],
        qk_norm=True,
        sandwich_norm=True,
        activation="gelu_tanh",
        embed_scale=math.sqrt(dims["hidden_size"]),
        attn_scale=1.0,  # q and k are RMS-normed per head
        v_norm=True,
        final_softcap=g.final_softcap,
        per_layer_dim=g.per_layer_dim,
        per_layer_vocab=g.per_layer_vocab,
        layer_scale=True,
        **dims,
    )
