"""The server's per-request logits features end to end (real HTTP on 127.0.0.1, the embedded SmolLM2 on the
CPU reference backend): logprobs checked against a log_softmax of the reference's own logits."""

from __future__ import annotations

import json

import pytest
import torch

from ingot.server.app import create_app
from tests.test_server import CHAT, MODEL_ID, PROMPT, SlowModel, _Running, assert_error, post

TOL = 1e-3  # the batched paged step and the reference's forward_all add in different orders


@pytest.fixture(scope="module")
def server(smollm2):
    running = _Running(create_app(smollm2, MODEL_ID, max_batch=4, kv_blocks=96))
    yield running
    running.stop()


def reference_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the reference's logits at each generated token's step, (len(generated), vocab)."""
    logits = model.logits(prompt_ids + generated)[len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def token_text(model, token: int) -> str:
    return model.tokenizer.decode([token])


def check_top(top: list[tuple[str, float]], ref_row: torch.Tensor, model, k: int) -> None:
    """The reported alternatives are torch.topk of the reference row: the same numbers, most likely first,
    and the same tokens wherever the reference's order is not a near tie."""
    values, ids = ref_row.topk(k)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert torch.allclose(torch.tensor([lp for _, lp in top]), values, atol=TOL)
    v = values.tolist() + [float("-inf")]
    for i, (text, _) in enumerate(top):
        if (i == 0 or v[i - 1] - v[i] > TOL) and v[i] - v[i + 1] > TOL:
            assert text == token_text(model, int(ids[i]))


def test_chat_logprobs_are_the_reference_log_softmax(server, smollm2):
    r = post(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 6, "temperature": 0,
                                              "logprobs": True, "top_logprobs": 5})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    prompt_ids = smollm2.prompt_ids(messages=CHAT)
    generated = smollm2.generate_ids(prompt_ids, max_tokens=6)
    assert len(content) == len(generated) == 6
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    ref = reference_logprobs(smollm2, prompt_ids, generated)
    for entry, token, row in zip(content, generated, ref):
        assert entry["token"] == token_text(smollm2, token)
        assert bytes(entry["bytes"]) == entry["token"].encode()
        assert abs(entry["logprob"] - float(row.max())) < TOL  # greedy: the chosen token is the likeliest
        assert abs(entry["logprob"] - float(row[token])) < TOL
        assert len(entry["top_logprobs"]) == 5
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        check_top([(t["token"], t["logprob"]) for t in entry["top_logprobs"]], row, smollm2, 5)


def test_sampled_tokens_report_their_own_logprob(server, smollm2):
    """Sampled at a high temperature, the chosen tokens are often not the likeliest: each logprob is still
    the reference's for that token, and top_logprobs 0 gives none of the alternatives."""
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.5,
                                         "seed": 11, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    prompt_ids = smollm2.prompt_ids(PROMPT)
    generated = [i for t in lp["tokens"] for i in smollm2.tokenizer.encode(t, add_special_tokens=False)]
    assert len(generated) == len(lp["tokens"]), "each reported token re-encodes to itself"
    ref = reference_logprobs(smollm2, prompt_ids, generated)
    expected = ref[torch.arange(len(generated)), torch.tensor(generated)]
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), expected, atol=TOL)
    assert any(float(row.max()) - e > 0.1 for row, e in zip(ref, expected))  # not all greedy picks
    assert [list(top) for top in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]


def test_completion_logprobs_legacy_shape(server, smollm2):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                         "logprobs": 3})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt_ids = smollm2.prompt_ids(PROMPT)
    generated = smollm2.generate_ids(prompt_ids, max_tokens=6)
    ref = reference_logprobs(smollm2, prompt_ids, generated)
    assert lp["tokens"] == [token_text(smollm2, t) for t in generated]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(6)]
    for token, logprob, top, row in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], ref):
        assert abs(logprob - float(row.max())) < TOL
        assert len(top) == 3 and top[token] == logprob  # greedy: the chosen token is among the top 3
        check_top(sorted(top.items(), key=lambda kv: -kv[1]), row, smollm2, 3)


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_logprobs_equal_the_whole_response(server, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL_ID, "max_tokens": 5, "temperature": 0,
            **({"messages": CHAT, "logprobs": True, "top_logprobs": 2} if chat else {"prompt": PROMPT, "logprobs": 2})}
    whole = post(server, path, body).json()["choices"][0]["logprobs"]
    r = post(server, path, {**body, "stream": True})
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    if chat:
        assert [t for p in parts for t in p["content"]] == whole["content"]
    else:
        for key in whole:
            assert [x for p in parts for x in p[key]] == whole[key]


def test_no_logprobs_unless_asked(server):
    r = post(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2, "logprobs": False})
    assert r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),  # chat's is a boolean
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),  # the legacy one is a count
])
def test_bad_logprobs_are_refused(server, path, extra, param):
    base = {"model": MODEL_ID, "max_tokens": 1, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    assert_error(post(server, path, {**base, **extra}), 400, param=param)


@pytest.mark.parametrize("extra,param", [({"logprobs": 1}, "logprobs"), ({"n": 2}, "n"),
                                         ({"logit_bias": {"1": 5}}, "logit_bias")])
def test_the_serial_engine_refuses_them_by_name(extra, param):
    running = _Running(create_app(SlowModel(0.0), "slow"))
    try:
        err = assert_error(post(running, "/v1/completions", {"model": "slow", "prompt": "p", "max_tokens": 1, **extra}),
                           400, param=param)
        assert "--max-batch" in err["message"]
    finally:
        running.stop()


# -- n: independent choices ---------------------------------------------------------------------------------
STORY = ("Write the opening of a short story about a lighthouse keeper who finds a message in a bottle on the "
         "morning of the first winter storm, and tell it in the first person, in the past tense.")


def test_n_choices_differ_and_a_seed_reproduces_them(server, smollm2):
    body = {"model": MODEL_ID, "prompt": STORY, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3,
            "logprobs": 0}
    engine = server.app.state.engine
    hits = engine.blocks.hit_tokens
    first = post(server, "/v1/completions", body).json()
    shared = (len(smollm2.prompt_ids(STORY)) - 1) // 16 * 16
    assert shared >= 32 and engine.blocks.hit_tokens - hits == 2 * shared  # the 2 others found its prompt
    again = post(server, "/v1/completions", body).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert [c["text"] for c in again["choices"]] == texts
    usage = first["usage"]
    assert usage["prompt_tokens"] == len(smollm2.prompt_ids(STORY))
    assert usage["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in first["choices"])
    alone = post(server, "/v1/completions", {**body, "n": 1}).json()
    assert alone["choices"][0]["text"] == texts[0]  # choice i samples with seed + i


def test_n_choices_stream(server):
    body = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 4, "temperature": 1.0, "seed": 9, "n": 2,
            "stream_options": {"include_usage": True}}
    whole = post(server, "/v1/chat/completions", body).json()
    r = post(server, "/v1/chat/completions", {**body, "stream": True})
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    text, roles, finishes = ["", ""], [0, 0], [None, None]
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        i = choice["index"]
        text[i] += choice["delta"].get("content", "")
        roles[i] += choice["delta"].get("role") == "assistant"
        finishes[i] = finishes[i] or choice["finish_reason"]
    assert text == [c["message"]["content"] for c in whole["choices"]]
    assert roles == [1, 1] and finishes == [c["finish_reason"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == \
        whole["usage"]["completion_tokens"]


def test_n_beyond_the_batch_is_refused(server):
    err = assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "n": 5}), 400, param="n")
    assert "--max-batch" in err["message"]
    assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "n": 0}), 400, param="n")


# -- logit_bias ---------------------------------------------------------------------------------------------
def test_a_bias_of_100_forces_a_token(server, smollm2):
    forced = smollm2.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 3, "temperature": 0.7,
                                         "seed": 1, "logit_bias": {str(forced): 100}, "logprobs": 0})
    choice = r.json()["choices"][0]
    assert choice["text"] == smollm2.tokenizer.decode([forced] * 3)
    prompt_ids = smollm2.prompt_ids(PROMPT)
    ref = reference_logprobs(smollm2, prompt_ids, [forced] * 3)
    # the logprobs are the model's own, not the biased ones: the forced token is unlikely
    assert torch.allclose(torch.tensor(choice["logprobs"]["token_logprobs"]), ref[:, forced], atol=TOL)
    assert all(lp < -1 for lp in choice["logprobs"]["token_logprobs"])


def test_a_bias_of_minus_100_forbids_a_token(server, smollm2):
    prompt_ids = smollm2.prompt_ids(PROMPT)
    greedy = smollm2.generate_ids(prompt_ids, max_tokens=1)[0]
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    r = post(server, "/v1/completions", {**body, "logit_bias": {str(greedy): -100, "0": 1.5}})
    (token,) = r.json()["choices"][0]["logprobs"]["tokens"]
    row = reference_logprobs(smollm2, prompt_ids, [greedy])[0]
    runner_up = int(row.topk(2).indices[1])
    if float(row[0]) + 1.5 > float(row[runner_up]):  # the +1.5 on token 0 would then win instead
        runner_up = 0
    assert token == token_text(smollm2, runner_up) != token_text(smollm2, greedy)


@pytest.mark.parametrize("bias", [{"x": 1}, {"-1": 1}, {"1": 101}, {"1": -100.5}, {"1": "5"}, {"49152": 1}, [1]])
def test_bad_logit_bias_is_refused(server, bias):
    err = assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1,
                                                        "logit_bias": bias}), 400)
    assert err["param"].startswith("logit_bias")  # or the key at fault: logit_bias.1


# -- response_format: JSON enforced by llguidance, on a tiny model with random weights (whose text is garbage
# that the grammar must still shape into JSON) and SmolLM2's vocabulary ------------------------------------------
@pytest.fixture(scope="module")
def random_server(smollm2, tmp_path_factory):
    import ingot
    from tests.tiny_models import make_hf_model, save_hf

    folder = tmp_path_factory.mktemp("random-llama")
    save_hf(make_hf_model("llama", vocab_size=smollm2.tokenizer.vocab_size), folder)
    (folder / "tokenizer.json").write_text(smollm2.tokenizer.to_dict()["tokenizer_json"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "chat_template": smollm2.tokenizer.chat_template}))
    running = _Running(create_app(ingot.load(folder, device="cpu", max_context=512), "random", max_batch=8,
                                  kv_blocks=256))
    yield running
    running.stop()


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "fish"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}


def conforms(value, schema: dict) -> bool:
    """The part of JSON Schema that PERSON uses."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return (isinstance(value, dict) and set(schema["required"]) <= set(value) and set(value) <= set(props)
                and all(conforms(v, props[k]) for k, v in value.items()))
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema["maxItems"]
                and all(conforms(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "integer":
        return type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    return kind == "boolean" and isinstance(value, bool)


def random_chat(server, **body) -> list[dict]:
    r = post(server, "/v1/chat/completions", {"model": "random", "messages": [{"role": "user", "content": "Hi"}],
                                              **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def test_without_a_format_the_random_model_writes_no_json(random_server):
    for choice in random_chat(random_server, max_tokens=24, temperature=1.0, seed=0, n=4):
        with pytest.raises(ValueError):
            json.loads(choice["message"]["content"])


def test_json_schema_output_validates(random_server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choices = random_chat(random_server, max_tokens=160, temperature=1.0, seed=0, n=4, response_format=fmt)
    for choice in choices:
        assert choice["finish_reason"] == "stop", choice
        value = json.loads(choice["message"]["content"])
        assert conforms(value, PERSON), value
    assert len({c["message"]["content"] for c in choices}) == 4


def test_json_schema_on_text_completions(random_server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = post(random_server, "/v1/completions", {"model": "random", "prompt": "Hi", "max_tokens": 160, "seed": 3,
                                                "n": 2, "response_format": fmt}, timeout=120)
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop" and conforms(json.loads(choice["text"]), PERSON), choice


def test_json_schema_streamed_greedy(random_server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    body = {"model": "random", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 160, "temperature": 0,
            "response_format": fmt}
    r = post(random_server, "/v1/chat/completions", {**body, "stream": True}, timeout=120)
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert conforms(json.loads(text), PERSON) and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_json_object_output_parses(random_server):
    """Free-form strings may run to the token limit; every choice that ended is a JSON object."""
    choices = random_chat(random_server, max_tokens=64, temperature=1.5, seed=0, n=8,
                          response_format={"type": "json_object"})
    ended = [json.loads(c["message"]["content"]) for c in choices if c["finish_reason"] == "stop"]
    assert ended and all(isinstance(v, dict) for v in ended)
    assert any(ended), "one holds a key"
    assert all(c["message"]["content"].startswith("{") for c in choices)


@pytest.mark.parametrize("fmt", [
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"schema": PERSON}},  # no name
    {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": 3,
                                                                     "maxProperties": 1}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
])
def test_bad_response_formats_are_refused(random_server, fmt):
    r = post(random_server, "/v1/chat/completions", {"model": "random", "messages": CHAT, "max_tokens": 4,
                                                     "response_format": fmt})
    err = assert_error(r, 400)
    assert err["param"].startswith("response_format"), err
    assert random_server.health()["status"] == "ok"


def test_the_serial_engine_refuses_a_response_format():
    running = _Running(create_app(SlowModel(0.0), "slow"))
    try:
        err = assert_error(post(running, "/v1/chat/completions", {"model": "slow", "messages": CHAT, "max_tokens": 1,
                                                                  "response_format": {"type": "json_object"}}),
                           400, param="response_format")
        assert "--max-batch" in err["message"]
    finally:
        running.stop()


def test_a_required_tool_call_is_enforced_on_a_random_model(random_server):
    """Random weights never call a tool by themselves; with tool_choice the grammar makes every reply a call
    of an offered tool with arguments matching its parameters (bounded, so the call ends in the budget)."""
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {}, "additionalProperties": False}}}]
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        r = post(random_server, "/v1/chat/completions", {
            "model": "random", "messages": [{"role": "user", "content": "The weather?"}], "tools": tools,
            "tool_choice": choice, "parallel_tool_calls": False, "max_tokens": 120, "temperature": 0})
        c = r.json()["choices"][0]
        assert c["finish_reason"] == "tool_calls", c
        [call] = c["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] in names
        if call["function"]["name"] == "get_weather":
            assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 6
        else:
            assert args == {}
