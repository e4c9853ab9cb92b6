"""Structured output: a JSON schema enforced while decoding, with llguidance. Before each sample the
grammar's mask of the tokens that may come next sets every other logit to -inf; the sampled token is then
fed to the grammar. The model's stop tokens are the grammar's end: allowed only once the text is complete.

llguidance is imported where it is used, so a server whose requests ask for none of this (nor for logprobs,
which take the tokens' bytes from its tokenizer) runs where it is not installed (the GPU benchmark machine
carries only the plain server's wheels)."""

from __future__ import annotations

import functools

import torch

from ingot.errors import IngotError
from ingot.tokenizer import Tokenizer

# Between JSON tokens: room for pretty printing, but bounded, so that a model (random weights, say) cannot
# fill its whole budget with whitespace and never close the object.
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"


class GrammarError(IngotError):
    """A schema llguidance cannot compile (or that no text satisfies)."""


@functools.lru_cache(maxsize=4)
def ll_tokenizer(tokenizer: Tokenizer, n_vocab: int):
    """llguidance.LLTokenizer, built once per tokenizer (about half a second for 50k tokens). n_vocab is the
    model's logits width, which may be wider than the tokenizer's vocabulary."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer.to_dict()["tokenizer_json"], n_vocab=max(n_vocab, tokenizer.vocab_size),
                                  eos_token=sorted(tokenizer.stop_ids))


def json_grammar(schema: dict) -> str:
    """llguidance's grammar for text that is JSON matching `schema` (checked against a tokenizer by
    check_grammar)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": WHITESPACE})


def tool_call_grammar(fmt: str, tools: list[dict], several: bool) -> str:
    """llguidance's grammar for a reply that is only tool calls, in the format the reply is read in (see
    ingot/server/tool_calls.py): "hermes", one or (several) more `<tool_call>\\n{"name", "arguments"}\\n</tool_call>`
    blocks; "llama3", one `{"name", "parameters"}` object. Each call names one of the OpenAI `tools`, with
    arguments matching that tool's parameters schema."""
    import json

    import llguidance

    key = "arguments" if fmt == "hermes" else "parameters"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                key: t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False} for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    call = "call: %json " + json.dumps({**schema, "x-guidance": {"whitespace_pattern": WHITESPACE}})
    if fmt != "hermes":
        return llguidance.LLMatcher.grammar_from_lark("start: call\n" + call)
    block = 'block: "<tool_call>\\n" call "\\n</tool_call>"'
    start = 'start: block ("\\n" block)*' if several else "start: block"
    return llguidance.LLMatcher.grammar_from_lark("\n".join([start, block, call]))


def check_grammar(grammar: str, vocabulary) -> None:
    """GrammarError with llguidance's message if the grammar does not compile."""
    import llguidance

    if message := llguidance.LLMatcher.validate_grammar(grammar, vocabulary):
        raise GrammarError(message)


class Constraint:
    """One sequence's grammar: which tokens may come next, and the tokens it took so far."""

    def __init__(self, grammar: str, vocabulary):
        import llguidance

        self.matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        self._check()
        self._bits = torch.arange(8, dtype=torch.uint8)

    def _check(self) -> None:
        if self.matcher.is_error():  # checked at the request's arrival, so this is llguidance's own limit
            raise GrammarError(f"the response format's grammar failed: {self.matcher.get_error()}")

    def mask_(self, row: torch.Tensor) -> None:
        """Set the logits of the tokens the grammar does not allow next to -inf, in place (on the row's
        device: the mask, one bit a token, is what travels)."""
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8).to(row.device)
        self._check()
        if self._bits.device != row.device:
            self._bits = self._bits.to(row.device)
        allowed = ((packed.unsqueeze(1) >> self._bits) & 1).reshape(-1)[:row.numel()].bool()  # token 8i + j: bit j
        row.masked_fill_(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise GrammarError(f"the response format's grammar refused token {token}")

    @property
    def stopped(self) -> bool:
        """The grammar's text is complete and nothing may follow it."""
        return self.matcher.is_stopped()
