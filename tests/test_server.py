"""`ingot serve`'s HTTP API end to end: a real uvicorn server on 127.0.0.1, the embedded SmolLM2 behind it,
the official openai client and plain httpx in front of it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from ingot.engine.generator import Stats
from ingot.server.app import create_app

MODEL_ID = "smollm2-135m"
API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"


def wait_healthy(url: str, seconds: float, check=lambda: True, status: int = 200) -> None:
    """Until GET /health answers `status`; `check` runs each round (e.g. fails if the server process died)."""
    deadline = time.monotonic() + seconds
    while True:
        check()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == status:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server at {url} did not come up"
        time.sleep(0.05)


class _Running:
    """A uvicorn server for `app` in a background thread, on a free loopback port."""

    def __init__(self, app, health_status: int = 200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url, 30, status=health_status)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (h := self.health())["busy"] or h["queued"]:
            assert time.monotonic() < deadline, "the engine stayed busy"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(smollm2):
    running = _Running(create_app(smollm2, MODEL_ID, api_key=API_KEY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def post(server, path, body, headers=AUTH, timeout=60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=timeout)


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


# -- the openai client --------------------------------------------------------------------------------------
def test_chat_greedy_equals_generate(server, client, smollm2):
    """No max_tokens: the reply may use the rest of the context, and ends at the model's stop token."""
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, temperature=0)
    server.wait_idle()
    expected = smollm2.generate(messages=CHAT, max_tokens=smollm2.max_context)
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    rendered = smollm2.tokenizer.encode(smollm2.render_chat(CHAT), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(rendered)
    assert r.usage.completion_tokens == smollm2.last_stats.generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL_ID and r.object == "chat.completion"


def test_chat_stream_equals_generate(server, client, smollm2):
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=CHAT, temperature=0, max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}))
    server.wait_idle()
    expected = smollm2.generate(messages=CHAT, max_tokens=6)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == smollm2.last_stats.prompt_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_greedy_equals_generate(server, client, smollm2):
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, temperature=0, max_tokens=8)
    server.wait_idle()
    assert r.choices[0].text == smollm2.generate(PROMPT, max_tokens=8)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(smollm2.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 8 == smollm2.last_stats.generated_tokens


def test_completion_stream_with_stop(server, client, smollm2):
    """A stop string ends the text (not included) with finish_reason "stop"; a one-string list is a prompt."""
    full = smollm2.generate(PROMPT, max_tokens=8)
    stop = full.strip().split()[1]  # a word in the greedy continuation, past its first
    chunks = list(client.completions.create(model=MODEL_ID, prompt=[PROMPT], temperature=0, max_tokens=8,
                                            stop=[stop], stream=True))
    server.wait_idle()
    text = "".join(c.choices[0].text for c in chunks)
    assert text == smollm2.generate(PROMPT, max_tokens=8, stop=[stop]) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks for it


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 40, "min_p": 0.05}, presence_penalty=0.5, frequency_penalty=0.5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens >= 1


def test_models(server, client):
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    r = httpx.get(f"{server.url}/v1/models", headers=AUTH)
    assert r.json()["object"] == "list" and r.json()["data"][0]["id"] == MODEL_ID


# -- plain HTTP: health, auth, errors -----------------------------------------------------------------------
def test_health_needs_no_key(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == MODEL_ID


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/nowhere"])
def test_auth_refused(server, headers, path):
    r = httpx.request("POST" if "completions" in path else "GET", f"{server.url}{path}", headers=headers,
                      json={"model": MODEL_ID, "messages": CHAT, "max_tokens": 1})
    assert_error(r, 401, code="invalid_api_key")


def test_auth_accepted(server):
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH).status_code == 200
    r = post(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


LONG = "one two three four " * 200  # over 512 tokens


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/chat/completions", b"{not json", 400, None, None),
    ("/v1/chat/completions", b"", 400, None, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None, None),
    ("/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [], "temperature": NaN}', 400, None, None),
    ("/v1/chat/completions", [1, 2], 400, None, None),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "model", None),
    ("/v1/chat/completions", {"model": MODEL_ID}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"content": "hi"}]}, 400, "messages[0].role", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    ("/v1/chat/completions", {"model": 7, "messages": CHAT}, 400, "model", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": -3}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2.5}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": "8"}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "temperature": -1}, 400, "temperature", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "presence_penalty": 3}, 400,
     "presence_penalty", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "stop": [1]}, 400, "stop", None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": CHAT, "max_tokens": 500}, 400, None,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": LONG}]}, 400, None,
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL_ID}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL_ID, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 2, 3]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": None, "seed": "x"}, 400, "seed", None),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": LONG, "max_tokens": 4}, 400, None, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "", "max_tokens": 4}, 400, None, None),
])
def test_bad_requests(server, path, body, status, param, code):
    assert_error(post(server, path, body), status, param, code)


@pytest.mark.parametrize("path,extra,field", [
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),  # deprecated for tools
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "messages[0].content"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
])
def test_unsupported_fields_refused_by_name(server, path, extra, field):
    base = {"model": MODEL_ID, "max_tokens": 1, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    err = assert_error(post(server, path, {**base, **extra}), 400, param=field, code="unsupported_parameter")
    assert "not supported" in err["message"]


def test_neutral_values_of_unsupported_fields_and_unknown_fields_pass(server):
    body = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 1, "n": 1, "logprobs": False,
            "response_format": {"type": "text"}, "tool_choice": "none", "user": "ada", "some_future_field": [1],
            "max_completion_tokens": 2}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2  # max_completion_tokens wins over max_tokens


def test_text_parts_are_joined(server, smollm2):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    r = post(server, "/v1/chat/completions", {"model": MODEL_ID, "max_tokens": 4, "temperature": 0,
                                              "messages": [{"role": "user", "content": parts}]})
    server.wait_idle()
    expected = smollm2.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                max_tokens=4)
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_client_closing_a_stream_stops_generation(server):
    server.wait_idle()
    before = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=5).text
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True,
            "stop": ["never-appears-in-output"]}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert first["object"] == "text_completion"
    server.wait_idle()
    after = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=5).text
    generated = metric(after, "ingot_generation_tokens_total") - metric(before, "ingot_generation_tokens_total")
    assert 1 <= generated < 300  # stopped at the next step, not run to the end
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_requests_tokens_and_latencies(server):
    server.wait_idle()
    scrape = lambda: httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=5)  # noqa: E731
    assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 401  # behind the key, like the API
    before = scrape()
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 8,
                                         "temperature": 0})
    usage = r.json()["usage"]
    assert_error(post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user",
                                                                                     "content": "hi"}]}), 404)
    after = scrape().text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before.text, name, **labels)

    assert delta("ingot_requests_total", endpoint="completions", status="200") == 1
    assert delta("ingot_requests_total", endpoint="chat/completions", status="404") == 1
    assert delta("ingot_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("ingot_generation_tokens_total") == usage["completion_tokens"] == 8
    assert delta("ingot_time_to_first_token_seconds_count") == 1
    assert 1 <= delta("ingot_inter_token_latency_seconds_count") <= 7
    assert metric(after, "ingot_queue_depth") == 0 and metric(after, "ingot_running_batch_size") == 0


def test_stream_ends_with_done(server):
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 2, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
# Bodies that are never a valid request: bytes that are no JSON object, JSON that is no object or an
# object without the required fields (random keys are never exactly "model" and "messages").
_bodies = (st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{"))
           | _json.filter(lambda v: not isinstance(v, dict)).map(json.dumps)
           | st.dictionaries(st.sampled_from(["model", "max_tokens", "temperature", "stream", "stop", "n"]), _json,
                             max_size=5).map(json.dumps))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_malformed_bodies_leave_the_server_up(server, body, path):
    r = post(server, path, body)
    assert_error(r, 400)
    assert server.health()["status"] == "ok"


# -- queueing and timeouts, on a stand-in model that emits one "x" per `delay` seconds -------------------------
class SlowModel:
    max_context = 256
    device = torch.device("cpu")

    def __init__(self, delay: float):
        self.delay = delay
        self.last_stats = Stats()
        self.gate = threading.Event()  # each token waits for it: a test that clears it holds generation still
        self.gate.set()

    def prompt_ids(self, prompt=None, messages=None):
        return [0, 1, 2, 3]

    def stream_ids(self, ids, max_tokens=16, **sampling):
        stats = Stats(prompt_tokens=4, finish_reason="length")
        try:
            for _ in range(max_tokens):
                time.sleep(self.delay)
                self.gate.wait(60)
                stats.generated_tokens += 1
                yield "x"
        finally:
            self.last_stats = stats


@pytest.fixture
def slow_server(request):
    model = SlowModel(0.05)
    running = _Running(create_app(model, "slow", max_queue=1, request_timeout=request.param))
    yield running, model
    running.stop()


@pytest.mark.parametrize("slow_server", [30.0], indirect=True)
def test_full_queue_answers_429(slow_server):
    server, model = slow_server
    body = {"model": "slow", "prompt": "p", "max_tokens": 20}
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(server, "/v1/completions", body)))
               for _ in range(2)]
    model.gate.clear()  # the running request cannot finish, and free its place, before the third arrives
    threads[0].start()
    until(lambda: server.health()["busy"])
    threads[1].start()
    until(lambda: server.health()["queued"])
    r = post(server, "/v1/completions", body)
    model.gate.set()
    assert_error(r, 429, code="queue_full")
    assert int(r.headers["Retry-After"]) >= 1
    for t in threads:
        t.join()
    assert [x.status_code for x in results] == [200, 200]
    assert all(x.json()["choices"][0]["text"] == "x" * 20 for x in results)


@pytest.mark.parametrize("slow_server", [30.0], indirect=True)
def test_too_long_requests_are_refused_on_arrival_not_at_their_turn(slow_server):
    server, model = slow_server
    runner = threading.Thread(target=post, args=(server, "/v1/completions",
                                                 {"model": "slow", "prompt": "p", "max_tokens": 40}))
    model.gate.clear()  # the runner holds the model until the refusal is checked: its turn would never come
    runner.start()
    until(lambda: server.health()["busy"])
    try:
        r = post(server, "/v1/completions", {"model": "slow", "prompt": "p", "max_tokens": 253})  # 4 + 253 > 256
        assert_error(r, 400, code="context_length_exceeded")
        assert server.health()["busy"]  # answered while the other still runs
    finally:
        model.gate.set()
    runner.join()


@pytest.mark.parametrize("slow_server", [0.5], indirect=True)
def test_request_timeout_stops_generation(slow_server):
    server, model = slow_server
    t0 = time.monotonic()
    r = post(server, "/v1/completions", {"model": "slow", "prompt": "p", "max_tokens": 60})  # 3 s untimed
    assert_error(r, 504, code="request_timeout")
    assert time.monotonic() - t0 < 2.5
    server.wait_idle()
    assert model.last_stats.generated_tokens < 60
    r = post(server, "/v1/completions", {"model": "slow", "prompt": "p", "max_tokens": 60, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"  # past the status: in the stream
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize("slow_server", [30.0], indirect=True)
def test_client_leaving_a_plain_request_stops_generation(slow_server):
    server, model = slow_server
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"model": "slow", "prompt": "p", "max_tokens": 200}, timeout=0.5)
    t0 = time.monotonic()
    server.wait_idle()
    assert time.monotonic() - t0 < 5  # 200 tokens would take 10 s
    assert model.last_stats.generated_tokens < 200


# -- the command ----------------------------------------------------------------------------------------------
def test_ingot_serve_command_drains_on_sigterm_and_exits_0():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ingot.cli", "serve", MODEL_ID, "--port", str(port), "-c", "256",
                             "--api-key", API_KEY, "--max-batch", "4", "--kv-blocks", "64"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 60, check=lambda: proc.poll() is None or pytest.fail(proc.stderr.read()))
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL_ID
        body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True,
                "stop": ["never-appears-in-output"]}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream: the request still runs to its end
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert f"{url}/v1" in err and "batches of up to 4, 64 KV blocks" in err
        assert "Application shutdown complete" in err
        with pytest.raises(httpx.TransportError):  # nothing listens any more
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
