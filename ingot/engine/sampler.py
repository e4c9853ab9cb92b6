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
        self.seed = params.seed if params.seed is not None else torch.seed() % 2**31
        self.generator = torch.Generator()  # CPU generator: the same seed samples the same tokens on any device
        self.generator.manual_seed(self.seed)
        self._device = None  # buffers of the GPU sampler, made at the first GPU draw

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        penalise = bool(p.repeat_penalty and p.repeat_penalty != 1.0 and history)
        if p.temperature == 0.0 and not penalise:
            return int(logits.reshape(-1).argmax())  # on the logits' device: one small copy to the host
        if logits.is_cuda and not penalise:
            return self._sample_on_gpu(logits)
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

    def _sample_on_gpu(self, logits: torch.Tensor) -> int:
        """The same chain on the GPU (ingot.backends.cuda.sampling): only the token id comes to the host.
        Its randomness is a Philox counter, seed << 24 plus the step, so a seed reproduces a run."""
        from ingot.backends.cuda import sampling

        row = logits.reshape(1, -1).float().contiguous()
        if self._device is None:
            p, dev = self.p, row.device

            def one(value, dtype):
                return torch.tensor([value], dtype=dtype, device=dev)

            self._device = dict(
                temperature=one(p.temperature, torch.float32), top_k=one(p.top_k or 0, torch.int32),
                top_p=one(1.0 if p.top_p is None else p.top_p, torch.float32),
                min_p=one(p.min_p or 0.0, torch.float32), seed_offset=one(self.seed << 24, torch.int64),
                workspace=sampling.sample_workspace(1, row.shape[1], dev), out=one(0, torch.int64),
            )
        d = self._device
        sampling.sample(row, temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"], min_p=d["min_p"],
                        seed_offset=d["seed_offset"], out=d["out"], workspace=d["workspace"])
        d["seed_offset"] += 1
        return int(d["out"][0])
