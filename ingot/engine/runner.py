"""The runner owns a backend and its KV cache: chunked prefill, then one decode step at a time. It keeps the
tokens whose keys are cached, so a new prompt that extends the last one (a chat turn) prefills only the new
part. Backends with max_batch > 1 also decode several sequences together (prefill_batch / decode_batch),
one cache slot each; the single-sequence calls use slot 0."""

from __future__ import annotations

from typing import Iterator

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
        self.batch_tokens: list[list[int]] | None = None  # per slot, while prefill_batch's sequences run

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Logits after the last of ids, reusing the cached prefix they share with the previous sequence."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, more than the context of {self.max_context}"
            )
        self.batch_tokens = None
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

    def greedy(self, token: int, steps: int) -> Iterator[int]:
        """The greedy continuation of token, one next token at a time, at most `steps` and never past the
        context. Backends with a greedy_stream queue each step before the host reads the previous one."""
        steps = min(steps, self.max_context - len(self.tokens))
        stream = getattr(self.backend, "greedy_stream", None)
        if stream is None:
            for _ in range(steps):
                token = self.decode_greedy(token)
                yield token
            return
        for nxt in stream(token, self.cache, steps):
            self.tokens.append(token)
            token = nxt
            yield nxt

    # -- several sequences at once ----------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return int(getattr(self.backend, "max_batch", 1))

    def prefill_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        """Start len(seqs) new sequences, one per cache slot from 0, and return each one's last logits
        [B, vocab]. Slot 0's earlier sequence (the single-sequence state) is replaced by seqs[0]."""
        if not 1 <= len(seqs) <= self.max_batch:
            raise ValueError(f"{len(seqs)} sequences: this backend decodes 1..{self.max_batch} at once")
        rows = []
        for slot, ids in enumerate(seqs):
            if not ids:
                raise ValueError("every sequence needs at least one token")
            if len(ids) > self.max_context:
                raise ContextLengthError(
                    f"sequence {slot} has {len(ids)} tokens, more than the context of {self.max_context}")
            self.cache.lengths[slot] = 0
            logits = None
            for at in range(0, len(ids), self.prefill_chunk):
                chunk = torch.tensor(ids[at : at + self.prefill_chunk], dtype=torch.long)
                logits = self.backend.forward(chunk, self.cache, last_only=True, slot=slot)
            rows.append(logits[-1])
        self.batch_tokens = [list(ids) for ids in seqs]
        self.tokens = self.batch_tokens[0]
        return torch.stack(rows)

    def decode_batch(self, tokens: list[int]) -> torch.Tensor:
        """One step of every sequence started by prefill_batch: logits [B, vocab]."""
        return self._batch_step(tokens, self.backend.decode_batch)

    def decode_batch_greedy(self, tokens: list[int]) -> list[int]:
        """One step of every sequence, returning each one's most likely next token (chosen on the device)."""
        return self._batch_step(tokens, self.backend.decode_batch_greedy)

    def _batch_step(self, tokens: list[int], run):
        rows = self.batch_tokens
        if rows is None or len(tokens) != len(rows):
            raise ValueError(f"{len(tokens)} tokens for {0 if rows is None else len(rows)} running sequences")
        if any(len(r) >= self.max_context for r in rows):
            raise ContextLengthError(f"a sequence reached the context of {self.max_context} tokens")
        out = run(list(tokens), self.cache, list(range(len(tokens))))
        for r, t in zip(rows, tokens):
            r.append(t)
        return out

    def _step(self, token: int, run):
        if len(self.tokens) >= self.max_context:
            raise ContextLengthError(f"the sequence reached the context of {self.max_context} tokens")
        self.batch_tokens = None
        result = run()
        self.tokens.append(token)
        return result

    def forward_all(self, ids: list[int]) -> torch.Tensor:
        """Logits for every position of ids from an empty cache (for tests and perplexity)."""
        self.tokens, self.cache.length, self.batch_tokens = [], 0, None
        logits = self.backend.forward(torch.tensor(ids, dtype=torch.long), self.cache)
        self.tokens = list(ids)
        return logits
