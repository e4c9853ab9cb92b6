"""The runner owns a backend and one sequence's KV cache: chunked prefill, then one decode step at a time.
It keeps the tokens whose keys are cached, so a new prompt that extends the last one (a chat turn)
prefills only the new part."""

from __future__ import annotations

import torch

from ingot.errors import ContextLengthError

DEFAULT_PREFILL_CHUNK = 512


class Runner:
    def __init__(self, backend, max_context: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.backend = backend
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.cache = backend.new_cache(max_context)
        self.tokens: list[int] = []  # the tokens whose keys and values are in the cache, in order

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Logits after the last of ids, reusing the cached prefix they share with the previous sequence."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, more than the context of {self.max_context}"
            )
        keep = 0
        for a, b in zip(self.tokens, ids[:-1]):  # the last token is always run: its logits are needed
            if a != b:
                break
            keep += 1
        self.tokens = self.tokens[:keep]
        self.cache.length = keep
        logits = None
        for at in range(keep, len(ids), self.prefill_chunk):
            chunk = ids[at : at + self.prefill_chunk]
            logits = self.backend.forward(torch.tensor(chunk, dtype=torch.long), self.cache, last_only=True)
            self.tokens.extend(chunk)
        return logits[-1]

    def decode(self, token: int) -> torch.Tensor:
        return self._step(token, lambda: self.backend.forward(torch.tensor([token], dtype=torch.long),
                                                              self.cache)[-1])

    def decode_greedy(self, token: int) -> int:
        """decode(token) then argmax, on the device when the backend can (no logits leave it)."""
        fast = getattr(self.backend, "decode_greedy", None)
        if fast is None:
            return int(self.decode(token).argmax())
        return self._step(token, lambda: fast(token, self.cache))

    def _step(self, token: int, run):
        if len(self.tokens) >= self.max_context:
            raise ContextLengthError(f"the sequence reached the context of {self.max_context} tokens")
        result = run()
        self.tokens.append(token)
        return result

    def forward_all(self, ids: list[int]) -> torch.Tensor:
        """Logits for every position of ids from an empty cache (for tests and perplexity)."""
        self.tokens, self.cache.length = [], 0
        logits = self.backend.forward(torch.tensor(ids, dtype=torch.long), self.cache)
        self.tokens = list(ids)
        return logits
