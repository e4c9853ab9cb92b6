"""The token loop: prefill, then sample and decode until a stop token, a stop string or the token limit,
yielding tokens or text as they come, and timing both phases."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterator

from ingot.engine.runner import Runner
from ingot.engine.sampler import Sampler, SamplingParams
from ingot.errors import ContextLengthError


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first generated token
    finish_reason: str = ""  # "stop" | "length"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes from prefill's logits; decode steps produce the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


class Generator:
    def __init__(self, runner: Runner):
        self.runner = runner
        self.stats = Stats()

    def tokens(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids=()) -> Iterator[int]:
        """Yield generated token ids; a stop id ends the loop and is not yielded."""
        if len(prompt) >= self.runner.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; the context is {self.runner.max_context}, "
                "which leaves no room to generate"
            )
        sampler = Sampler(params)
        greedy = params.temperature == 0.0 and not params.penalised  # penalties need the sampler's view
        stats = self.stats = Stats(prompt_tokens=len(prompt), finish_reason="length")
        t0 = time.perf_counter()
        logits = self.runner.prefill(prompt)
        history = list(prompt)
        stats.prefill_s = time.perf_counter() - t0
        if max_tokens <= 0:
            return
        token = sampler(logits, history)
        stats.ttft_s = time.perf_counter() - t0
        t_decode = time.perf_counter()
        greedy_steps = None  # the greedy continuation, started at the first decode step
        try:
            while True:
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    break
                stats.generated_tokens += 1
                history.append(token)
                yield token
                if stats.generated_tokens >= max_tokens or len(self.runner.tokens) >= self.runner.max_context:
                    break
                if greedy:  # the argmax happens where the logits are: no logits copy to the host
                    if greedy_steps is None:
                        greedy_steps = self.runner.greedy(token, max_tokens - stats.generated_tokens)
                    token = next(greedy_steps)
                else:
                    token = sampler(self.runner.decode(token), history)
                stats.decode_s = time.perf_counter() - t_decode
        finally:
            if greedy_steps is not None:
                greedy_steps.close()

    def text(self, prompt: list[int], tokenizer, max_tokens: int, params: SamplingParams,
             stop: list[str] | None = None) -> Iterator[str]:
        """Yield text pieces; stop strings end the text (they are not included) and are never half-shown."""
        out = TextStream(tokenizer, stop)
        for token in self.tokens(prompt, max_tokens, params, tokenizer.stop_ids):
            if piece := out.push(token):
                yield piece
            if out.stopped:
                self.stats.finish_reason = "stop"
                return
        piece = out.flush()
        if out.stopped:
            self.stats.finish_reason = "stop"
        if piece:
            yield piece


class TextStream:
    """The text of generated tokens, one token at a time: what may be shown now, holding back a tail that
    could be the start of a stop string. Once a stop string appears, `stopped` is set and the text ends
    before it."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self.decoder = tokenizer.stream_decoder()
        self.pending = ""
        self.stopped = False
        self.length = 0  # characters decoded so far, shown or held back

    def push(self, token: int) -> str:
        piece = self.decoder.push(token)
        self.length += len(piece)
        self.pending += piece
        hit = _first_stop(self.pending, self.stop)
        if hit >= 0:
            self.stopped = True
            out, self.pending = self.pending[:hit], ""
            return out
        safe = len(self.pending) - _longest_stop_prefix(self.pending, self.stop)
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out

    def flush(self) -> str:
        """The rest, once no token follows."""
        text, self.pending = self.pending + self.decoder.flush(), ""
        hit = _first_stop(text, self.stop)
        if hit >= 0:
            self.stopped = True
            text = text[:hit]
        return text


def _first_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string starts in text, or -1."""
    return min((text.find(s) for s in stops if s in text), default=-1)


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
