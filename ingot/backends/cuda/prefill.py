"""Prefill chunks replayed from CUDA graphs: one graph per bucket of token counts, each chunk padded up to its
bucket, so a 512-token chunk costs one graph launch instead of ~300 Triton launches from Python.

Buckets are 16, 32, 64, 128, 256, 384 and 512 rows. Up to 16 rows the GEMV kernels run (as in eager prefill),
and there any padding is free: their time is the weight read. From 32 rows on the tensor-core GEMM runs,
whose tiles are 32 to 128 rows: below 128 rows it too is bound by reading the weights, so doubling buckets
waste little; at 256 and 512 compute starts to count, and 384 keeps a 257..384-token chunk (a long prompt's
tail) from paying for 512 rows. Seven graphs share one set of buffers, so more buckets cost capture time
only, not memory.

Everything that varies between chunks lives in device memory that the graph reads: the token ids, the start
position (the cache length) and the real token count. Padding rows come after the real ones, so causal
attention never lets a real row see them (and the attention kernel skips them); their keys and values land in
cache positions past the new length, which a later chunk or decode step overwrites before anything reads
them. A bucket that would reach past the cache runs eagerly instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ingot.backends.cuda import gemm, layout
from ingot.models.base import ModelSpec

BUCKETS = (16, 32, 64, 128, 256, 384, 512)


def bucket_for(n: int, limit: int) -> int | None:
    """The smallest bucket of at least n rows and at most limit rows; None when there is none."""
    return next((b for b in BUCKETS if n <= b <= limit), None)


def _shapes(spec: ModelSpec, rows: int, vocab: int) -> dict:
    """name: (shape, dtype) of every per-row buffer a chunk of up to `rows` tokens uses (the activations at
    the widest layer's widths: layout.row_widths)."""
    f32, i32 = torch.float32, torch.int32
    widths = layout.row_widths(spec)
    shapes = {
        "inputs": ((3 + rows,), i32),  # start, real count, last real row, then the token ids
        "arange": ((rows,), i32),
        "positions": ((rows,), i32),
        "slots": ((rows,), i32),
        "q": ((rows, widths["attn"]), f32),  # the rotated queries, heads side by side
        **{name: ((rows, w), f32) for name, w in widths.items()},
        "norm_out": ((rows, spec.hidden_size), torch.float16),  # the GEMM's RMSNorm prologue
        "x_last": ((1, spec.hidden_size), f32),
        "logits": ((1, vocab), f32),
    }
    return shapes


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def buffer_rows(max_context: int) -> int:
    return min(BUCKETS[-1], max_context)


def prefill_buffer_bytes(spec: ModelSpec, max_context: int) -> int:
    """Bytes of PrefillBuffers for this context, but for the GEMV workspace (it depends on the packed
    weights' kernel plans; the fit check's general buffer margin holds it)."""
    return sum(_nbytes(*s) for s in _shapes(spec, buffer_rows(max_context), spec.vocab_size).values())


class PrefillBuffers:
    """Every buffer a prefill chunk of up to `rows` tokens reads or writes, allocated once: a bucket of B rows
    uses the first B rows of each, so every bucket's graph refers to the same memory."""

    def __init__(self, spec: ModelSpec, weights, max_context: int, device):
        self.rows = buffer_rows(max_context)
        self.vocab = weights.lm_head.n
        for name, (shape, dtype) in _shapes(spec, self.rows, self.vocab).items():
            setattr(self, name, torch.zeros(shape, device=device, dtype=dtype))
        torch.arange(self.rows, out=self.arange)
        # One split-K workspace for the largest projection a chunk runs: lm_head on the last row, every layer's
        # linears as GEMVs at the 16-row bucket and as short GEMMs up to 64 rows (the GEMM splits K only for
        # one M tile, at most 64 rows; MoE blocks bring their own buffers).
        need = max(weights.workspace_numel(min(self.rows, r), lm_head_rows=1)
                   for r in (BUCKETS[0], gemm.SPLIT_MAX_ROWS))
        self.workspace = torch.zeros(need, device=device, dtype=torch.float32)  # ticket counters at 0
        self.per_row = [n for n in _shapes(spec, 1, 1) if n not in ("inputs", "arange", "x_last", "logits")]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def set_inputs(self, tokens: torch.Tensor, start: int) -> None:
        """Stage one chunk's token ids, start position and count for the next step to read."""
        T = tokens.shape[0]
        if T > self.rows:
            raise ValueError(f"a chunk of {T} tokens exceeds the {self.rows} rows of the prefill buffers")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab:
            raise ValueError(f"token ids must lie in 0..{self.vocab - 1}, got {lo}..{hi}")
        host = torch.empty(3 + T, dtype=torch.int32)
        host[0], host[1], host[2] = start, T, T - 1
        host[3:] = tokens
        # From pageable memory the copy is staged before copy_ returns: host may go away at once.
        self.inputs[: 3 + T].copy_(host, non_blocking=True)

    def view(self, rows: int) -> SimpleNamespace:
        """The first `rows` rows of every buffer, under the names the model's layers look for."""
        if not 0 < rows <= self.rows:
            raise ValueError(f"a step of {rows} rows does not fit the {self.rows} rows of the prefill buffers")
        v = SimpleNamespace(**{n: getattr(self, n)[:rows] for n in self.per_row})
        v.span, v.last, v.ids = self.inputs[0:2], self.inputs[2:3], self.inputs[3 : 3 + rows]
        v.arange, v.x_last, v.logits, v.workspace = self.arange[:rows], self.x_last, self.logits, self.workspace
        v.rows = rows
        return v


def capture(step, device) -> torch.cuda.CUDAGraph:
    """A CUDA graph of step(): run once on a side stream first (compiles the kernels, lets Triton cache its
    launchers, and leaves no lazy initialisation for the capture), then captured."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
