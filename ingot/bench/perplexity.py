"""Perplexity of a model on a text: the quality check for conversions (`ingot perplexity`)."""

from __future__ import annotations

import math

import torch

from ingot.errors import IngotError


def perplexity(model, text: str | None = None, ids: list[int] | None = None, window: int | None = None) -> float:
    """exp of the mean negative log-likelihood of each token given the ones before it in its window.

    The tokens are cut into windows of `window` (default: the model's context), each scored from an empty
    cache, so the figure depends on the window: compare models at the same one. Give text (tokenized by the
    model) or ids (for models without a tokenizer)."""
    if (text is None) == (ids is None):
        raise IngotError("give exactly one of text or ids")
    if ids is None:
        ids = model.prompt_ids(text)
    window = min(window or model.max_context, model.max_context)
    if len(ids) < 2 or window < 2:
        raise IngotError(f"perplexity needs at least 2 tokens in a window ({len(ids)} tokens, window {window})")
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = [int(i) for i in ids[start : start + window]]
        if len(chunk) < 2:
            break
        logp = torch.log_softmax(model.logits(chunk)[:-1].double(), dim=-1)
        nll -= float(logp.gather(1, torch.tensor(chunk[1:])[:, None]).sum())
        count += len(chunk) - 1
    return math.exp(nll / count)
