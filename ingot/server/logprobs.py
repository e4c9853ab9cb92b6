"""OpenAI's two shapes of logprobs, made of the engine's TokenLogprob: chat's list of tokens, each with its
alternatives, and legacy completions' parallel lists."""

from __future__ import annotations

from ingot.engine.logits import TokenLogprob
from ingot.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobs, TopLogprob

LOWEST = -9999.0  # OpenAI's stand-in for a logprob of -inf, which JSON cannot carry


class LogprobFormat:
    """Turns token ids into their text and bytes through the model's vocabulary (llguidance's LLTokenizer)."""

    def __init__(self, vocabulary):
        self.vocabulary = vocabulary

    def _token(self, token: int) -> tuple[str, bytes]:
        raw = self.vocabulary.decode_bytes([token])
        return raw.decode("utf-8", errors="backslashreplace"), raw

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text, raw = self._token(token)
        return TopLogprob(token=text, logprob=max(logprob, LOWEST), bytes=list(raw))

    def chat(self, scored: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            TokenLogprobs(**self._top(s.token, s.logprob).model_dump(),
                          top_logprobs=[self._top(t, lp) for t, lp in s.top]) for s in scored])

    def completion(self, scored: list[TokenLogprob]) -> CompletionLogprobs:
        tops = []
        for s in scored:
            top = {}
            for t, lp in [*s.top, (s.token, s.logprob)]:
                top.setdefault(self._token(t)[0], max(lp, LOWEST))  # two ids of one text: the likelier
            tops.append(top)
        return CompletionLogprobs(tokens=[self._token(s.token)[0] for s in scored],
                                  token_logprobs=[max(s.logprob, LOWEST) for s in scored], top_logprobs=tops,
                                  text_offset=[s.offset for s in scored])
