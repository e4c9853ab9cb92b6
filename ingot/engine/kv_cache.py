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
