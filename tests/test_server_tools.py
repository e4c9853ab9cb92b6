"""Tools in `ingot serve` end to end: real HTTP on 127.0.0.1, the openai client and plain httpx in front.

A tiny or random model does not call tools by itself, so most tests run a scripted stand-in: the real
SmolLM2 tokenizer with a real Qwen3 or Llama 3 chat template (tests/data/chat_templates) renders the
prompt, and the reply is a chosen text sent token by token through the tokenizer's stream decoder, split
where a real model's would be. One test sends tools to the real SmolLM2, whose template has no tool
support, to check the injected prompt is the one it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from ingot.chat_template import render_chat
from ingot.engine.generator import Stats
from ingot.server.app import create_app
from ingot.server.tool_prompt import inject
from tests.test_server import API_KEY, MODEL_ID, _Running, assert_error, post

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


class ScriptedModel:
    """Renders prompts like a Model and answers `reply`, one real token at a time."""

    max_context = 4096
    device = torch.device("cpu")

    def __init__(self, tokenizer, arch: str, template: str):
        self.tokenizer, self.arch, self.chat_template = tokenizer, arch, template
        self.reply = ""
        self.prompts: list[str] = []  # every prompt rendered, in order
        self.last_stats = Stats()

    def prompt_ids(self, prompt=None, messages=None, tools=None):
        text = render_chat(self.chat_template, messages, tools=tools) if messages is not None else prompt
        self.prompts.append(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream_ids(self, ids, max_tokens=16, **sampling):
        reply = self.tokenizer.encode(self.reply, add_special_tokens=False)
        stats = Stats(prompt_tokens=len(ids), finish_reason="stop" if len(reply) <= max_tokens else "length")
        decoder = self.tokenizer.stream_decoder()
        try:
            for token in reply[:max_tokens]:
                stats.generated_tokens += 1
                if piece := decoder.push(token):
                    yield piece
            if rest := decoder.flush():
                yield rest
        finally:
            self.last_stats = stats


@pytest.fixture(scope="module", params=[("qwen3", "qwen3.jinja"), ("llama", "llama3.2.jinja")],
                ids=["qwen3", "llama3.2"])
def scripted(request, smollm2):
    arch, template = request.param
    model = ScriptedModel(smollm2.tokenizer, arch, (TEMPLATES / template).read_text())
    running = _Running(create_app(model, "scripted", api_key=API_KEY))
    yield running, model
    running.stop()


@pytest.fixture(scope="module")
def qwen(smollm2):
    model = ScriptedModel(smollm2.tokenizer, "qwen3", (TEMPLATES / "qwen3.jinja").read_text())
    running = _Running(create_app(model, "scripted", api_key=API_KEY))
    yield running, model
    running.stop()


def client_of(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def call_text(arch: str, name: str, arguments: dict) -> str:
    """A call as the model of arch writes it."""
    if arch == "llama":
        return json.dumps({"name": name, "parameters": arguments})
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def stream(client, **kw) -> list:
    return list(client.chat.completions.create(model="scripted", stream=True, **kw))


# -- a call comes back as tool_calls -------------------------------------------------------------------------
def test_a_call_comes_back_as_tool_calls(scripted):
    server, model = scripted
    model.reply = call_text(model.arch, "get_weather", {"city": "Paris"})
    r = client_of(server).chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens == len(model.tokenizer.encode(model.reply, add_special_tokens=False))
    # the template rendered both tools itself
    prompt = model.prompts[-1]
    assert json.dumps(WEATHER, indent=4 if model.arch == "llama" else None) in prompt
    assert json.dumps(TIME, indent=4 if model.arch == "llama" else None) in prompt


def test_a_streamed_call_comes_in_tool_call_deltas(scripted):
    server, model = scripted
    model.reply = call_text(model.arch, "get_weather", {"city": "Paris"})
    chunks = stream(client_of(server), messages=ASK, tools=[WEATHER], stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # no call text as content
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id.startswith("call_")
    assert deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_text_that_is_no_call_is_content_streamed_or_not(scripted):
    server, model = scripted
    client = client_of(server)
    for reply in ["The weather in Paris is sunny, with a light breeze from the west.",
                  call_text(model.arch, "get_weather", {"city": "Paris"})[:-3],  # cut off: malformed
                  call_text(model.arch, "launch_rockets", {})]:  # a tool not offered
        model.reply = reply
        r = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER])
        assert r.choices[0].message.content == reply and r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"
        chunks = stream(client, messages=ASK, tools=[WEATHER])
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_plain_text_streams_piece_by_piece_with_tools_offered(scripted):
    server, model = scripted
    model.reply = "Sunny all day in Paris, twenty-one degrees, no rain expected before the weekend."
    chunks = stream(client_of(server), messages=ASK, tools=[WEATHER])
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 5 and "".join(pieces) == model.reply


def test_tool_choice_none_offers_no_tools_and_reads_no_calls(scripted):
    server, model = scripted
    model.reply = call_text(model.arch, "get_weather", {"city": "Paris"})
    r = client_of(server).chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == model.reply and r.choices[0].finish_reason == "stop"
    assert "get_weather" not in model.prompts[-1]


def test_a_required_call_needs_the_batching_engine(scripted):
    server, model = scripted
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = post(server, "/v1/chat/completions", {"model": "scripted", "messages": ASK, "tools": [WEATHER],
                                                  "tool_choice": choice}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert_error(r, 400, "tool_choice")


# -- Hermes: text beside calls, several calls ------------------------------------------------------------------
def test_text_before_calls_and_several_calls(qwen):
    server, model = qwen
    model.reply = "Let me check both.\n" + PARIS_CALL + "\n" + TIME_CALL
    client = client_of(server)
    r = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME])
    message = r.choices[0].message
    assert message.content == "Let me check both." and r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in message.tool_calls] == [{"city": "Paris"}, {}]
    assert len({c.id for c in message.tool_calls}) == 2
    chunks = stream(client, messages=ASK, tools=[WEATHER, TIME])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check both."
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the content came before the first call
    first_call = next(i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls)
    assert all(not c.choices[0].delta.content for c in chunks[first_call:])


def test_parallel_tool_calls_false_keeps_the_first_call(qwen):
    server, model = qwen
    model.reply = PARIS_CALL + "\n" + TIME_CALL
    r = client_of(server).chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME],
                                                   parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_plain_http_shapes(qwen):
    """The JSON itself, as OpenAI writes it: no tool_calls key without calls, one whole call per delta."""
    server, model = qwen
    model.reply = PARIS_CALL
    body = {"model": "scripted", "messages": ASK, "tools": [WEATHER]}
    message = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] is None
    assert message["tool_calls"] == [{"id": message["tool_calls"][0]["id"], "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    r = post(server, "/v1/chat/completions", {**body, "stream": True})
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    [call] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert call == [{"index": 0, "id": call[0]["id"], "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    model.reply = "Hello."
    message = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello."}


def test_a_conversation_with_calls_and_results_renders_through_the_template(qwen):
    server, model = qwen
    model.reply = "It is sunny in Paris."
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client_of(server).chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    prompt = model.prompts[-1]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n") in prompt
    # without tools in the request the history still renders
    client_of(server).chat.completions.create(model="scripted", messages=messages)
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in model.prompts[-1] and "<tools>" not in model.prompts[-1]


# -- the real SmolLM2: its template has no tools, so they are injected ------------------------------------------
@pytest.fixture(scope="module")
def smol_server(smollm2):
    running = _Running(create_app(smollm2, MODEL_ID, api_key=API_KEY))
    yield running
    running.stop()


def test_tools_on_a_template_without_tool_support_are_injected(smol_server, smollm2):
    body = {"model": MODEL_ID, "messages": ASK, "tools": [WEATHER], "max_tokens": 8, "temperature": 0}
    r = post(smol_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    chat = [{"role": "user", "content": ASK[0]["content"]}]
    injected = smollm2.render_chat(inject(chat, [WEATHER]))
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in injected
    assert r.json()["usage"]["prompt_tokens"] == len(smollm2.tokenizer.encode(injected, add_special_tokens=False))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)


# -- bad requests -----------------------------------------------------------------------------------------------
def _call(cid="c1", arguments='{"city": "Paris"}'):
    return {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "content": "sunny", "tool_call_id": "c9"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [_call()]}]}, "messages[0].tool_calls"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [_call(arguments="{not json")]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [_call(arguments='"Paris"')]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_malformed_tool_requests_are_400(qwen, extra, param):
    server, _ = qwen
    err = assert_error(post(server, "/v1/chat/completions", {"model": "scripted", "messages": ASK, **extra}), 400)
    assert err["param"] == param and param.split("[")[0].split(".")[0] in err["message"]


def test_a_template_that_refuses_the_tool_conversation_is_400(scripted):
    """Llama 3's template raises on two calls in one message; Qwen3's takes them."""
    server, model = scripted
    model.reply = "ok"
    two = ASK + [{"role": "assistant", "tool_calls": [_call("c1"), _call("c2")]},
                 {"role": "tool", "tool_call_id": "c1", "content": "a"}, {"role": "tool", "tool_call_id": "c2",
                                                                           "content": "b"}]
    r = post(server, "/v1/chat/completions", {"model": "scripted", "messages": two, "tools": [WEATHER]})
    if model.arch == "llama":
        assert "single tool-calls" in assert_error(r, 400)["message"]
    else:
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


def test_deprecated_functions_are_refused_by_name(qwen):
    server, _ = qwen
    body = {"model": "scripted", "messages": ASK, "functions": [WEATHER["function"]]}
    assert_error(post(server, "/v1/chat/completions", body), 400, param="functions", code="unsupported_parameter")
    body = {"model": "scripted", "messages": ASK, "function_call": "auto"}
    assert_error(post(server, "/v1/chat/completions", body), 400, param="function_call", code="unsupported_parameter")


# -- tools beside n and logprobs, on the batching engine ----------------------------------------------------
class ScriptedBackend:
    """Paged steps whose logits put the mass on the reply's next token, by position past the prompt (then
    the end-of-sequence token), so the batching engine, its samplers and its logprobs run for real."""

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos = vocab, eos
        self.prompt_len, self.reply = 0, []

    def new_paged_cache(self, n_blocks, block_size):
        from ingot.engine.kv_cache import PagedKVCache

        return PagedKVCache([(1, 2)], n_blocks, block_size, torch.device("cpu"), torch.float32)

    def paged_block_bytes(self, block_size):
        return 16 * block_size

    def forward_paged(self, seqs, cache):
        rows = torch.zeros(len(seqs), self.vocab)
        for i, (tokens, start, _) in enumerate(seqs):
            at = start + len(tokens) - self.prompt_len
            rows[i, self.reply[at] if 0 <= at < len(self.reply) else self.eos] = 40.0  # sure even sampled
        return rows


class BatchedScriptedModel(ScriptedModel):
    def __init__(self, tokenizer, arch, template):
        super().__init__(tokenizer, arch, template)
        self.spec = type("Spec", (), {"vocab_size": tokenizer.vocab_size})()
        self.backend = ScriptedBackend(tokenizer.vocab_size, min(tokenizer.stop_ids))

    def prompt_ids(self, prompt=None, messages=None, tools=None):
        ids = super().prompt_ids(prompt, messages, tools)
        self.backend.prompt_len = len(ids)
        self.backend.reply = self.tokenizer.encode(self.reply, add_special_tokens=False)
        return ids


@pytest.fixture(scope="module")
def batched(smollm2):
    model = BatchedScriptedModel(smollm2.tokenizer, "qwen3", (TEMPLATES / "qwen3.jinja").read_text())
    running = _Running(create_app(model, "scripted", api_key=API_KEY, max_batch=4, kv_blocks=512))
    yield running, model
    running.stop()


def test_each_of_n_choices_reads_its_own_calls_with_logprobs_for_its_text(batched):
    server, model = batched
    model.reply = "Let me <b>check</b>.\n" + PARIS_CALL  # "<b" is held until it is clearly no "<tool_call>"
    common = dict(messages=ASK, tools=[WEATHER], n=2, logprobs=True, top_logprobs=2)
    whole = client_of(server).chat.completions.create(model="scripted", **common)
    assert [c.index for c in whole.choices] == [0, 1]
    for c in whole.choices:
        assert c.finish_reason == "tool_calls" and c.message.content.strip() == "Let me <b>check</b>."
        [call] = c.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert c.logprobs.content and all(t.logprob > -0.1 and len(t.top_logprobs) == 2 for t in c.logprobs.content)
    chunks = stream(client_of(server), **common)
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        content = [ch for ch in mine if ch.delta.content]
        assert "".join(ch.delta.content for ch in content).strip() == "Let me <b>check</b>."
        # the text's tokens' logprobs come with the content (held-back text's with the next content sent)
        scored = [t for ch in content for t in (ch.logprobs.content if ch.logprobs else [])]
        assert "".join(t.token for t in scored).strip() == "Let me <b>check</b>."
        calls = [d for ch in mine for d in ch.delta.tool_calls or ()]
        assert len(calls) == 1 and calls[0].function.name == "get_weather"
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == ["tool_calls"]


def test_a_named_tool_choice_offers_that_tool_alone_and_enforces_it(batched):
    server, model = batched
    model.reply = PARIS_CALL
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client_of(server).chat.completions.create(model="scripted", messages=ASK, tools=[TIME, WEATHER],
                                                   tool_choice=choice)
    assert "get_weather" in model.prompts[-1] and "get_time" not in model.prompts[-1]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # the grammar admits no text: the reply's first token is masked away, and what is left is a call
    model.reply = "I'd rather not."
    r = client_of(server).chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME],
                                                   tool_choice="required", max_tokens=60)
    msg = r.choices[0].message
    assert msg.tool_calls or (msg.content or "").startswith("<tool_call>"), msg  # a call, or one cut off
