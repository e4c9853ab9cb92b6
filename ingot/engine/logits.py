"""One sequence's way from its logits row to its next token, beyond the sampler: a logit_bias and a
grammar's mask steer the row before sampling, and the log-probabilities of the chosen token (with the
most likely alternatives) are read from the row as the model gave it.

Reported logprobs are log_softmax of the raw row: before the bias, the mask, the penalties and the
temperature. That is what OpenAI reports (and vLLM by default): how likely the model found each token, not
how the request steered it, so a token forced by a bias or a grammar may show a low logprob.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ingot.engine.sampler import Sampler

MAX_BIAS = 100.0  # OpenAI's bound: -100 forbids a token and +100 forces it, in practice


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob) of the most likely tokens, most likely first
    offset: int = 0  # characters of the completion's text before this token (set by whoever decodes it)


def token_logprob(row: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` and the `top` most likely tokens in one logits row (on its own device; only
    the top + 1 numbers come to the host)."""
    logp = torch.log_softmax(row.reshape(-1).float(), dim=-1)
    values, ids = logp.topk(top) if top else (logp[:0], torch.empty(0, dtype=torch.long))
    numbers = torch.cat([logp[token].reshape(1), values]).tolist()
    return TokenLogprob(token, numbers[0], list(zip(ids.tolist(), numbers[1:])))


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of (rows, vocab) logits, the lowest index among ties (torch.argmax's rule, as a
    row's own argmax), with one copy to the host for all the rows rather than a sync for each."""
    return logits.argmax(dim=-1).tolist()


class LogitBias:
    """OpenAI's logit_bias: token id -> a number added to its logit before sampling."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def apply_(self, row: torch.Tensor) -> None:
        if self.ids.device != row.device:  # once: the row's device stays the same
            self.ids, self.values = self.ids.to(row.device), self.values.to(row.device)
        row.index_add_(0, self.ids, self.values)


class TokenPicker:
    """Sampler, bias and grammar constraint of one sequence. `logprobs`: how many alternatives to report
    with each token, or None for no logprobs."""

    def __init__(self, sampler: Sampler, bias: LogitBias | None = None, constraint=None,
                 logprobs: int | None = None):
        self.sampler, self.bias, self.constraint, self.logprobs = sampler, bias, constraint, logprobs

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is the argmax of the raw row and nothing else is read from it, so a step may take
        it from greedy_tokens of all its rows."""
        return (self.sampler.p.plain_greedy and self.bias is None and self.constraint is None
                and self.logprobs is None)

    def __call__(self, row: torch.Tensor, history: list[int]) -> tuple[int, TokenLogprob | None]:
        steered = row
        if self.bias is not None or self.constraint is not None:
            steered = row.reshape(-1).float().clone()  # the raw row stays as it is, for the logprobs
            if self.bias is not None:
                self.bias.apply_(steered)
            if self.constraint is not None:
                self.constraint.mask_(steered)
        token = self.sampler(steered, history)
        if self.constraint is not None:
            self.constraint.consume(token)
        scored = None if self.logprobs is None else token_logprob(row, token, self.logprobs)
        return token, scored
