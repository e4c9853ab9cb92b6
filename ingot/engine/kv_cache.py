"""The key/value cache of one sequence: per layer, keys and values for every position up to max_context."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layer_shapes: list[tuple[int, int] | None], max_context: int, device, dtype):
        """layer_shapes: each layer's (n_kv_heads, head_dim), or None for a layer that reads another's."""

        def alloc(shape):
            return None if shape is None else torch.zeros((max_context, *shape), device=device, dtype=dtype)

        # Sized once: nothing on the decode path allocates cache memory.
        self.k = [alloc(s) for s in layer_shapes]
        self.v = [alloc(s) for s in layer_shapes]
        self.max_context = max_context
        self.length = 0  # positions [0, length) hold valid keys and values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class PagedKVCache:
    """Keys and values in fixed-size blocks shared by every sequence: per layer [n_blocks, block_size,
    n_kv_heads, head_dim]. A sequence's position p lives in block table[p // block_size], row p % block_size."""

    def __init__(self, layer_shapes: list[tuple[int, int] | None], n_blocks: int, block_size: int, device, dtype,
                 spare: bool = False):
        """layer_shapes: each layer's (n_kv_heads, head_dim), or None for a layer that reads another's. spare:
        one more block past the n_blocks that sequences are given (`spare_block`), which a batch's padding
        rows write to."""
        rows = n_blocks + spare

        def alloc(shape):
            return None if shape is None else torch.zeros((rows, block_size, *shape), device=device, dtype=dtype)

        self.k = [alloc(s) for s in layer_shapes]
        self.v = [alloc(s) for s in layer_shapes]
        self.n_blocks, self.block_size = n_blocks, block_size
        self.spare_block = n_blocks if spare else None

    @staticmethod
    def block_bytes(layer_shapes: list[tuple[int, int] | None], block_size: int, dtype) -> int:
        per_position = sum(kv * hd for kv, hd in (s for s in layer_shapes if s is not None))
        return 2 * block_size * per_position * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
