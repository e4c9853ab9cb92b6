"""Tool calls read out of replies (ingot/server/tool_calls.py) and tools put into prompts
(ingot/server/tool_prompt.py), on strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingot.chat_template import builtin_template
from ingot.formats.gguf import read_metadata
from ingot.server.tool_calls import Call, HermesReader, Llama3Reader, PlainReply, reader, split
from ingot.server.tool_prompt import ToolFormat, inject, prompt_inputs, tool_format, tool_instructions

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
NAMES = {"get_weather", "get_time"}
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}'


def hermes(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def streamed(r, text: str, step: int) -> list:
    """The reader's items for text pushed `step` characters at a time, with adjacent content merged."""
    items = []
    for i in range(0, len(text), step):
        items += r.push(text[i:i + step])
    items += r.finish()
    merged = []
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return merged


PARIS = Call("get_weather", {"city": "Paris", "unit": "C"})
ZONE = Call("get_time", {"zone": "Europe/Paris"})


@pytest.mark.parametrize("text,items", [
    (hermes(WEATHER), [PARIS]),
    ("Let me look that up.\n\n" + hermes(WEATHER), ["Let me look that up.", PARIS]),
    (hermes(WEATHER) + "\n" + hermes(TIME), [PARIS, ZONE]),
    (hermes(WEATHER) + "\nDone, one more:\n" + hermes(TIME) + "\n", [PARIS, "Done, one more:", ZONE]),
    # "parameters" (Llama's word) and arguments written as JSON text are read too; no arguments is {}
    (hermes('{"name": "get_time", "parameters": {"zone": "UTC"}}'), [Call("get_time", {"zone": "UTC"})]),
    (hermes('{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}'), [Call("get_time", {"zone": "UTC"})]),
    (hermes('{"name": "get_time"}'), [Call("get_time", {})]),
    # the reply ends inside a call whose JSON is whole: still a call
    ("<tool_call>\n" + WEATHER + "\n", [PARIS]),
])
def test_hermes_calls(text, items):
    assert streamed(HermesReader(NAMES), text, len(text)) == items


@pytest.mark.parametrize("text", [
    "Just text, no calls.\n",
    hermes('{"name": "get_weather", "arguments": {"city": "Par'),  # malformed JSON
    hermes('{"name": "launch_rockets", "arguments": {}}'),  # a tool that was not offered
    hermes('{"name": "get_weather", "arguments": [1, 2]}'),  # arguments not an object
    hermes('["get_weather"]'),
    hermes('{"name": ["get_weather"], "arguments": {}}'),  # a name that is no string
    hermes("[" * 5000 + "]" * 5000),  # nested deeper than json reads
    "<tool_call>\n" + '{"name": "get_weather", "argu',  # cut off inside a call
    "a < b and <tool but no call",
    "ends with a partial tag <tool_ca",
])
def test_hermes_text_that_is_no_call_is_content(text):
    assert streamed(HermesReader(NAMES), text, len(text)) == [text]


def test_hermes_keeps_good_calls_beside_a_bad_one():
    bad = hermes('{"name": oops}')
    assert streamed(HermesReader(NAMES), hermes(WEATHER) + "\n" + bad, 7) == [PARIS, bad]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 11])
def test_hermes_streamed_in_pieces_reads_as_whole(step):
    text = "Sure thing.\n" + hermes(WEATHER) + "\n" + hermes(TIME)
    assert streamed(HermesReader(NAMES), text, step) == ["Sure thing.", PARIS, ZONE]


def test_hermes_streams_content_before_a_call_at_once_and_holds_a_possible_tag():
    r = HermesReader(NAMES)
    assert r.push("Checking the weather") == ["Checking the weather"]
    assert r.push(" now <tool") == [" now"]  # " <tool" may open a call: held back
    assert r.push("_call>\n" + WEATHER[:20]) == []
    assert r.push(WEATHER[20:] + "\n</tool_call>") == [PARIS]
    assert r.finish() == [] and r.calls == 1


def test_hermes_parallel_off_keeps_the_first_call_only():
    r = HermesReader(NAMES, parallel=False)
    assert split(r, hermes(WEATHER) + "\n" + hermes(TIME)) == ("", [PARIS])


def test_hermes_keeps_a_plain_replys_whitespace():
    assert split(HermesReader(NAMES), "  indented\n\nand trailing  \n") == ("  indented\n\nand trailing  \n", [])


LLAMA_WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'

# Replies made of the pieces that matter to the readers, cut anywhere into stream pieces.
_FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "<|python_tag|>", "<|py", WEATHER, LLAMA_WEATHER, TIME,
              '{"name": ', "}", ";", " ", "\n", "Hi", "<", "é"]
_replies = st.lists(st.sampled_from(_FRAGMENTS), max_size=10).map("".join)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=_replies, cuts=st.lists(st.integers(0, 400), max_size=8), fmt=st.sampled_from(["hermes", "llama3"]))
def test_streamed_in_any_pieces_reads_as_whole_and_loses_no_text(text, cuts, fmt):
    at_once = reader(fmt, NAMES)
    whole = at_once.push(text) + at_once.finish()
    r, at, items = reader(fmt, NAMES), 0, []
    for cut in sorted(c for c in cuts if c <= len(text)) + [len(text)]:
        items += r.push(text[at:cut])
        at = cut
    items += r.finish()
    content, calls = "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, Call)]
    assert (content, calls) == ("".join(i for i in whole if isinstance(i, str)),
                                [i for i in whole if isinstance(i, Call)])
    if not calls:  # what is not a call is all there, unchanged
        assert content == text


@pytest.mark.parametrize("text,items", [
    (LLAMA_WEATHER, [PARIS]),
    ("<|python_tag|>" + LLAMA_WEATHER, [PARIS]),
    ("\n " + LLAMA_WEATHER + "\n", [PARIS]),
    (LLAMA_WEATHER + "; " + TIME, [PARIS, ZONE]),
    ("<|python_tag|>" + TIME, [ZONE]),
])
def test_llama3_calls(text, items):
    for step in (1, 4, len(text)):
        assert streamed(Llama3Reader(NAMES), text, step) == items


@pytest.mark.parametrize("text", [
    "Paris is sunny today.",
    '{"name": "get_weather", "parameters": {"city": "Par',  # malformed
    '{"answer": 42}',  # JSON, but no call
    LLAMA_WEATHER + " and some words after it",
    'The call would be {"name": "get_weather", "parameters": {}}',  # text before: not a call
    '{"name": "unknown_tool", "parameters": {}}',
    '{"name": {"n": 1}, "parameters": {}}',
    '{"name": "get_time", "parameters": {"a": ' + "[" * 5000 + "]" * 5000 + "}}",  # nested deeper than json reads
    "<|python_tag|>brave_search.call(query=\"paris\")",  # a built-in tool's Python call: not JSON
    "<|python",
])
def test_llama3_text_that_is_no_call_is_content(text):
    for step in (1, 3, len(text)):
        assert streamed(Llama3Reader(NAMES), text, step) == [text]


def test_llama3_streams_text_as_soon_as_it_is_not_a_call():
    r = Llama3Reader(NAMES)
    assert r.push("  ") == [] and r.push("<|py") == []
    r = Llama3Reader(NAMES)
    assert r.push(" The") == [" The"] and r.push(" sky") == [" sky"]
    r = Llama3Reader(NAMES)
    assert r.push('{"name": "get_weather", ') == []  # a call is only known whole
    assert r.push('"parameters": {"city": "Paris", "unit": "C"}}') == []
    assert r.finish() == [PARIS]


def test_plain_reply_passes_everything_through():
    r = PlainReply()
    assert streamed(r, hermes(WEATHER), 4) == [hermes(WEATHER)] and r.calls == 0
    assert isinstance(reader("hermes", NAMES), HermesReader) and isinstance(reader("llama3", NAMES), Llama3Reader)


# ---- tools into the prompt -----------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    {"role": "tool", "content": "rainy", "tool_call_id": "c2"},
]


@pytest.mark.parametrize("template,arch,expected", [
    ("qwen3.jinja", "qwen3", ToolFormat("hermes", native=True)),
    ("qwen3.jinja", "qwen3moe", ToolFormat("hermes", native=True)),
    ("llama3.1.jinja", "llama", ToolFormat("llama3", native=True)),
    ("llama3.2.jinja", "llama", ToolFormat("llama3", native=True)),
    ("llama3.2.jinja", "gemma3", ToolFormat("hermes", native=False)),  # a call format no reader knows
])
def test_tool_format_of_real_templates(template, arch, expected):
    assert tool_format(arch, (TEMPLATES / template).read_text()) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_templates_without_tools_get_them_injected(arch, smollm2_path):
    smollm2_template = read_metadata(smollm2_path)["tokenizer.chat_template"]
    assert tool_format(arch, builtin_template(arch)) == ToolFormat("hermes", native=False)
    assert tool_format(arch, smollm2_template) == ToolFormat("hermes", native=False)


def test_injection_writes_tools_and_tool_turns_as_text():
    out = inject([{"role": "system", "content": "Be brief."}, *HISTORY], TOOLS)
    assert out[0] == {"role": "system", "content": "Be brief.\n\n" + tool_instructions(TOOLS)}
    assert json.dumps(TOOLS[0]) in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[1] == HISTORY[0]
    assert out[2] == {"role": "assistant", "content":
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>\n"
                                                 "<tool_response>\nrainy\n</tool_response>"}
    assert len(out) == 4


def test_injection_without_a_system_message_adds_one_and_leaves_the_input_alone():
    messages = [{"role": "user", "content": "hi"}]
    assert inject(messages, TOOLS) == [{"role": "system", "content": tool_instructions(TOOLS)}, messages[0]]
    assert inject(messages, None) == messages and messages == [{"role": "user", "content": "hi"}]
    kept = inject([{"role": "assistant", "content": "Let me see.", "tool_calls": HISTORY[1]["tool_calls"][:1]}], None)
    assert kept[0]["content"].startswith("Let me see.\n<tool_call>\n")


def test_prompt_inputs():
    native, injected = ToolFormat("hermes", native=True), ToolFormat("hermes", native=False)
    assert prompt_inputs(native, HISTORY, TOOLS) == {"messages": HISTORY, "tools": TOOLS}
    assert prompt_inputs(native, HISTORY, None) == {"messages": HISTORY}
    assert prompt_inputs(injected, HISTORY, TOOLS) == {"messages": inject(HISTORY, TOOLS)}
