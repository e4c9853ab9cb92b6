"""llguidance's view of a model's vocabulary: the bytes of each token, for logprobs and grammars.

llguidance is imported where it is used, so a server whose requests ask for none of this runs where it is
not installed (the GPU benchmark machine carries only the plain server's wheels)."""

from __future__ import annotations

import functools

from ingot.tokenizer import Tokenizer


@functools.lru_cache(maxsize=4)
def ll_tokenizer(tokenizer: Tokenizer, n_vocab: int):
    """llguidance.LLTokenizer, built once per tokenizer (about half a second for 50k tokens). n_vocab is the
    model's logits width, which may be wider than the tokenizer's vocabulary; the tokenizer's stop tokens
    are what ends a grammar's text."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer.to_dict()["tokenizer_json"], n_vocab=max(n_vocab, tokenizer.vocab_size),
                                  eos_token=sorted(tokenizer.stop_ids))
