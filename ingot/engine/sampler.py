"""Turning logits into the next token: greedy, or temperature with top-k / top-p / min-p, and a
repetition penalty, in llama.cpp's order (penalty, top-k, top-p, min-p, temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ingot.errors import IngotError

REPEAT_WINDOW = 64  # llama.cpp's default repeat_last_n


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if self.temperature < 0:
            raise IngotError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise IngotError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("top_p", "min_p"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise IngotError(f"{name} must be between 0 and 1, got {v}")
        if self.repeat_penalty is not None and self.repeat_penalty <= 0:
            raise IngotError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        return self


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.generator = torch.Generator()  # CPU generator: the same seed samples the same tokens on any device
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        penalise = bool(p.repeat_penalty and p.repeat_penalty != 1.0 and history)
        if p.temperature == 0.0 and not penalise:
            return int(logits.reshape(-1).argmax())  # on the logits' device: one small copy to the host
        logits = logits.float().reshape(-1).cpu()
        if penalise:
            seen = torch.tensor(sorted(set(history[-REPEAT_WINDOW:])), dtype=torch.long)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0.0:
            return int(logits.argmax())
        if p.top_k:
            kth = logits.topk(min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p is not None and p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits[order[drop]] = float("-inf")
        if p.min_p:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        probs = (logits / p.temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
