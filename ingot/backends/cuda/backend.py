"""The CUDA backend: the model's blocks composed from Ingot's Triton kernels, the decode step captured
once as a CUDA graph and replayed, every buffer allocated once up front."""

from __future__ import annotations

import functools
import os
import torch
import triton
import triton.language as tl

from ingot.backends.cuda import attention, gemm, gemma4_ops, gemv, layout, moe, norm, pdl, prefill, rope, sampling
from ingot.backends.cuda.paged_attention import paged_decode_attention
from ingot.backends.cuda.weights import ModelWeights
from ingot.engine.kv_cache import PagedKVCache
from ingot.errors import UnsupportedError
from ingot.models.base import ModelSpec

# The features beyond one repeated block shape (ModelSpec.beyond_uniform's names) that these kernels cover;
# ingot.load refuses a spec that uses any other on this backend.
COVERED = frozenset({
    "per-layer head_dim / kv heads", "per-layer MLP width", "KV sharing between layers",
    "values equal to keys (k_eq_v)", "proportional (partial) rope", "v norm", "final logit softcapping",
    "per-layer input embeddings", "layer output scale", "dense MLP beside the experts",
    "router input and per-expert scales",
})

# Up to this many rows use the GEMV kernels; more go to the tensor-core GEMM (gemm._short_tiles, split K:
# gemm._splits). Qwen3-8B q4_0 on the H200 (2026-12-02, `ingot bench --batch B`, tg128 tok/s): at 2 rows the
# byte GEMV 225, the GEMM 352; at 8 rows 333 against 1,394; at 16 the GEMM 2,709. INGOT_DECODE_ROWS moves the
# switch (the A/B).
DECODE_ROWS = int(os.environ.get("INGOT_DECODE_ROWS", "1"))

# MoE layers in the prefill graphs: their token grouping (moe.group_by_expert, one kernel) runs on the device with
# sizes fixed by the bucket, so it captures. Eagerly, a 512-token chunk of Qwen3-30B-A3B spends about as long
# launching from Python as on the GPU (H200, 2026-12-02: pp512 62.7 ms against ~33 ms of kernels).
# INGOT_MOE_PREFILL_GRAPH=0 runs them eagerly (the A/B of benchmarks/device_check.sh ab).
MOE_PREFILL_GRAPH = os.environ.get("INGOT_MOE_PREFILL_GRAPH", "1") != "0"

# The server's decode-only paged steps from static buffers, replayed as a CUDA graph per (batch bucket, block
# table width); eagerly, a step of Llama-3.2-1B launches ~150 kernels from Python. INGOT_PAGED_GRAPH=0: the
# eager forward_paged for every step (the A/B).
PAGED_GRAPH = os.environ.get("INGOT_PAGED_GRAPH", "1") != "0"


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)  # decode batch sizes that get their own buffers and captured graph


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """The batch buckets a backend of max_batch sequences uses: the powers of two below, then max_batch."""
    if not 1 <= max_batch <= BATCH_BUCKETS[-1]:
        raise ValueError(f"max_batch must be between 1 and {BATCH_BUCKETS[-1]}, got {max_batch}")
    return tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)


def cache_slots(max_batch: int) -> int:
    """KV-cache slots: one per sequence, plus a scratch slot that the padding rows of a bucket write to."""
    return max_batch + (max_batch > 1)


def _heads(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The first n_heads * head_dim columns of a static buffer [rows, width], as [rows, n_heads, head_dim]."""
    return t[:, : n_heads * head_dim].unflatten(1, (n_heads, head_dim))


def _rope_slot(table: list[int], p: int, block_size: int) -> int:
    """The "slot" c the RoPE kernel is given for position p of a paged sequence: it writes position p of slot
    c at c * block_stride + p * row_stride, which is row p % block_size of block table[p // block_size] when
    c = table[p // block_size] - p // block_size (c may be negative)."""
    return table[p // block_size] - p // block_size


def _normed_lin(lin, x, w, norm_weight, normed, eps, **kw):
    """lin on rms_norm(x, norm_weight): from x's pre-normed handoff (xn, sums of squares) when there is one."""
    if normed is not None:
        return lin(normed[0], w, norm_parts=normed[1], eps=eps, **kw)
    return lin(x, w, norm_weight=norm_weight, eps=eps, **kw)


def _residual_lin(lin, a, w, x, hand_to: "gemv.NormOut | None"):
    """x += a @ w^T in place; with hand_to, x is also handed on pre-normed there: returns the handoff
    (xn, its sums of squares) for _normed_lin, else None."""
    if hand_to is None:
        lin(a, w, residual=x, out=x)
        return None
    lin(a, w, residual=x, out=x, norm_out=hand_to)
    return hand_to.for_next(gemv.norm_parts(w))


def _add_norm(x, h, w, eps, hand_to: "gemv.NormOut | None", scale=None):
    """x += rms_norm(h) * w in place (a sandwich norm), then x *= scale; with hand_to, x is also handed on
    pre-normed there: returns the handoff (xn, its one sum of squares) for _normed_lin, else None."""
    norm.add_rms_norm(x, h, w, eps, scale=scale, norm_out=hand_to)
    return None if hand_to is None else hand_to.for_next(1)


def _linear_for(rows: int, s: "DecodeState | None" = None):
    """The projection kernel for `rows` activation rows: the GEMV (split-K workspace from the decode state,
    so a captured step never allocates) up to DECODE_ROWS, the tensor-core GEMM above."""
    kernel = gemm.matmul if rows > DECODE_ROWS else gemv.linear
    return kernel if s is None else functools.partial(kernel, workspace=s.workspace)


class CudaKVCache:
    """fp16 keys and values, [slots, max_ctx, kv_heads, head_dim] per layer (that layer's kv heads and head
    dim; None for a layer that reads another's), sized once; `lengths` holds how many positions of each slot
    are filled (`length` is slot 0's, the single-sequence view)."""

    def __init__(self, spec: ModelSpec, max_context: int, device, slots: int = 1):
        def alloc(shape):
            return None if shape is None else torch.zeros((slots, max_context, *shape), device=device,
                                                          dtype=torch.float16)

        self.k = [alloc(s) for s in spec.kv_cache_shapes()]
        self.v = [alloc(s) for s in spec.kv_cache_shapes()]
        self.max_context = max_context
        self.lengths = [0] * slots

    @property
    def length(self) -> int:
        return self.lengths[0]

    @length.setter
    def length(self, n: int) -> None:
        self.lengths[0] = n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@triton.jit
def _advance_kernel(step_ptr, next_ptr, B, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Make the step's own output the next step's input: token <- chosen id, length + 1."""
    pdl.wait(PDL)
    i = tl.arange(0, BLOCK)
    ok = i < B
    tl.store(step_ptr + i, tl.load(next_ptr + i, mask=ok).to(tl.int32), mask=ok)
    tl.store(step_ptr + B + i, tl.load(step_ptr + B + i, mask=ok) + 1, mask=ok)


class DecodeState:
    """The static buffers one decode step of `batch` rows reads and writes; a captured graph refers to
    exactly these."""

    RING = 4  # pinned staging slots: an async copy never reads or writes a slot being reused

    def __init__(self, spec: ModelSpec, weights: ModelWeights, max_context: int, device, batch: int = 1,
                 scratch_slot: int = 0):
        f32, i32 = dict(device=device, dtype=torch.float32), dict(device=device, dtype=torch.int32)
        self.batch = batch
        self.scratch_slot = scratch_slot  # the cache slot padding rows write to
        # rows: token ids, sequence lengths (the new token sits at length - 1), cache slots
        self.step_in = torch.zeros(3, batch, **i32)
        pinned = device.type == "cuda"
        self.host_in = [torch.zeros(3, batch, dtype=torch.int32, pin_memory=pinned) for _ in range(self.RING)]
        self.host_out = [torch.zeros(batch, dtype=torch.int64, pin_memory=pinned) for _ in range(self.RING)]
        self.copied = [None] * self.RING
        self.step = 0
        # x, h, qkv, attn, ff and the rest at the widest layer's widths: a layer uses their first columns
        self.rows = {name: torch.zeros(batch, w, **f32) for name, w in layout.row_widths(spec).items()}
        for name, t in self.rows.items():
            setattr(self, name, t)
        self.logits = torch.zeros(batch, weights.lm_head.n, **f32)
        # x handed from one projection to the next pre-normed (gemv.NormOut): x * norm weight, sums of squares
        self.xn = torch.zeros(batch, spec.hidden_size, **f32)
        self.norm_ss = torch.zeros(gemv.SPLIT_COUNTERS, **f32)
        # Greedy decoding picks the next tokens inside the graph: one small copy to the host per step.
        self.next_ids = torch.zeros(batch, device=device, dtype=torch.int64)
        self.argmax_ws = sampling.argmax_workspace(batch, weights.lm_head.n, device)
        # decode attention's partials, per head dim (Gemma 4's global layers have their own)
        self.scratch = {a.head_dim: attention.decode_scratch(batch, spec.n_heads, a.head_dim, max_context, device)
                        for a in layout.attn_shapes(spec)}
        # One split-K workspace, big enough for the largest decode GEMV, so no call allocates.
        self.workspace = torch.zeros(weights.workspace_numel(batch, batch), **f32)  # zeroed: split-K ticket counters
        moes = [lw.moe for lw in weights.layers if lw.moe]
        self.moe = moe.DecodeBuffers.for_layers(moes, batch, device) if moes else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        yield from (self.step_in, *self.rows.values(), self.logits, self.xn, self.norm_ss, self.next_ids,
                    self.workspace, *self.argmax_ws)
        yield from self.moe.tensors() if self.moe else ()
        yield from (t for sc in self.scratch.values() for t in sc if isinstance(t, torch.Tensor))

    def _ring_slot(self) -> int:
        """The next staging slot, once the copy that last used it has finished."""
        i = self.step % self.RING
        self.step += 1
        if self.copied[i] is not None:
            self.copied[i].synchronize()
            self.copied[i] = None
        return i

    def set_inputs(self, tokens, positions, slots) -> None:
        """Rows past len(tokens) are padding: token 0 at position 0 of the scratch slot (the last one)."""
        n, scratch = len(tokens), self.scratch_slot
        i = self._ring_slot()
        host = self.host_in[i]
        host[0, :n] = torch.tensor(tokens, dtype=torch.int32)
        host[1, :n] = torch.tensor(positions, dtype=torch.int32) + 1
        host[2, :n] = torch.tensor(slots, dtype=torch.int32)
        host[:, n:] = torch.tensor([0, 1, scratch], dtype=torch.int32)[:, None]
        self.step_in.copy_(host, non_blocking=True)
        self._record(i)

    def fetch_ids(self) -> int:
        """Start copying next_ids to a pinned host slot; returns the slot for read_ids."""
        i = self._ring_slot()
        self.host_out[i].copy_(self.next_ids, non_blocking=True)
        self._record(i)
        return i

    def _record(self, i: int) -> None:
        if self.host_out[i].is_pinned():
            self.copied[i] = torch.cuda.Event()
            self.copied[i].record()

    def read_ids(self, i: int) -> list[int]:
        if self.copied[i] is not None:
            self.copied[i].synchronize()
            self.copied[i] = None
        return self.host_out[i].tolist()

    def advance(self) -> None:
        _advance_kernel[(1,)](self.step_in, self.next_ids, self.batch,
                              BLOCK=triton.next_power_of_2(self.batch), num_warps=1, **pdl.LAUNCH)

    @property
    def tokens(self):
        return self.step_in[0]

    @property
    def seq_lens(self):
        return self.step_in[1]

    @property
    def slots(self):
        return self.step_in[2]


class PagedStep:
    """The static inputs of a decode-only paged step of `batch` rows (a bucket) and tables `width` blocks wide:
    per row the token, its position, its RoPE slot and the sequence's length, and the block tables; the
    layers' buffers are `s`, a DecodeState of the same batch (shared by every width). Rows past the step's
    sequences are padding: token 0 at position 0 of the cache's spare block."""

    def __init__(self, s: DecodeState, width: int, block_size: int):
        self.s, self.batch, self.width, self.block_size = s, s.batch, width, block_size
        device = s.x.device
        self.inputs = torch.zeros(4, self.batch, device=device, dtype=torch.int32)
        self.tokens, self.positions, self.slots, self.lens = self.inputs  # row views: set_inputs fills them
        self.tables = torch.zeros(self.batch, width, device=device, dtype=torch.int32)

    def set_inputs(self, seqs: list[tuple[list[int], int, list[int]]], spare: int) -> None:
        bs, pad = self.block_size, self.batch - len(seqs)
        rows = [(tokens[0], p, _rope_slot(table, p, bs), p + 1) for tokens, p, table in seqs] + [(0, 0, spare, 1)] * pad
        tables = [table + [0] * (self.width - len(table)) for *_, table in seqs] + [[spare] * self.width] * pad
        self.inputs.copy_(torch.tensor(rows, dtype=torch.int32).T)
        self.tables.copy_(torch.tensor(tables, dtype=torch.int32))


class CudaBackend:
    name = "cuda"

    def __init__(self, spec: ModelSpec, weights: ModelWeights, device, freq_factors=None, max_batch: int = 1):
        self.spec, self.w, self.device = spec, weights, torch.device(device)
        self.dtype = torch.float16
        self.inv_freq = [l.rope.inv_freq(freq_factors).to(self.device) for l in spec.layers]
        self.weight_bytes_per_token = weights.decode_bytes_per_token()
        self.weight_bytes = weights.arena_bytes
        self.max_batch = max_batch
        self.buckets = buckets_for(max_batch)
        self._states: dict[int, DecodeState] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill: prefill.PrefillBuffers | None = None
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # bucket rows: graph
        self._moe = any(lw.moe for lw in weights.layers)
        self.use_graph = self.device.type == "cuda"
        self._paged: dict[tuple[int, int], PagedStep] = {}  # (batch bucket, table width): its inputs
        self._paged_states: dict[int, DecodeState] = {}  # batch bucket: the layers' buffers
        self._paged_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._paged_cache: PagedKVCache | None = None  # the cache those graphs read
        self.shapes = layout.attn_shapes(spec)
        # One-row decode steps hand each residual row to the next projection pre-normed (gemv.NormOut) where
        # every projection runs the word kernel (the residual GEMVs, sandwich norms and experts blocks that
        # write x hand it on, and the experts blocks read theirs so too) and no per-layer inputs sit between.
        projections = [p for lw in weights.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down) if p is not None]
        self._handoff = not spec.per_layer_dim and all(gemv.handoff_ok(p, 1)
                                                       for p in [weights.lm_head, *projections])
        if spec.layer_scale and not spec.sandwich_norm:  # the scale rides on a sandwich norm's residual add
            raise UnsupportedError(f"{spec.arch}: a layer output scale without sandwich norms is not supported")

    def new_cache(self, max_context: int) -> CudaKVCache:
        self._states, self._graphs = {}, {}  # a new cache means new buffers for the graphs to read
        cache = CudaKVCache(self.spec, max_context, self.device, cache_slots(self.max_batch))
        for b in self.buckets:
            self._states[b] = DecodeState(self.spec, self.w, max_context, self.device, b, len(cache.lengths) - 1)
        self._prefill_graphs = {}
        self._prefill = prefill.PrefillBuffers(self.spec, self.w, max_context, self.device)
        self._cache = cache
        return cache

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the decode steps' static buffers (every bucket) and the prefill chunks' buffers."""
        return sum(st.nbytes for st in self._states.values()) + self._prefill.nbytes

    # -- the model -------------------------------------------------------------------------------------------
    def _layers(self, x, ids, cache, positions, seq_lens, slots, rows: int, s, slot: int = 0):
        """Every transformer block on activation rows x (fp32 [rows, hidden]) of tokens ids, updating x in
        place. Decode (s a DecodeState): seq_lens [B]. Prefill: seq_lens is the chunk's span (start, count) on
        the device, s its static buffers (a prefill view) or None to allocate temporaries, `slot` its cache
        slot. Returns _blocks' handoff of the final x."""
        spec = self.spec
        hq = spec.n_heads

        if isinstance(s, DecodeState):  # q/k norm, RoPE and the KV write happen inside the attention kernel
            def attend(i, layer, lw, qkv):
                a, c = self.shapes[i], self.shapes[i].cache_layer
                rope_args = attention.DecodeRope(self.inv_freq[i], lw.q_norm, lw.k_norm, spec.norm_eps,
                                                 a.kv_in_row, spec.v_norm)
                return attention.decode_attention(qkv, cache.k[c], cache.v[c], seq_lens, slots,
                                                  scale=spec.layer_softmax_scale(i), window=layer.sliding_window or 0,
                                                  out=_heads(s.attn, hq, a.head_dim), scratch=s.scratch[a.head_dim],
                                                  rope=rope_args, n_heads=hq)
        else:
            def attend(i, layer, lw, qkv):
                a, c = self.shapes[i], self.shapes[i].cache_layer
                q = self._rope_store(i, lw, qkv, positions, slots, cache,
                                     q_out=_heads(s.q, hq, a.head_dim) if s is not None else None)
                return attention.prefill_attention(q, cache.k[c], cache.v[c], slot, seq_lens,
                                                   scale=spec.layer_softmax_scale(i), window=layer.sliding_window or 0,
                                                   out=_heads(s.attn, hq, a.head_dim) if s is not None else None)
        return self._blocks(x, ids, rows, s, attend)

    def _rope_store(self, i, lw, qkv, positions, slots, cache, q_out=None):
        """Layer i's q/k(/v) norms, RoPE and KV write from its qkv rows; returns the rotated q [rows, Hq, D]."""
        spec, a = self.spec, self.shapes[i]
        return rope.qk_norm_rope_store(
            qkv, n_heads=spec.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, q_norm=lw.q_norm,
            k_norm=lw.k_norm, eps=spec.norm_eps, inv_freq=self.inv_freq[i], positions=positions, slots=slots,
            k_cache=cache.k[i], v_cache=cache.v[i], q_out=q_out, kv_in_row=a.kv_in_row, v_norm=spec.v_norm)

    def _blocks(self, x, ids, rows: int, s, attend):
        """The transformer blocks on x (fp32 [rows, hidden]) in place; attend(i, layer, lw, qkv) stores layer
        i's keys and values from the fused qkv rows and returns the attention output [rows, Hq, D]. s: the
        static buffers of a decode step or prefill view, or None to allocate temporaries. Returns the final x
        handed on normed by the output norm (_residual_lin), or None."""
        spec, eps = self.spec, self.spec.norm_eps
        decode = isinstance(s, DecodeState)
        hand = decode and rows == 1 and rows <= DECODE_ROWS and self._handoff

        def hand_to(norm_weight):
            return gemv.NormOut(norm_weight, s.xn, s.norm_ss) if hand else None
        workspace = s.workspace if s is not None else None
        if rows <= DECODE_ROWS:
            lin = functools.partial(gemv.linear, workspace=workspace)
        elif s is not None and not decode:
            lin = functools.partial(gemm.matmul, norm_out=s.norm_out, workspace=workspace)
        else:
            lin = functools.partial(gemm.matmul, workspace=workspace)

        def buf(name, width):
            """The first `width` columns of the static buffer `name`, or a new fp32 [rows, width]."""
            if s is None:
                return torch.empty(rows, width, device=x.device, dtype=torch.float32)
            return getattr(s, name)[:, :width]

        per_layer = self._per_layer_inputs(ids, x, lin, buf) if spec.per_layer_dim else None
        hidden = spec.hidden_size
        normed = None
        for i, (layer, lw) in enumerate(zip(spec.layers, self.w.layers)):
            qkv = _normed_lin(lin, x, lw.qkv, lw.attn_norm, normed, eps, out=buf("qkv", lw.qkv.n))
            a = attend(i, layer, lw, qkv).flatten(1)
            # the MLP, or experts routed on ffn_norm too (a router with a norm of its own takes x as it is)
            ffn_hand = hand_to(lw.ffn_norm) if lw.gate_up is not None or lw.moe.router_norm is None else None
            if spec.sandwich_norm:
                normed = _add_norm(x, lin(a, lw.o, out=buf("h", hidden)), lw.post_attn_norm, eps, ffn_hand)
            else:
                normed = _residual_lin(lin, a, lw.o, x, ffn_hand)
            next_norm = self.w.layers[i + 1].attn_norm if i + 1 < len(spec.layers) else self.w.output_norm
            # the layer output scale rides on the layer's last residual add
            normed = self._ffn(x, lw, lin, buf, s.moe if decode else None,
                               lw.layer_scale if per_layer is None else None, normed, hand_to(next_norm))
            if per_layer is not None:
                p = spec.per_layer_dim
                g = gemma4_ops.gelu_gate(lin(x, lw.inp_gate, out=buf("ple_gate", p)), per_layer[:, i * p:(i + 1) * p])
                norm.add_rms_norm(x, lin(g, lw.proj, out=buf("h", hidden)), lw.post_norm, eps, scale=lw.layer_scale)
        return normed

    def _ffn(self, x, lw, lin, buf, moe_buffers, scale, normed=None, hand_to=None):
        """The MLP, the experts, or both side by side (Gemma 4), added to x in place (then x *= scale).
        normed: x handed on pre-normed by ffn_norm (_normed_lin); hand_to: where to hand the new x on
        (_residual_lin, _add_norm). Returns the new x's handoff, or None."""
        spec, eps = self.spec, self.spec.norm_eps
        act = "silu" if spec.activation == "silu" else "gelu_tanh"
        if lw.gate_up is None:  # experts alone (Qwen3-MoE): they add to x themselves
            moe.block(x, lw.moe, lw.ffn_norm, eps, act, moe_buffers, norm_out=hand_to, normed=normed)
            return None if hand_to is None else hand_to.for_next(moe.norm_parts(lw.moe))
        ff = _normed_lin(lin, x, lw.gate_up, lw.ffn_norm, normed, eps, gated=act, out=buf("ff", lw.gate_up.n // 2))
        if not spec.sandwich_norm:
            return _residual_lin(lin, ff, lw.down, x, hand_to)
        h = lin(ff, lw.down, out=buf("h", spec.hidden_size))
        if lw.moe:  # the dense output and the experts' (on their own input norm), each normed, then summed
            mix = norm.rms_norm(h, lw.post_ffn_norm_1, eps, out=buf("mix", spec.hidden_size))
            experts = moe.block(x, lw.moe, lw.pre_ffn_norm_2, eps, act, moe_buffers, out=h)
            h = norm.add_rms_norm(mix, experts, lw.post_ffn_norm_2, eps)
        return _add_norm(x, h, lw.post_ffn_norm, eps, hand_to, scale)

    def _per_layer_inputs(self, ids, x, lin, buf):
        """Gemma 4's per-layer inputs [rows, L * P] of tokens ids with embeddings x: their own embedding rows
        mixed with a normed projection of x (gemma4_ops.per_layer_inputs)."""
        spec, w = self.spec, self.w
        width = spec.n_layers * spec.per_layer_dim
        own = gemv.embed_rows(ids, w.per_layer_embed, spec.per_layer_dim**0.5, out=buf("ple", width))
        proj = lin(x, w.per_layer_proj, out=buf("ple_proj", width))
        return gemma4_ops.per_layer_inputs(proj, own, w.per_layer_norm, spec.norm_eps, spec.hidden_size**-0.5)

    def _logits(self, x, lin, out=None, normed=None):
        """fp32 logits of the final hidden rows x (or of their handoff normed, see _normed_lin), softcapped
        where the model says."""
        logits = _normed_lin(lin, x, self.w.lm_head, self.w.output_norm, normed, self.spec.norm_eps, out=out)
        if self.spec.final_softcap:
            gemma4_ops.softcap_(logits, self.spec.final_softcap)
        return logits

    def _decode_step(self, s: DecodeState, cache):
        """One token per row through the model, entirely from the static buffers (what a graph captures);
        it ends by making its chosen tokens the next step's inputs, so steps can be queued back to back."""
        gemv.embed_rows(s.tokens, self.w.embed, self.spec.embed_scale, out=s.x)
        normed = self._layers(s.x, s.tokens, cache, None, s.seq_lens, s.slots, s.batch, s)
        self._logits(s.x, _linear_for(s.batch, s), out=s.logits, normed=normed)
        sampling.argmax(s.logits, out=s.next_ids, workspace=s.argmax_ws)
        s.advance()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: CudaKVCache, last_only: bool = False, slot: int = 0
                ) -> torch.Tensor:
        start, T = cache.lengths[slot], tokens.shape[0]
        if start + T > cache.max_context:
            raise ValueError(f"{start + T} positions exceed the cache's {cache.max_context}")
        if T == 1:
            return self._decode([int(tokens[0])], cache, [slot])
        p = self._prefill
        if last_only and slot == 0 and cache is self._cache and T <= p.rows and (MOE_PREFILL_GRAPH or not self._moe):
            rows = prefill.bucket_for(T, min(p.rows, cache.max_context - start)) if self.use_graph else None
            return self._prefill_chunk(tokens, cache, rows or T, graph=rows is not None)
        dev = self.device
        ids = tokens.to(device=dev, dtype=torch.int32)
        x = gemv.embed_rows(ids, self.w.embed, self.spec.embed_scale,
                            out=torch.empty(T, self.spec.hidden_size, device=dev, dtype=torch.float32))
        positions = torch.arange(start, start + T, device=dev, dtype=torch.int32)
        slots = torch.full((T,), slot, device=dev, dtype=torch.int32)
        span = torch.tensor([start, T], device=dev, dtype=torch.int32)
        self._layers(x, ids, cache, positions, span, slots, T, None, slot)
        cache.lengths[slot] = start + T
        if last_only:
            x = x[-1:]
        return self._logits(x, _linear_for(x.shape[0]))

    # -- several sequences through a paged KV cache (the server's continuous batching) ---------------------
    def new_paged_cache(self, n_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.spec.kv_cache_shapes(), n_blocks, block_size, self.device, self.dtype, spare=True)

    def paged_block_bytes(self, block_size: int) -> int:
        return PagedKVCache.block_bytes(self.spec.kv_cache_shapes(), block_size, self.dtype)

    @torch.inference_mode()
    def forward_paged(self, seqs: list[tuple[list[int], int, list[int]]], cache: PagedKVCache) -> torch.Tensor:
        """One eager step of several sequences, each (new token ids, start position, block table): all their
        tokens go through the projections together; the sequences with one new token attend together
        through their block tables, each longer chunk attends alone over its blocks gathered in order.
        Returns fp32 logits (len(seqs), vocab) of each sequence's last new token. A step of single new tokens
        runs from static buffers instead (_paged_decode)."""
        spec, dev, bs = self.spec, self.device, cache.block_size
        for tokens, start, table in seqs:
            end = start + len(tokens)
            if not tokens or end > len(table) * bs:
                raise ValueError(f"positions {start}..{end} need {-(-end // bs)} blocks, the table has {len(table)}")
        if (PAGED_GRAPH and len(seqs) <= BATCH_BUCKETS[-1] and cache.spare_block is not None
                and all(len(tokens) == 1 for tokens, _, _ in seqs)):
            return self._paged_decode(seqs, cache)
        ids, pos, slot, last, decode, chunks = [], [], [], [], [], []
        for tokens, start, table in seqs:
            end = start + len(tokens)
            p = range(start, end)
            slot.extend(_rope_slot(table, q, bs) for q in p)
            if len(tokens) == 1:
                decode.append((len(ids), start, table))
            else:
                chunks.append((len(ids), len(ids) + len(tokens), start, table))
            ids.extend(tokens)
            pos.extend(p)
            last.append(len(ids) - 1)
        T = len(ids)
        positions = torch.tensor(pos, dtype=torch.int32, device=dev)
        slots = torch.tensor(slot, dtype=torch.int32, device=dev)
        if decode:
            rows = torch.tensor([r for r, _, _ in decode], device=dev)
            width = max(len(t) for _, _, t in decode)
            tables = torch.tensor([t + [0] * (width - len(t)) for _, _, t in decode], dtype=torch.int32, device=dev)
            lens = torch.tensor([start + 1 for _, start, _ in decode], dtype=torch.int32, device=dev)
        chunk_tables = [torch.tensor(t, device=dev) for *_, t in chunks]

        def attend(i, layer, lw, qkv):
            q = self._rope_store(i, lw, qkv, positions, slots, cache)
            c, scale = self.shapes[i].cache_layer, spec.layer_softmax_scale(i)
            out = torch.empty_like(q)
            window = layer.sliding_window or 0
            if decode:
                out[rows] = paged_decode_attention(q[rows], cache.k[c], cache.v[c], tables, lens,
                                                   scale=scale, window=window)
            for (r0, r1, start, _), t in zip(chunks, chunk_tables):
                # the sequence's positions in order, as a one-slot contiguous cache
                k = cache.k[c].index_select(0, t).flatten(0, 1)[None]
                v = cache.v[c].index_select(0, t).flatten(0, 1)[None]
                attention.prefill_attention(q[r0:r1], k, v, 0, start, scale=scale, window=window, out=out[r0:r1])
            return out

        ids = torch.tensor(ids, dtype=torch.int32, device=dev)
        x = gemv.embed_rows(ids, self.w.embed, spec.embed_scale)
        self._blocks(x, ids, T, None, attend)
        x = x[torch.tensor(last, device=dev)]
        return self._logits(x, _linear_for(x.shape[0]))

    def _paged_decode(self, seqs: list[tuple[list[int], int, list[int]]], cache: PagedKVCache) -> torch.Tensor:
        """A step whose sequences have one new token each (tables checked by forward_paged), from the static
        buffers of its (batch bucket, table width): the captured graph's replay on the GPU, eagerly elsewhere."""
        bs = cache.block_size
        if cache is not self._paged_cache:  # graphs read one cache's tensors
            self._paged, self._paged_graphs, self._paged_cache = {}, {}, cache
        batch = next(b for b in BATCH_BUCKETS if b >= len(seqs))
        width = triton.next_power_of_2(max(len(table) for *_, table in seqs))
        key = (batch, width)
        if key not in self._paged:
            if batch not in self._paged_states:  # the contiguous cache's attention scratch goes unused: minimal
                self._paged_states[batch] = DecodeState(self.spec, self.w, bs, self.device, batch)
            self._paged[key] = PagedStep(self._paged_states[batch], width, bs)
        step = self._paged[key]
        step.set_inputs(seqs, cache.spare_block)
        if not self.use_graph:
            self._paged_decode_step(step, cache)
        else:
            if key not in self._paged_graphs:
                self._paged_graphs[key] = prefill.capture(lambda: self._paged_decode_step(step, cache), self.device)
            self._paged_graphs[key].replay()
        return step.s.logits[: len(seqs)].clone()  # the buffer is the next step's

    def _paged_decode_step(self, step: PagedStep, cache: PagedKVCache) -> None:
        """One token per row through the model from a PagedStep's buffers (what a graph captures)."""
        spec, s, hq = self.spec, step.s, self.spec.n_heads

        def attend(i, layer, lw, qkv):
            a = self.shapes[i]
            q = self._rope_store(i, lw, qkv, step.positions, step.slots, cache)
            return paged_decode_attention(q, cache.k[a.cache_layer], cache.v[a.cache_layer], step.tables, step.lens,
                                          scale=spec.layer_softmax_scale(i), window=layer.sliding_window or 0,
                                          out=_heads(s.attn, hq, a.head_dim))

        gemv.embed_rows(step.tokens, self.w.embed, spec.embed_scale, out=s.x)
        normed = self._blocks(s.x, step.tokens, step.batch, s, attend)
        self._logits(s.x, _linear_for(step.batch, s), out=s.logits, normed=normed)

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
        self._layers(b.x, b.ids, cache, b.positions, b.span, b.slots, b.rows, b)
        torch.index_select(b.x, 0, b.last, out=b.x_last)
        self._logits(b.x_last, functools.partial(gemv.linear, workspace=b.workspace), out=b.logits)

    # -- decode ------------------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> DecodeState:
        for b in self.buckets:
            if b >= n:
                return self._states[b]
        raise ValueError(f"{n} sequences exceed max_batch={self.max_batch}")

    def _run(self, s: DecodeState, cache) -> None:
        if not self.use_graph:
            self._decode_step(s, cache)
            return
        graph = self._graphs.get(s.batch)
        if graph is None:
            graph = self._graphs[s.batch] = self._capture(s, cache)
        graph.replay()

    def _decode(self, tokens: list[int], cache: CudaKVCache, slots: list[int]) -> torch.Tensor:
        """Logits [n, vocab] after one step of each (token, slot) row; the slots' lengths grow by one."""
        n = len(tokens)
        s = self._bucket(n)
        s.set_inputs(tokens, [cache.lengths[i] for i in slots], slots)
        self._run(s, cache)
        for i in slots:
            cache.lengths[i] += 1
        return s.logits[:n]

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], cache: CudaKVCache, slots: list[int]) -> torch.Tensor:
        return self._decode(tokens, cache, slots)

    @torch.inference_mode()
    def decode_batch_greedy(self, tokens: list[int], cache: CudaKVCache, slots: list[int]) -> list[int]:
        """One step of each row, returning each row's most likely next token, chosen on the GPU."""
        self._decode(tokens, cache, slots)
        s = self._bucket(len(tokens))
        return s.read_ids(s.fetch_ids())[: len(tokens)]

    @torch.inference_mode()
    def decode_greedy(self, token: int, cache: CudaKVCache) -> int:
        """Run token through the model and return the most likely next token, chosen on the GPU."""
        return self.decode_batch_greedy([token], cache, [0])[0]

    def greedy_stream(self, token: int, cache: CudaKVCache, steps: int):
        """Up to `steps` greedy tokens after `token` (slot 0). The step after the one being read is already
        queued on the GPU, which reads its input token from the previous step's output, so the host's work
        per token (the copy's wait, detokenizing, stop checks) overlaps the GPU's next step. A step queued
        past where the caller stops writes the cache beyond `cache.length`, where nothing reads it."""
        s = self._states[1]
        if steps <= 0:
            return
        with torch.inference_mode():
            s.set_inputs([token], [cache.length], [0])
            self._run(s, cache)
            pending = [s.fetch_ids()]
            for done in range(steps):
                if done + 1 < steps:
                    self._run(s, cache)
                    pending.append(s.fetch_ids())
                token = s.read_ids(pending.pop(0))[0]
                cache.length += 1
                yield token

    def _capture(self, s: DecodeState, cache) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (compiles the kernels, lets Triton cache its launchers), then capture.
        # The warm-up's advance() is undone so the graph's first replay sees the inputs set for it.
        saved = s.step_in.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode_step(s, cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(s, cache)
        s.step_in.copy_(saved)
        return graph
