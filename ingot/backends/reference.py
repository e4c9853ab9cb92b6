"""The reference backend: every block composed from plain torch ops. It runs anywhere (fp32 on the CPU,
fp16/bf16 on a GPU) and is the oracle every fused kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ingot.engine.kv_cache import KVCache, PagedKVCache
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


def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor, scale: float,
           window: int = 0) -> torch.Tensor:
    """Causal attention of queries q (T, Hq, D) at positions pos over keys and values (S, Hkv, D) of
    positions 0..S-1, GQA by repetition; with a window, key p is seen from query t only if t - p < window."""
    group = q.shape[1] // keys.shape[1]
    keys, vals = keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), keys.float()) * scale
    kpos = torch.arange(keys.shape[0], device=q.device)
    allowed = kpos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[:, None] - kpos[None, :] < window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), vals.float()).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int = 0) -> torch.Tensor:
    """One new query per sequence, q (B, Hq, D), at position seq_lens[b] - 1, over the keys and values the
    block tables (B, max_blocks) point to in caches (n_blocks, block_size, Hkv, D): the oracle of the
    paged decode kernel."""
    bs = k_cache.shape[1]
    out = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        p = torch.arange(n, device=q.device)
        blocks = block_tables[b].long()[p // bs]
        out.append(attend(q[b:b + 1], k_cache[blocks, p % bs], v_cache[blocks, p % bs], p[-1:], scale, window))
    return torch.cat(out)


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
        return KVCache(self.spec.kv_cache_shapes(), max_context, self.device, self.dtype)

    def new_paged_cache(self, n_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.spec.kv_cache_shapes(), n_blocks, block_size, self.device, self.dtype)

    def paged_block_bytes(self, block_size: int) -> int:
        return PagedKVCache.block_bytes(self.spec.kv_cache_shapes(), block_size, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Run tokens at positions cache.length.. through the model, append their keys and values to the
        cache, and return float32 logits (T, vocab), or (1, vocab) for the last token with last_only."""
        start, T = cache.length, tokens.shape[0]
        if start + T > cache.max_context:
            raise ValueError(f"{start + T} positions exceed the cache's {cache.max_context}")
        end = start + T
        pos = torch.arange(start, end, device=self.device)

        def store_and_attend(i, src, q, k, v, scale, window):
            if k is not None:
                cache.k[i][start:end] = k
                cache.v[i][start:end] = v
            return attend(q, cache.k[src][:end], cache.v[src][:end], pos, scale, window)

        x = self._layers(tokens, pos, store_and_attend)
        cache.length = end
        return self._logits(x[-1:] if last_only else x)

    @torch.inference_mode()
    def forward_paged(self, seqs: list[tuple[list[int], int, list[int]]], cache: PagedKVCache) -> torch.Tensor:
        """One step of several sequences, each (new token ids, start position, block table): their tokens
        run through the weights together, each attends to its own blocks. Returns float32 logits
        (len(seqs), vocab) of each sequence's last new token."""
        bs = cache.block_size
        spans, ids, pos, slots = [], [], [], []
        for tokens, start, table in seqs:
            end = start + len(tokens)
            if not tokens or end > len(table) * bs:
                raise ValueError(f"positions {start}..{end} need {-(-end // bs)} blocks, the table has {len(table)}")
            p = torch.arange(end, device=self.device)
            t = torch.tensor(table, dtype=torch.long, device=self.device)
            # every position of the sequence so far, as a row of the flattened cache
            rows = t[p // bs] * bs + p % bs
            spans.append((len(ids), len(ids) + len(tokens), rows))
            ids.extend(tokens)
            pos.append(p[start:])
            slots.append(rows[start:])
        pos, slots = torch.cat(pos), torch.cat(slots)

        def store_and_attend(i, src, q, k, v, scale, window):
            if k is not None:
                cache.k[i].flatten(0, 1)[slots] = k
                cache.v[i].flatten(0, 1)[slots] = v
            kc, vc = cache.k[src].flatten(0, 1), cache.v[src].flatten(0, 1)
            return torch.cat([attend(q[a:b], kc[rows], vc[rows], pos[a:b], scale, window) for a, b, rows in spans])

        x = self._layers(torch.tensor(ids, dtype=torch.long), pos, store_and_attend)
        return self._logits(x[[b - 1 for _, b, _ in spans]])

    def _layers(self, tokens: torch.Tensor, pos: torch.Tensor, store_and_attend) -> torch.Tensor:
        """The hidden states after every layer for tokens at positions pos. store_and_attend(i, src, q, k, v,
        scale, window) stores layer i's new keys and values (unless k is None: a layer that reads another's)
        and returns the attention output (T, heads, head_dim) of q over layer src's cache."""
        s = self.spec
        tokens = tokens.to(self.device)
        x = _scaled_embedding(tokens, self.w["token_embd.weight"], s.embed_scale)
        per_layer = self._per_layer_inputs(tokens, x) if s.per_layer_dim else None
        for i, (layer, lw) in enumerate(zip(s.layers, self.layers)):
            freqs = pos.float()[:, None] * self.inv_freq[i][None]
            emb = torch.cat((freqs, freqs), dim=-1)
            h = rms_norm(x, lw["attn_norm"], s.norm_eps)
            h = self._attention(i, layer, lw, h, emb.cos(), emb.sin(), store_and_attend)
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
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
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

    def _attention(self, i, layer, lw, h, cos, sin, store_and_attend):
        s = self.spec
        T, (hd, n_kv) = h.shape[0], s.attn_dims(i)
        q = (h @ lw["attn_q"].T).view(T, s.n_heads, hd)
        if s.qk_norm:
            q = rms_norm(q, lw["attn_q_norm"], s.norm_eps)
        q = apply_rope(q, cos, sin)
        k = v = None
        if layer.kv_source is None:
            k = (h @ lw["attn_k"].T).view(T, n_kv, hd)
            v = k if layer.k_eq_v else (h @ lw["attn_v"].T).view(T, n_kv, hd)
            if s.qk_norm:
                k = rms_norm(k, lw["attn_k_norm"], s.norm_eps)
            if s.v_norm:
                v = rms_norm(v, None, s.norm_eps)
            k = apply_rope(k, cos, sin)
        src = i if layer.kv_source is None else layer.kv_source
        out = store_and_attend(i, src, q, k, v, s.layer_softmax_scale(i), layer.sliding_window or 0)
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

    def _router_probs(self, moe, lw, r):
        """Each row's softmax over the experts (fp32 [T, E]), before the top-k."""
        if moe.router_scales:
            r = rms_norm(r, None, self.spec.norm_eps) * lw["ffn_gate_inp_scale"] * self.spec.hidden_size**-0.5
        return (r @ lw["ffn_gate_inp"].T).float().softmax(-1)

    def _moe(self, moe, lw, h, router_input):
        weights, experts = self._router_probs(moe, lw, router_input).topk(moe.top_k, dim=-1)
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
