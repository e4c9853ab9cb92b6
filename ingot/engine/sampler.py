"""Turning logits into the next token: greedy, or temperature with top-k / top-p / min-p, after llama.cpp's
penalties (repeat, frequency, presence over the last REPEAT_WINDOW tokens), in llama.cpp's order (penalties,
top-k, top-p, min-p, temperature). Logits on the GPU stay there (ingot.backends.cuda.sampling): only the
token id comes to the host; logits on the CPU take the plain torch path below, with the same meaning."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ingot.errors import IngotError

REPEAT_WINDOW = 64  # llama.cpp's default repeat_last_n: all three penalties look this far back


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None  # OpenAI's: subtracted once from each token in the window
    frequency_penalty: float | None = None  # OpenAI's: subtracted once per occurrence in the window

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not -2.0 <= v <= 2.0:  # OpenAI's range
                raise IngotError(f"{name} must be between -2 and 2, got {v}")
        return self

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits (greedy decoding must then see them)."""
        return bool((self.repeat_penalty and self.repeat_penalty != 1.0) or self.presence_penalty
                    or self.frequency_penalty)

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is always the argmax of the row as given: temperature 0 and no penalty."""
        return self.temperature == 0.0 and not self.penalised


def penalize(logits: torch.Tensor, recent: list[int], p: SamplingParams) -> None:
    """llama.cpp's penalties, in place, on a 1-D CPU logits row for the tokens in `recent`."""
    counts = Counter(recent)
    seen = torch.tensor(sorted(counts), dtype=torch.long)
    n = torch.tensor([counts[t] for t in sorted(counts)], dtype=logits.dtype)
    vals = logits[seen]
    rep = p.repeat_penalty or 1.0
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    logits[seen] = vals - n * (p.frequency_penalty or 0.0) - (p.presence_penalty or 0.0)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.seed = params.seed if params.seed is not None else torch.seed() % 2**31
        self.generator = torch.Generator()  # CPU generator for the CPU path
        self.generator.manual_seed(self.seed)
        self._device = None  # buffers of the GPU sampler, made at the first GPU draw
        self._window_len = -1  # len(history) the device window last matched; -1: never filled
        self._last = None  # the token id the last GPU call returned

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        penalise = p.penalised and bool(history)
        if p.temperature == 0.0 and not penalise:
            return int(logits.reshape(-1).argmax())  # on the logits' device: one small copy to the host
        if logits.is_cuda:
            return self._on_gpu(logits, history if penalise else None)
        # a copy: the steps below write to it, and the runner's logits may be inference tensors (read-only here)
        logits = logits.float().reshape(-1).cpu().clone()
        if penalise:
            penalize(logits, history[-REPEAT_WINDOW:], p)
        if p.temperature == 0.0:
            return int(logits.argmax())
        if p.top_k:
            kth = logits.topk(min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p is not None and p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            drop[0] = False  # top_p = 0 keeps the most likely token, not none
            logits[order[drop]] = float("-inf")
        if p.min_p:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        # max subtracted first and float64: a tiny temperature must not turn finite logits into inf or nan
        probs = ((logits - logits.max()).double() / p.temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _buffers(self, V: int, dev) -> dict:
        from ingot.backends.cuda import sampling

        p = self.p

        def one(value, dtype):
            return torch.tensor([value], dtype=dtype, device=dev)

        return dict(
            temperature=one(p.temperature, torch.float32), top_k=one(p.top_k or 0, torch.int32),
            top_p=one(1.0 if p.top_p is None else p.top_p, torch.float32),
            min_p=one(p.min_p or 0.0, torch.float32), seed_offset=one(self.seed << 24, torch.int64),
            workspace=sampling.sample_workspace(1, V, dev, candidates=max(sampling.CANDIDATES, p.top_k or 0)),
            argmax_ws=sampling.argmax_workspace(1, V, dev), out=one(0, torch.int64),
            window=torch.full((1, REPEAT_WINDOW), -1, dtype=torch.int64, device=dev),
            position=one(0, torch.int64), repeat=one(p.repeat_penalty or 1.0, torch.float32),
            presence=one(p.presence_penalty or 0.0, torch.float32),
            frequency=one(p.frequency_penalty or 0.0, torch.float32),
        )

    def _on_gpu(self, logits: torch.Tensor, history: list[int] | None) -> int:
        """The same chain on the GPU: only the token id comes to the host. Its randomness is a Philox
        counter, seed << 24 plus the step, so a seed reproduces a run. The penalty window lives on the
        device: a step that appends the token this sampler returned pushes it from the device output;
        any other history is copied over once (at most REPEAT_WINDOW ids, never the logits)."""
        from ingot.backends.cuda import sampling

        row = logits.reshape(1, -1).float().contiguous()
        if self._device is None:
            self._device = self._buffers(row.shape[1], row.device)
        d = self._device
        if history is not None:
            if len(history) == self._window_len + 1 and history[-1] == self._last:
                sampling.push_window(d["window"], d["position"], d["out"])
            elif len(history) != self._window_len:
                recent = history[-REPEAT_WINDOW:]
                d["window"].fill_(-1)
                d["window"][0, :len(recent)] = torch.tensor(recent, dtype=torch.int64)
                d["position"].fill_(len(recent))
            self._window_len = len(history)
            sampling.apply_penalties(row, d["window"], repeat_penalty=d["repeat"], presence_penalty=d["presence"],
                                     frequency_penalty=d["frequency"])
        if self.p.temperature == 0.0:
            sampling.argmax(row, out=d["out"], workspace=d["argmax_ws"])
        else:
            sampling.sample(row, temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"],
                            min_p=d["min_p"], seed_offset=d["seed_offset"], out=d["out"], workspace=d["workspace"])
            d["seed_offset"] += 1
        self._last = int(d["out"][0])
        return self._last
