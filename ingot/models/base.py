"""ModelSpec: what a backend needs to know about a model, independent of where its weights came from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ingot.errors import FormatError, UnsupportedError


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    dim: int  # the head dimension the frequencies are spread over
    scaling: dict | None = None  # Hugging Face rope_scaling / rope_parameters: linear, llama3 or proportional

    def inv_freq(self, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 inverse frequencies, computed in the same order of operations as transformers."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).to(torch.float32) / self.dim
        inv = 1.0 / (self.theta**exponents)
        if freq_factors is not None:  # GGUF stores llama3 scaling as precomputed per-frequency divisors
            return inv / freq_factors.to(torch.float32)
        kind = (self.scaling or {}).get("rope_type", (self.scaling or {}).get("type", "default"))
        if kind in (None, "default"):
            return inv
        if kind == "linear":
            return inv / self.scaling["factor"]
        if kind == "llama3":
            return _llama3_scaling(inv, self.scaling)
        if kind == "proportional":
            # Gemma 4's global layers: only the first partial_rotary_factor of the frequency pairs rotate (their
            # exponents still over the whole head); the rest get frequency 0, an identity rotation.
            rotated = int(self.scaling.get("partial_rotary_factor", 1.0) * self.dim // 2)
            inv[rotated:] = 0.0
            return inv / self.scaling.get("factor", 1.0)
        raise UnsupportedError(
            f"rope scaling type '{kind}' is not supported (default, linear, llama3, proportional are)"
        )


def _llama3_scaling(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class MoESpec:
    n_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    # Gemma 4: the dense MLP runs beside the experts (the experts get their own pre-norm, each output its own
    # post-norm, and the two are summed), and the router sees the block's input, not the pre-MLP norm's output.
    parallel_dense: bool = False
    # Gemma 4: the router's input is RMS-normed without weight and scaled by a learned vector and 1/sqrt(hidden);
    # the top-k weights are then multiplied by a learned per-expert scale.
    router_scales: bool = False


@dataclass(frozen=True)
class LayerSpec:
    rope: RopeSpec
    sliding_window: int | None = None  # keys older than this many positions are masked
    moe: MoESpec | None = None
    # Where a layer differs from the model-wide value (Gemma 4's global layers, its double-wide MLPs):
    head_dim: int | None = None
    n_kv_heads: int | None = None
    intermediate_size: int | None = None
    kv_source: int | None = None  # attends to this earlier layer's keys and values, and has none of its own
    k_eq_v: bool = False  # no v projection: the values are the key projection before its norm and rotation


@dataclass
class ModelSpec:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    max_context: int
    layers: list[LayerSpec]
    tie_embeddings: bool
    qk_norm: bool = False  # RMSNorm over each head of q and k (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # Gemma's extra norms after attention and around the MLP
    activation: str = "silu"  # "silu" | "gelu_tanh"
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)
    v_norm: bool = False  # RMSNorm without weight over each head of v (Gemma 4)
    final_softcap: float = 0.0  # logits become cap * tanh(logits / cap) where nonzero
    # Per-layer input embeddings (Gemma 4's PLE): a second token embedding, per_layer_dim wide for every layer,
    # mixed with a projection of the main embedding and fed through a gated residual after each layer's MLP.
    per_layer_dim: int = 0
    per_layer_vocab: int = 0
    layer_scale: bool = False  # each layer's output is multiplied by a stored scalar (Gemma 4)
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def attn_dims(self, i: int) -> tuple[int, int]:
        """Layer i's (head_dim, n_kv_heads)."""
        layer = self.layers[i]
        return layer.head_dim or self.head_dim, layer.n_kv_heads or self.n_kv_heads

    def kv_cache_shapes(self) -> list[tuple[int, int] | None]:
        """Each layer's (n_kv_heads, head_dim) in a KV cache, None for a layer that reads another's keys."""
        return [None if l.kv_source is not None else self.attn_dims(i)[::-1] for i, l in enumerate(self.layers)]

    def layer_softmax_scale(self, i: int) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.attn_dims(i)[0])

    def beyond_uniform(self) -> list[str]:
        """The features this spec uses beyond one block shape repeated (what a fused backend must also cover)."""
        layers = self.layers
        checks = {
            "per-layer head_dim / kv heads": any(l.head_dim or l.n_kv_heads for l in layers),
            "per-layer MLP width": any(l.intermediate_size for l in layers),
            "KV sharing between layers": any(l.kv_source is not None for l in layers),
            "values equal to keys (k_eq_v)": any(l.k_eq_v for l in layers),
            "proportional (partial) rope": any(
                (l.rope.scaling or {}).get("rope_type") == "proportional" for l in layers
            ),
            "v norm": self.v_norm,
            "final logit softcapping": bool(self.final_softcap),
            "per-layer input embeddings": bool(self.per_layer_dim),
            "layer output scale": self.layer_scale,
            "dense MLP beside the experts": any(l.moe and l.moe.parallel_dense for l in layers),
            "router input and per-expert scales": any(l.moe and l.moe.router_scales for l in layers),
        }
        return [name for name, used in checks.items() if used]

    def layer_weights(self, i: int) -> dict[str, tuple[int, ...]]:
        """Canonical names and shapes of layer i's tensors."""
        layer, h, p = self.layers[i], self.hidden_size, f"blk.{i}."
        hd, kv = self.attn_dims(i)
        w = {
            p + "attn_norm.weight": (h,),
            p + "attn_q.weight": (self.n_heads * hd, h),
            p + "attn_output.weight": (h, self.n_heads * hd),
            p + "ffn_norm.weight": (h,),
        }
        if layer.kv_source is None:
            w[p + "attn_k.weight"] = (kv * hd, h)
            if not layer.k_eq_v:
                w[p + "attn_v.weight"] = (kv * hd, h)
        if self.qk_norm:
            w[p + "attn_q_norm.weight"] = (hd,)
            if layer.kv_source is None:
                w[p + "attn_k_norm.weight"] = (hd,)
        if self.sandwich_norm:
            w[p + "post_attention_norm.weight"] = (h,)
            w[p + "post_ffw_norm.weight"] = (h,)
        moe = layer.moe
        if moe is None or moe.parallel_dense:
            f = layer.intermediate_size or self.intermediate_size
            w[p + "ffn_gate.weight"] = (f, h)
            w[p + "ffn_up.weight"] = (f, h)
            w[p + "ffn_down.weight"] = (h, f)
        if moe:
            e, f = moe.n_experts, moe.intermediate_size
            w[p + "ffn_gate_inp.weight"] = (e, h)
            w[p + "ffn_gate_exps.weight"] = (e, f, h)
            w[p + "ffn_up_exps.weight"] = (e, f, h)
            w[p + "ffn_down_exps.weight"] = (e, h, f)
            if moe.parallel_dense:
                for n in ("post_ffw_norm_1", "pre_ffw_norm_2", "post_ffw_norm_2"):
                    w[p + n + ".weight"] = (h,)
            if moe.router_scales:
                w[p + "ffn_gate_inp_scale.weight"] = (h,)
                w[p + "ffn_exp_scale.weight"] = (e,)
        if self.per_layer_dim:
            w[p + "inp_gate.weight"] = (self.per_layer_dim, h)
            w[p + "proj.weight"] = (h, self.per_layer_dim)
            w[p + "post_norm.weight"] = (h,)
        if self.layer_scale:
            w[p + "layer_output_scale.weight"] = (1,)
        return w

    def weights(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs, with its shape."""
        w = {"token_embd.weight": (self.vocab_size, self.hidden_size), "output_norm.weight": (self.hidden_size,)}
        if not self.tie_embeddings:
            w["output.weight"] = (self.vocab_size, self.hidden_size)
        if self.per_layer_dim:
            packed = self.n_layers * self.per_layer_dim
            w["per_layer_token_embd.weight"] = (self.per_layer_vocab, packed)
            w["per_layer_model_proj.weight"] = (packed, self.hidden_size)
            w["per_layer_proj_norm.weight"] = (self.per_layer_dim,)
        for i in range(self.n_layers):
            w.update(self.layer_weights(i))
        return w

    def check_tensors(self, tensors: dict, source: str) -> None:
        """Fail with the name of the first missing or misshapen tensor, before any weight is read."""
        for name, shape in self.weights().items():
            if name not in tensors:
                raise FormatError(f"{source}: tensor '{name}' is missing")
            if tuple(tensors[name].shape) != shape:
                raise FormatError(
                    f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the config implies {shape}"
                )


def rope_from_config(cfg: dict, head_dim: int, layer_type: str | None = None, default_theta=10000.0) -> RopeSpec:
    """RoPE settings from either config style: transformers 5's rope_parameters (per layer type where the
    family has several) or the older rope_theta / rope_scaling / rope_local_base_freq keys."""
    params = cfg.get("rope_parameters")
    if params is not None:
        params = params.get(layer_type, params) if layer_type else params
        kind = params.get("rope_type", "default")
        return RopeSpec(params.get("rope_theta") or default_theta, head_dim, None if kind == "default" else dict(params))
    if layer_type == "sliding_attention":
        return RopeSpec(cfg.get("rope_local_base_freq", 10000.0), head_dim, None)
    return RopeSpec(cfg.get("rope_theta", default_theta), head_dim, cfg.get("rope_scaling"))


def common_dims(cfg: dict, max_context: int | None) -> dict:
    """The fields every family reads the same way from a Hugging Face config."""
    n_heads = cfg["num_attention_heads"]
    ctx = cfg.get("max_position_embeddings", 4096)
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_context=min(max_context, ctx) if max_context else ctx,
    )
