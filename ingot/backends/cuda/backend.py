"""The CUDA backend: the model's blocks composed from Ingot's Triton kernels, the decode step captured
once as a CUDA graph and replayed, every buffer allocated once up front."""

from __future__ import annotations

import torch

from ingot.backends.cuda import attention, gemm, gemv, norm, prefill, rope, sampling
from ingot.backends.cuda.weights import ModelWeights
from ingot.models.base import ModelSpec

DECODE_ROWS = 16  # up to this many rows use the GEMV kernels; more go to the tensor-core GEMM


class CudaKVCache:
    """fp16 keys and values, [max_batch, max_ctx, kv_heads, head_dim] per layer, sized once."""

    def __init__(self, spec: ModelSpec, max_context: int, device, max_batch: int = 1):
        shape = (max_batch, max_context, spec.n_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=torch.float16) for _ in range(spec.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=torch.float16) for _ in range(spec.n_layers)]
        self.max_context = max_context
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class DecodeState:
    """The static buffers one decode step reads and writes; a captured graph refers to exactly these."""

    def __init__(self, spec: ModelSpec, weights: ModelWeights, max_context: int, device):
        f32, i32 = dict(device=device, dtype=torch.float32), dict(device=device, dtype=torch.int32)
        hd, hq, hkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        self.step_in = torch.zeros(3, **i32)  # token id, position, sequence length
        # Pinned staging for step_in, a ring so that an async copy never reads a slot being rewritten.
        pinned = device.type == "cuda"
        self.host_in = [torch.zeros(3, dtype=torch.int32, pin_memory=pinned) for _ in range(4)]
        self.copied = [None] * 4
        self.step = 0
        self.slots = torch.zeros(1, **i32)
        self.x = torch.zeros(1, spec.hidden_size, **f32)
        self.h = torch.zeros(1, spec.hidden_size, **f32)
        self.qkv = torch.zeros(1, (hq + 2 * hkv) * hd, **f32)
        self.q = torch.zeros(1, hq, hd, **f32)
        self.attn = torch.zeros(1, hq, hd, **f32)
        self.ff = torch.zeros(1, spec.intermediate_size, **f32)
        self.logits = torch.zeros(1, weights.lm_head.n, **f32)
        # Greedy decoding picks the next token inside the graph: one 8-byte copy to the host per step.
        self.next_ids = torch.zeros(1, device=device, dtype=torch.int64)
        self.argmax_ws = sampling.argmax_workspace(1, weights.lm_head.n, device)
        self.scratch = attention.decode_scratch(1, hq, hd, max_context, device)
        # One split-K workspace, big enough for the largest decode GEMV, so no call allocates.
        need = [gemv.workspace_numel(weights.lm_head, 1)]
        for lw in weights.layers:
            need += [gemv.workspace_numel(lw.qkv, 1), gemv.workspace_numel(lw.o, 1),
                     gemv.workspace_numel(lw.gate_up, 1, gated="silu"), gemv.workspace_numel(lw.down, 1)]
        self.workspace = torch.empty(max(max(need), 1), **f32)

    def set_inputs(self, token: int, position: int) -> None:
        i = self.step % len(self.host_in)
        self.step += 1
        if self.copied[i] is not None:
            self.copied[i].synchronize()
        host = self.host_in[i]
        host[0], host[1], host[2] = token, position, position + 1
        self.step_in.copy_(host, non_blocking=True)
        if host.is_pinned():
            self.copied[i] = torch.cuda.Event()
            self.copied[i].record()

    @property
    def token(self):
        return self.step_in[0:1]

    @property
    def positions(self):
        return self.step_in[1:2]

    @property
    def seq_lens(self):
        return self.step_in[2:3]


class CudaBackend:
    name = "cuda"

    def __init__(self, spec: ModelSpec, weights: ModelWeights, device, freq_factors=None):
        self.spec, self.w, self.device = spec, weights, torch.device(device)
        self.dtype = torch.float16
        self.inv_freq = [l.rope.inv_freq(freq_factors).to(self.device) for l in spec.layers]
        self.weight_bytes_per_token = weights.decode_bytes_per_token()
        self.weight_bytes = weights.arena_bytes
        self._state: DecodeState | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._prefill: prefill.PrefillBuffers | None = None
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # bucket rows: graph
        self.use_graph = self.device.type == "cuda"

    def new_cache(self, max_context: int) -> CudaKVCache:
        self._state, self._graph = None, None  # a new cache means new buffers for the graph to read
        cache = CudaKVCache(self.spec, max_context, self.device)
        self._state = DecodeState(self.spec, self.w, max_context, self.device)
        self._prefill_graphs = {}
        self._prefill = prefill.PrefillBuffers(self.spec, self.w, max_context, self.device)
        self._cache = cache
        return cache

    # -- the model -------------------------------------------------------------------------------------------
    def _layers(self, x, cache, positions, seq_lens, slots, rows: int, s):
        """Every transformer block on activation rows x (fp32 [rows, hidden]), updating x in place.
        Decode (s a DecodeState): seq_lens [B]. Prefill: seq_lens is the chunk's span (start, count), s its
        static buffers (a prefill view) or None to allocate temporaries."""
        spec = self.spec
        decode = isinstance(s, DecodeState)
        if rows <= DECODE_ROWS:
            def lin(*a, **kw):
                return gemv.linear(*a, workspace=s.workspace if s is not None else None, **kw)
        elif s is not None:
            def lin(*a, **kw):
                return gemm.matmul(*a, norm_out=s.norm_out, **kw)
        else:
            lin = gemm.matmul
        hd, hq, hkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        for i, (layer, lw) in enumerate(zip(spec.layers, self.w.layers)):
            qkv = lin(x, lw.qkv, norm_weight=lw.attn_norm, eps=spec.norm_eps, out=s.qkv if s is not None else None)
            q = s.q if s is not None else torch.empty(rows, hq, hd, device=x.device, dtype=torch.float32)
            rope.qk_norm_rope_store(
                qkv, n_heads=hq, n_kv_heads=hkv, head_dim=hd, q_norm=lw.q_norm, k_norm=lw.k_norm,
                eps=spec.norm_eps, inv_freq=self.inv_freq[i], positions=positions, slots=slots,
                k_cache=cache.k[i], v_cache=cache.v[i], q_out=q,
            )
            window = layer.sliding_window or 0
            if decode:
                attention.decode_attention(q, cache.k[i], cache.v[i], seq_lens, slots, scale=spec.softmax_scale,
                                           window=window, out=s.attn, scratch=s.scratch)
                a = s.attn
            else:
                a = attention.prefill_attention(q, cache.k[i], cache.v[i], 0, seq_lens, scale=spec.softmax_scale,
                                                window=window, out=s.attn if s is not None else None)
            a = a.reshape(rows, hq * hd)
            if spec.sandwich_norm:
                h = lin(a, lw.o, out=s.h if s is not None else None)
                norm.add_rms_norm(x, h, lw.post_attn_norm, spec.norm_eps)
            else:
                lin(a, lw.o, residual=x, out=x)
            act = "silu" if spec.activation == "silu" else "gelu_tanh"
            ff = lin(x, lw.gate_up, norm_weight=lw.ffn_norm, eps=spec.norm_eps, gated=act,
                     out=s.ff if s is not None else None)
            if spec.sandwich_norm:
                h = lin(ff, lw.down, out=s.h if s is not None else None)
                norm.add_rms_norm(x, h, lw.post_ffn_norm, spec.norm_eps)
            else:
                lin(ff, lw.down, residual=x, out=x)
        return x

    def _decode_step(self, cache):
        """One token through the model, entirely from the static buffers (what the graph captures)."""
        s = self._state
        gemv.embed_rows(s.token, self.w.embed, self.spec.embed_scale, out=s.x)
        self._layers(s.x, cache, s.positions, s.seq_lens, s.slots, 1, s)
        gemv.linear(s.x, self.w.lm_head, norm_weight=self.w.output_norm, eps=self.spec.norm_eps, out=s.logits,
                    workspace=s.workspace)
        sampling.argmax(s.logits, out=s.next_ids, workspace=s.argmax_ws)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: CudaKVCache, last_only: bool = False) -> torch.Tensor:
        start, T = cache.length, tokens.shape[0]
        if start + T > cache.max_context:
            raise ValueError(f"{start + T} positions exceed the cache's {cache.max_context}")
        if T == 1:
            return self._decode(int(tokens[0]), cache)
        p = self._prefill
        if last_only and cache is self._cache and T <= p.rows:
            rows = prefill.bucket_for(T, min(p.rows, cache.max_context - start)) if self.use_graph else None
            return self._prefill_chunk(tokens, cache, rows or T, graph=rows is not None)
        dev = self.device
        ids = tokens.to(dev)
        x = gemv.embed_rows(ids, self.w.embed, self.spec.embed_scale,
                            out=torch.empty(T, self.spec.hidden_size, device=dev, dtype=torch.float32))
        positions = torch.arange(start, start + T, device=dev, dtype=torch.int32)
        slots = torch.zeros(T, device=dev, dtype=torch.int32)
        span = torch.tensor([start, T], device=dev, dtype=torch.int32)
        self._layers(x, cache, positions, span, slots, T, None)
        cache.length = start + T
        if last_only:
            x = x[-1:]
        lin = gemv.linear if x.shape[0] <= DECODE_ROWS else gemm.matmul
        return lin(x, self.w.lm_head, norm_weight=self.w.output_norm, eps=self.spec.norm_eps)

    # -- prefill from static buffers and graphs -----------------------------------------------------------------
    def _prefill_chunk(self, tokens: torch.Tensor, cache: CudaKVCache, rows: int, graph: bool) -> torch.Tensor:
        """Logits [1, vocab] after the last of tokens, run as `rows` rows (the chunk, then padding) from the
        prefill buffers: replaying the bucket's graph, or eagerly. The logits buffer is reused by the next
        chunk."""
        p, start, T = self._prefill, cache.length, tokens.shape[0]
        if not T <= rows <= cache.max_context - start:
            raise ValueError(f"{T} tokens at {start} cannot run as {rows} rows in a {cache.max_context} cache")
        view = p.view(rows)
        p.set_inputs(tokens, start)
        if not graph:
            self._prefill_step(view, cache)
        else:
            if rows not in self._prefill_graphs:
                self._prefill_graphs[rows] = prefill.capture(lambda: self._prefill_step(view, cache), self.device)
            self._prefill_graphs[rows].replay()
        cache.length = start + T
        return view.logits

    def _prefill_step(self, b, cache):
        """One chunk through the model from a prefill view: everything it varies by is read on the device."""
        gemv.embed_rows(b.ids, self.w.embed, self.spec.embed_scale, out=b.x)
        torch.add(b.arange, b.span[0], out=b.positions)
        self._layers(b.x, cache, b.positions, b.span, b.slots, b.rows, b)
        torch.index_select(b.x, 0, b.last, out=b.x_last)
        gemv.linear(b.x_last, self.w.lm_head, norm_weight=self.w.output_norm, eps=self.spec.norm_eps,
                    out=b.logits, workspace=b.workspace)

    @torch.inference_mode()
    def decode_greedy(self, token: int, cache: CudaKVCache) -> int:
        """Run token through the model and return the most likely next token, chosen on the GPU."""
        self._decode(token, cache)
        return int(self._state.next_ids[0])

    def _decode(self, token: int, cache: CudaKVCache) -> torch.Tensor:
        s = self._state
        s.set_inputs(token, cache.length)
        if not self.use_graph:
            self._decode_step(cache)
        else:
            if self._graph is None:
                self._capture(cache)
            self._graph.replay()
        cache.length += 1
        return s.logits

    def _capture(self, cache):
        # Warm up on a side stream (compiles the kernels, lets Triton cache its launchers), then capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode_step(cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(cache)
        self._graph = graph
