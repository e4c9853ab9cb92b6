"""What every format loader produces: a config, lazily readable tensors under canonical names, a tokenizer.

Canonical tensor names are GGUF's short names (token_embd.weight, blk.N.attn_q.weight, ...), but the
layouts are Hugging Face's: rotary embedding in the half-split ("neox") order for every family, and norm
weights as the plain multiplier (Gemma's HF (1 + w) is stored as 1 + w). Loaders convert into this form so
that models and backends see one convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class TensorRef:
    """One stored tensor: its type and logical shape (torch order), read only when asked."""

    name: str
    qtype: str
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """The values as float32, in the logical shape."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


@dataclass
class GGMLTensor(TensorRef):
    """A GGML-typed tensor: raw block bytes, one row per output feature, optionally with rows reordered or
    picked out of a larger stored tensor (one half of a fused gate_up)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # raw bytes (uint8) or native float array, memory-mapped
    row_order: np.ndarray | None = None  # loader-applied row permutation or selection (exact on quantized rows)

    def _row_bytes(self) -> int:
        from ingot.quant.ggml import BLOCK

        elems, block_bytes = BLOCK[self.qtype]
        return self.shape[-1] // elems * block_bytes

    def raw(self) -> np.ndarray:
        """Bytes in canonical row order, as a (rows, row_bytes) uint8 view or copy."""
        table = self.data.view(np.uint8).reshape(-1, self._row_bytes())
        return table if self.row_order is None else table[self.row_order]

    def dequantize(self) -> torch.Tensor:
        from ingot.quant.ggml import dequantize

        return dequantize(self.raw(), self.qtype, self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if self.row_order is None else len(self.row_order) * self._row_bytes()


@dataclass
class DenseTensor(TensorRef):
    """A floating-point tensor behind a loader (safetensors slices, stacked experts, adjusted norms)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    loader: Callable[[], torch.Tensor]
    bytes_: int = 0

    def dequantize(self) -> torch.Tensor:
        return self.loader().to(torch.float32).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.bytes_


@dataclass
class PackedTensor(TensorRef):
    """Rows [start, stop) of a matrix stored in kernel layout (ingot.quant.pack): attn_k inside a fused QKV of
    a .ingot file, or the whole of an unfused one; with `every`, those rows of each block of `every` rows
    (the experts' gates in a [gate; up] per expert). `matrix` names the stored matrix; `whole` builds it
    (views of a memory map, no copy)."""

    name: str
    qtype: str  # the packed kind: q4 | q8 | f16 | q6k
    shape: tuple[int, ...]
    matrix: str
    whole: Callable[[], object] = field(repr=False)
    start: int = 0
    stop: int = 0
    bytes_: int = 0
    every: int = 0  # 0: the rows are one run

    def packed(self):
        from ingot.quant.pack import periodic_rows, rows

        p = self.whole()
        if self.every:
            return periodic_rows(p, self.start, self.stop, self.every)
        return p if (self.start, self.stop) == (0, p.n) else rows(p, self.start, self.stop)

    def dequantize(self) -> torch.Tensor:
        return self.packed().dequantize().reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.bytes_


def fused_matrix(refs: list[TensorRef]):
    """The stored PackedLinear when refs are, in order, all the rows of one packed matrix (a .ingot file's
    fused QKV or gate/up; with `every`, of each of its blocks: the experts' [gate; up]), else None: the
    caller then packs and concatenates (or interleaves) them itself."""
    first = refs[0]
    if not all(isinstance(r, PackedTensor) and r.whole is first.whole and r.every == first.every for r in refs):
        return None
    p = first.whole()
    bounds = [(r.start, r.stop) for r in refs]
    end = first.every or p.n
    if bounds[0][0] != 0 or bounds[-1][1] != end or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        return None
    return p


@dataclass
class Checkpoint:
    """A model as stored: config in Hugging Face's keys, tensors by canonical name, tokenizer on demand."""

    path: Path
    format: str  # "gguf" | "hf" | "mlx" | "ingot"
    arch: str  # Ingot family name: llama | qwen3 | qwen3moe | gemma3
    config: dict
    tensors: dict[str, TensorRef]
    tokenizer_loader: Callable[[], object | None] = field(default=lambda: None, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)  # the source's own key/values (GGUF)

    def load_tokenizer(self):
        return self.tokenizer_loader()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
