"""The reference backend: every block composed from plain torch ops. It runs anywhere (fp32 on the CPU,
fp16/bf16 on a GPU) and is the oracle every fused kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ingot.engine.kv_cache import KVCache
from ingot.models.base import ModelSpec


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w None: normalise only (Gemma 4's v norm and router norm have no weight)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y if w is None else y * w.float()).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation (HF's rotate_half): x is (T, heads, head_dim), cos/sin (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


def activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if kind == "silu" else F.gelu(x, approximate="tanh")


class ReferenceBackend:
    name = "reference"

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device, dtype,
                 freq_factors: torch.Tensor | None = None):
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.w = weights
        self.layers = [
            {k.split(".", 2)[2].rsplit(".", 1)[0]: weights[k] for k in spec.layer_weights(i)}
            for i in range(spec.n_layers)
        ]
        self.lm_head = weights["token_embd.weight"] if spec.tie_embeddings else weights["output.weight"]
        freqs = {}
        self.inv_freq = [
            freqs.setdefault(id(l.rope), l.rope.inv_freq(freq_factors).to(self.device)) for l in spec.layers
        ]

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    def new_cache(self, max_context: int) -> KVCache:
        s = self.spec
        dims = [s.attn_dims(i) for i in range(s.n_layers)]
        shapes = [(kv, hd) if layer.kv_source is None else None for layer, (hd, kv) in zip(s.layers, dims)]
        return KVCache(shapes, max_context, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Run tokens at positions cache.length.. through the model, append their keys and values to the
        cache, and return float32 logits (T, vocab), or (1, vocab) for the last token with last_only."""
        s = self.spec
        start, T = cache.length, tokens.shape[0]
        if start + T > cache.max_context:
            raise ValueError(f"{start + T} positions exceed the cache's {cache.max_context}")
        tokens = tokens.to(self.device)
        x = _scaled_embedding(tokens, self.w["token_embd.weight"], s.embed_scale)
        per_layer = self._per_layer_inputs(tokens, x) if s.per_layer_dim else None
        pos = torch.arange(start, start + T, device=self.device)
        for i, (layer, lw) in enumerate(zip(s.layers, self.layers)):
            freqs = pos.float()[:, None] * self.inv_freq[i][None]
            emb = torch.cat((freqs, freqs), dim=-1)
            h = rms_norm(x, lw["attn_norm"], s.norm_eps)
            h = self._attention(i, layer, lw, h, pos, emb.cos(), emb.sin(), cache)
            if s.sandwich_norm:
                h = rms_norm(h, lw["post_attention_norm"], s.norm_eps)
            x = x + h
            h = self._ffn(layer.moe, lw, x)
            if s.sandwich_norm:
                h = rms_norm(h, lw["post_ffw_norm"], s.norm_eps)
            x = x + h
            if per_layer is not None:
                g = activation(s.activation, x @ lw["inp_gate"].T) * per_layer[:, i]
                x = x + rms_norm(g @ lw["proj"].T, lw["post_norm"], s.norm_eps)
            if s.layer_scale:
                x = x * lw["layer_output_scale"]
        cache.length = start + T
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.w["output_norm.weight"], s.norm_eps)
        logits = (x @ self.lm_head.T).float()
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits

    def _per_layer_inputs(self, tokens, x):
        """(T, n_layers, per_layer_dim): each layer's token embedding plus a normed projection of x, over sqrt 2."""
        s = self.spec
        shape = (tokens.shape[0], s.n_layers, s.per_layer_dim)
        own = _scaled_embedding(tokens, self.w["per_layer_token_embd.weight"], s.per_layer_dim**0.5).view(shape)
        proj = (x @ self.w["per_layer_model_proj.weight"].T) * s.hidden_size**-0.5
        proj = rms_norm(proj.view(shape), self.w["per_layer_proj_norm.weight"], s.norm_eps)
        return (proj + own) * 2**-0.5

    def _attention(self, i, layer, lw, h, pos, cos, sin, cache: KVCache):
        s = self.spec
        T, (hd, n_kv) = h.shape[0], s.attn_dims(i)
        q = (h @ lw["attn_q"].T).view(T, s.n_heads, hd)
        if s.qk_norm:
            q = rms_norm(q, lw["attn_q_norm"], s.norm_eps)
        q = apply_rope(q, cos, sin)
        start, end = int(pos[0]), int(pos[-1]) + 1
        if layer.kv_source is None:
            k = (h @ lw["attn_k"].T).view(T, n_kv, hd)
            v = k if layer.k_eq_v else (h @ lw["attn_v"].T).view(T, n_kv, hd)
            if s.qk_norm:
                k = rms_norm(k, lw["attn_k_norm"], s.norm_eps)
            if s.v_norm:
                v = rms_norm(v, None, s.norm_eps)
            cache.k[i][start:end] = apply_rope(k, cos, sin)
            cache.v[i][start:end] = v
        src = i if layer.kv_source is None else layer.kv_source
        keys = cache.k[src][:end].repeat_interleave(s.n_heads // n_kv, dim=1)
        vals = cache.v[src][:end].repeat_interleave(s.n_heads // n_kv, dim=1)
        scores = torch.einsum("thd,shd->hts", q.float(), keys.float()) * s.layer_softmax_scale(i)
        kpos = torch.arange(end, device=h.device)
        allowed = kpos[None, :] <= pos[:, None]
        if layer.sliding_window:
            allowed &= pos[:, None] - kpos[None, :] < layer.sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), vals.float()).to(h.dtype)
        return out.reshape(T, s.n_heads * hd) @ lw["attn_output"].T

    def _ffn(self, moe, lw, x):
        """The MLP (or experts, or both side by side) on the residual stream x, before its post-norm."""
        eps = self.spec.norm_eps
        h = rms_norm(x, lw["ffn_norm"], eps)
        if moe is None:
            return self._mlp(lw, h)
        if not moe.parallel_dense:
            return self._moe(moe, lw, h, router_input=h)
        dense = rms_norm(self._mlp(lw, h), lw["post_ffw_norm_1"], eps)
        experts = self._moe(moe, lw, rms_norm(x, lw["pre_ffw_norm_2"], eps), router_input=x)
        return dense + rms_norm(experts, lw["post_ffw_norm_2"], eps)

    def _mlp(self, lw, h):
        return (activation(self.spec.activation, h @ lw["ffn_gate"].T) * (h @ lw["ffn_up"].T)) @ lw["ffn_down"].T

    def _moe(self, moe, lw, h, router_input):
        r = router_input
        if moe.router_scales:
            r = rms_norm(r, None, self.spec.norm_eps) * lw["ffn_gate_inp_scale"] * self.spec.hidden_size**-0.5
        probs = (r @ lw["ffn_gate_inp"].T).float().softmax(-1)
        weights, experts = probs.topk(moe.top_k, dim=-1)
        if moe.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if moe.router_scales:
            weights = weights * lw["ffn_exp_scale"].float()[experts]
        weights = weights.to(h.dtype)
        out = torch.zeros_like(h)
        for e in experts.unique().tolist():
            rows, slot = (experts == e).nonzero(as_tuple=True)
            x = h[rows]
            y = activation(self.spec.activation, x @ lw["ffn_gate_exps"][e].T) * (x @ lw["ffn_up_exps"][e].T)
            out.index_add_(0, rows, (y @ lw["ffn_down_exps"][e].T) * weights[rows, slot, None])
        return out


def _scaled_embedding(tokens: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    x = F.embedding(tokens, table)
    return x if scale == 1.0 else x * torch.tensor(scale, dtype=x.dtype)


def load_weights(ckpt, spec: ModelSpec, device, dtype, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Dequantize every tensor the spec names into dtype on device, with a progress bar for big files."""
    from ingot.progress import byte_bar

    names = list(spec.weights())
    weights = {}
    with byte_bar(sum(ckpt.tensors[n].nbytes for n in names), "loading", progress) as bar:
        for n in names:
            ref = ckpt.tensors[n]
            weights[n] = ref.dequantize().to(device=device, dtype=dtype)
            bar.update(ref.nbytes)
    return weights
