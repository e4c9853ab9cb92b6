"""The reference backend: every block composed from plain torch ops. It runs anywhere (fp32 on the CPU,
fp16/bf16 on a GPU) and is the oracle every fused kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ingot.engine.kv_cache import KVCache
from ingot.models.base import ModelSpec


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


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
        return KVCache(s.n_layers, s.n_kv_heads, s.head_dim, max_context, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Run tokens at positions cache.length.. through the model, append their keys and values to the
        cache, and return float32 logits (T, vocab), or (1, vocab) for the last token with last_only."""
        s = self.spec
        start, T = cache.length, tokens.shape[0]
        if start + T > cache.max_context:
            raise ValueError(f"{start + T} positions exceed the cache's {cache.max_context}")
        x = F.embedding(tokens.to(self.device), self.w["token_embd.weight"])
        if s.embed_scale != 1.0:
            x = x * torch.tensor(s.embed_scale, dtype=x.dtype)
        pos = torch.arange(start, start + T, device=self.device)
        for i, (layer, lw) in enumerate(zip(s.layers, self.layers)):
            freqs = pos.float()[:, None] * self.inv_freq[i][None]
            emb = torch.cat((freqs, freqs), dim=-1)
            h = rms_norm(x, lw["attn_norm"], s.norm_eps)
            h = self._attention(i, layer, lw, h, pos, emb.cos(), emb.sin(), cache)
            if s.sandwich_norm:
                h = rms_norm(h, lw["post_attention_norm"], s.norm_eps)
            x = x + h
            h = rms_norm(x, lw["ffn_norm"], s.norm_eps)
            h = self._moe(layer.moe, lw, h) if layer.moe else self._mlp(lw, h)
            if s.sandwich_norm:
                h = rms_norm(h, lw["post_ffw_norm"], s.norm_eps)
            x = x + h
        cache.length = start + T
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.w["output_norm.weight"], s.norm_eps)
        return (x @ self.lm_head.T).float()

    def _attention(self, i, layer, lw, h, pos, cos, sin, cache: KVCache):
        s = self.spec
        T, hd = h.shape[0], s.head_dim
        q = (h @ lw["attn_q"].T).view(T, s.n_heads, hd)
        k = (h @ lw["attn_k"].T).view(T, s.n_kv_heads, hd)
        v = (h @ lw["attn_v"].T).view(T, s.n_kv_heads, hd)
        if s.qk_norm:
            q = rms_norm(q, lw["attn_q_norm"], s.norm_eps)
            k = rms_norm(k, lw["attn_k_norm"], s.norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start, end = int(pos[0]), int(pos[-1]) + 1
        cache.k[i][start:end] = k
        cache.v[i][start:end] = v
        keys = cache.k[i][:end].repeat_interleave(s.n_heads // s.n_kv_heads, dim=1)
        vals = cache.v[i][:end].repeat_interleave(s.n_heads // s.n_kv_heads, dim=1)
        scores = torch.einsum("thd,shd->hts", q.float(), keys.float()) * s.softmax_scale
        kpos = torch.arange(end, device=h.device)
        allowed = kpos[None, :] <= pos[:, None]
        if layer.sliding_window:
            allowed &= pos[:, None] - kpos[None, :] < layer.sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), vals.float()).to(h.dtype)
        return out.reshape(T, s.n_heads * hd) @ lw["attn_output"].T

    def _mlp(self, lw, h):
        return (activation(self.spec.activation, h @ lw["ffn_gate"].T) * (h @ lw["ffn_up"].T)) @ lw["ffn_down"].T

    def _moe(self, moe, lw, h):
        probs = (h @ lw["ffn_gate_inp"].T).float().softmax(-1)
        weights, experts = probs.topk(moe.top_k, dim=-1)
        if moe.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(h.dtype)
        out = torch.zeros_like(h)
        for e in experts.unique().tolist():
            rows, slot = (experts == e).nonzero(as_tuple=True)
            x = h[rows]
            y = activation(self.spec.activation, x @ lw["ffn_gate_exps"][e].T) * (x @ lw["ffn_up_exps"][e].T)
            out.index_add_(0, rows, (y @ lw["ffn_down_exps"][e].T) * weights[rows, slot, None])
        return out


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
