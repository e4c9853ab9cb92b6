"""Tool calls read out of a model's reply as it streams, in the format the model was taught.

A reader takes the reply's text piece by piece (`push`, then `finish` at the end) and gives back, in order,
content to show (str) and the calls it found (Call). Text it holds back is text that may still turn out to
be a call; whatever does not (malformed JSON, a call to a tool that was not offered, an unclosed tag at
the end) goes out as content, so nothing the model wrote is lost.

Formats:
- "hermes" (Qwen2.5 / Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  any number of them, anywhere in the reply.
- "llama3" (Llama 3.1 / 3.2 JSON tool calling): the whole reply is `{"name": ..., "parameters": {...}}`,
  maybe after `<|python_tag|>`; several objects may follow one another, separated by `;`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ingot.engine.generator import _longest_stop_prefix as _longest_prefix_of


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict


class PlainReply:
    """No tools: all of the reply is content."""

    def __init__(self):
        self.calls = 0

    def push(self, text: str) -> list:
        return [text] if text else []

    def finish(self) -> list:
        return []


class _Reader:
    """What both formats share: which calls count, and whitespace around calls not shown as content."""

    def __init__(self, names: set[str], parallel: bool = True):
        self.names, self.parallel = names, parallel
        self.calls = 0  # calls given back so far
        self._space = ""  # trailing whitespace of the content so far, shown only if more content follows
        self._after_call = False  # the next content's leading whitespace is the call's, not content

    def _content(self, out: list, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        body = text.rstrip()
        if body:
            out.append(self._space + body)
            self._space = text[len(body):]
        else:
            self._space += text

    def _call(self, out: list, call: Call) -> None:
        self._space, self._after_call = "", True
        if self.parallel or not self.calls:  # parallel_tool_calls false: a call after the first is dropped
            out.append(call)
            self.calls += 1

    def _end(self, out: list) -> list:
        if self._space:  # the last content's trailing whitespace: no call follows it, so it is content
            out.append(self._space)
        self._space = ""
        return out

    def _call_of(self, obj) -> Call | None:
        """The call a parsed JSON value stands for: a known tool's name and an arguments object."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        return Call(obj["name"], args) if isinstance(args, dict) else None


class HermesReader(_Reader):
    """Content streams as it comes, but for a tail that may open a call; a call's body is held to its close."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, names: set[str], parallel: bool = True):
        super().__init__(names, parallel)
        self._held = ""  # text not given back yet: a possible start of OPEN, or a call's body
        self._inside = False  # _held is the body of an open <tool_call>

    def push(self, text: str) -> list:
        out, self._held = [], self._held + text
        while True:
            if not self._inside:
                start = self._held.find(self.OPEN)
                if start < 0:
                    keep = _longest_prefix_of(self._held, [self.OPEN])
                    self._content(out, self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    return out
                self._content(out, self._held[:start])
                self._held, self._inside = self._held[start + len(self.OPEN):], True
            else:
                end = self._held.find(self.CLOSE)
                if end < 0:
                    return out
                self._body(out, self._held[:end], closed=True)
                self._held, self._inside = self._held[end + len(self.CLOSE):], False

    def finish(self) -> list:
        out = []
        if self._inside:  # the reply ended inside a call: a complete JSON body still counts
            self._body(out, self._held, closed=False)
        else:
            self._content(out, self._held)
        self._held, self._inside = "", False
        return self._end(out)

    def _body(self, out: list, body: str, closed: bool) -> None:
        try:
            call = self._call_of(json.loads(body))
        except (ValueError, RecursionError):  # not JSON, or nested deeper than json reads
            call = None
        if call:
            self._call(out, call)
        else:
            self._content(out, self.OPEN + body + (self.CLOSE if closed else ""))


class Llama3Reader(_Reader):
    """A reply that opens with `{` or the tag is held to its end, since only the whole of it tells whether
    it is calls; any other reply streams as content from its first word."""

    TAG = "<|python_tag|>"

    def __init__(self, names: set[str], parallel: bool = True):
        super().__init__(names, parallel)
        self._held = ""
        self._mode = None  # None until the reply's start tells; then "text" or "call"

    def push(self, text: str) -> list:
        out = []
        if self._mode == "text":
            self._content(out, text)
            return out
        self._held += text
        if self._mode is None:
            start = self._held.lstrip()
            if start.startswith(("{", self.TAG)):
                self._mode = "call"  # held to the end: only the whole reply tells whether it is calls
            elif start and not self.TAG.startswith(start):
                self._mode = "text"
                self._content(out, self._held)
                self._held = ""
        return out

    def finish(self) -> list:
        out = []
        calls = self._calls_in(self._held) if self._mode == "call" else None
        if calls:
            for call in calls:
                self._call(out, call)
        else:
            self._content(out, self._held)
        self._held = ""
        return self._end(out)

    def _calls_in(self, text: str) -> list[Call] | None:
        """The calls text is made of, or None if it is anything else."""
        text = text.strip().removeprefix(self.TAG)
        decoder, calls, at = json.JSONDecoder(), [], 0
        while True:
            at = len(text) - len(text[at:].lstrip(" \t\n;"))
            if at == len(text):
                return calls or None
            try:
                obj, at = decoder.raw_decode(text, at)
            except (ValueError, RecursionError):
                return None
            call = self._call_of(obj)
            if call is None:
                return None
            calls.append(call)


READERS = {"hermes": HermesReader, "llama3": Llama3Reader}


def reader(fmt: str, names: set[str], parallel: bool = True):
    """A reader of the tool calls of format fmt ("hermes" or "llama3") to the tools named."""
    return READERS[fmt](names, parallel)


def split(reader, text: str) -> tuple[str, list[Call]]:
    """A whole reply's content and calls."""
    items = reader.push(text) + reader.finish()
    return "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, Call)]
