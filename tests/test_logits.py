"""The batched greedy pick of a step against each row's own argmax."""

from __future__ import annotations

import torch

from ingot.engine.logits import LogitBias, TokenPicker, greedy_tokens
from ingot.engine.sampler import Sampler, SamplingParams


def test_greedy_tokens_equal_each_rows_argmax_ties_to_the_lowest_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 128256, generator=g)
    logits[3, [7, 90000, 128255]] = logits[3].max() + 1  # a three-way tie for the top
    logits[4, [0, 5]] = float("inf")
    logits[5] = 0.0  # every token ties
    logits[6, :10] = -1e30
    logits[6, 10:] = 5.0  # every token from index 10 on ties
    tokens = greedy_tokens(logits)
    assert tokens == [int(row.argmax()) for row in logits]
    assert tokens[3:7] == [7, 0, 0, 10]


def test_plain_greedy_is_temperature_zero_with_nothing_steering_or_read_from_the_row():
    def picker(logprobs=None, **sampling):
        return TokenPicker(Sampler(SamplingParams(**sampling)), logprobs=logprobs)

    assert picker(temperature=0.0).plain_greedy
    assert picker(temperature=0.0, repeat_penalty=1.0).plain_greedy  # a penalty of 1 changes nothing
    assert not picker(temperature=0.7).plain_greedy
    assert not picker(temperature=0.0, repeat_penalty=1.1).plain_greedy
    assert not picker(temperature=0.0, presence_penalty=0.5).plain_greedy
    assert not picker(logprobs=0).plain_greedy
    assert not TokenPicker(Sampler(SamplingParams()), LogitBias({5: 1.0})).plain_greedy
