"""The key/value cache of one sequence: per layer, keys and values for every position up to max_context."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_context: int, device, dtype):
        shape = (max_context, n_kv_heads, head_dim)
        # Sized once: nothing on the decode path allocates cache memory.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_context = max_context
        self.length = 0  # positions [0, length) hold valid keys and values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedKVCache:
    """Keys and values in fixed-size blocks shared by every sequence: per layer [n_blocks, block_size,
    n_kv_heads, head_dim]. A sequence's position p lives in block table[p // block_size], row p % block_size."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int, block_size: int, device,
                 dtype):
        shape = (n_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.n_blocks, self.block_size = n_blocks, block_size

    @staticmethod
    def block_bytes(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
