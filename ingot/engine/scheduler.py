"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A sequence is its tokens (prompt, then what it generated) and how many of them have keys and values in
the cache. Prefill and decode are the same thing at different sizes: a step feeds each scheduled sequence
its next uncomputed tokens, and one whose tokens are then all computed samples its next token. The policy
is decode-first: every running sequence that waits for one token gets it, then what is left of the step's
token budget goes to prefill chunks, oldest sequence first, admitting waiting ones while the batch has
room. So a long prompt is spread over several steps and never stalls the running streams for more than
one budget's worth of tokens.

When blocks run out, the newest running sequence is preempted: its blocks are released and it goes back to
the front of the queue with all its tokens to recompute (its full blocks usually come back from the
prefix cache). The oldest sequence always fits, as the cache holds at least one full context.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ingot.engine.block_manager import BlockManager


@dataclass(eq=False)
class Sequence:
    tokens: list[int]
    n_prompt: int
    owner: Any = None  # what the caller ties to the sequence (the server's job)
    computed: int = 0  # tokens[:computed] have keys and values in the cache
    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # chain keys of blocks[:len(keys)], the registered prefix
    cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission; -1 before it

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, step_tokens: int):
        if max_batch < 1 or step_tokens < 1:
            raise ValueError(f"max_batch ({max_batch}) and step_tokens ({step_tokens}) must be positive")
        self.blocks, self.max_batch, self.step_tokens = blocks, max_batch, step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the oldest is preempted last

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue seq to be admitted, last (or first)."""
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (finished, cancelled, failed) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, how many of its pending tokens to feed), decodes first. Empty only
        when nothing waits or runs (given a cache of at least one full context)."""
        plan: list[tuple[Sequence, int]] = []
        waiting_before = len(self.waiting)
        i = 0
        while i < len(self.running):  # decodes; preempting from the end shortens the list as it goes
            seq = self.running[i]
            if seq.pending == 1:
                if not self._reserve_or_preempt(seq, 1):
                    break  # seq itself was the newest and got preempted
                plan.append((seq, 1))
            i += 1
        preempted = len(self.waiting) > waiting_before
        budget = self.step_tokens - len(plan)
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.pending > 1:
                n = self._fit(seq, min(seq.pending, budget))
                if n:
                    plan.append((seq, n))
                    budget -= n
        # Admission leaves a block for each running sequence to grow into, and stops in a step that had to
        # preempt: taking the blocks just freed would only preempt again at the next step.
        while budget > 0 and self.waiting and len(self.running) < self.max_batch and not preempted:
            seq = self.waiting[0]
            found, keys = self.blocks.match(seq.tokens, limit=len(seq.tokens) - 1)  # the last token is always run
            seq.blocks, seq.keys, seq.computed = found, keys, len(found) * self.blocks.block_size
            n = self._fit(seq, min(seq.pending, budget), reserve=len(self.running))
            if n == 0:
                self._release(seq)
                break
            if seq.cached_tokens < 0:
                seq.cached_tokens = seq.computed
                self.blocks.note_lookup(seq.n_prompt, seq.computed)
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        if not plan and self.running:
            # every running sequence is mid-prefill and the blocks are gone: the newest makes room
            self._preempt(self.running[-1])
            return self.schedule()
        return plan

    def advance(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq were computed: register the blocks that are now full and computed."""
        seq.computed += n
        bs = self.blocks.block_size
        for j in range(len(seq.keys), seq.computed // bs):
            parent = seq.keys[-1] if seq.keys else None
            seq.keys.append(self.blocks.register(seq.blocks[j], parent, tuple(seq.tokens[j * bs:(j + 1) * bs])))

    # -- blocks ---------------------------------------------------------------------------------------------
    def _fit(self, seq: Sequence, n: int, reserve: int = 0) -> int:
        """Take the blocks for as many of the next n tokens as the free blocks but `reserve` allow; how many
        that is."""
        bs = self.blocks.block_size
        room = (len(seq.blocks) + max(self.blocks.free - reserve, 0)) * bs - seq.computed
        n = min(n, room)
        if n > 0:
            need = -(-(seq.computed + n) // bs) - len(seq.blocks)
            seq.blocks += self.blocks.allocate(max(need, 0))
        return max(n, 0)

    def _reserve_or_preempt(self, seq: Sequence, n: int) -> bool:
        """Blocks for seq's next n tokens, preempting newer sequences for them; False if seq itself, the
        newest, had to go."""
        while self._fit(seq, n) < n:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.keys, seq.computed = [], [], 0
