"""The batching server end to end: concurrent requests in one running batch, the prefix cache, KV blocks
freed on disconnect, and a fuzz that must leave every block free. Real HTTP on 127.0.0.1, the embedded
SmolLM2 on the CPU reference backend."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingot.engine.logits import greedy_tokens
from ingot.errors import IngotError
from ingot.server.app import create_app
from tests.test_server import AUTH, MODEL_ID, _Running, assert_error, metric, post, until

PROMPTS = [f"{subject} is" for subject in (
    "The capital of France", "A good breakfast", "The tallest mountain", "My favourite colour", "Python",
    "The speed of light", "A cat", "The first computer", "Winter in Canada", "The ocean", "A haiku about rain",
    "The moon", "Chess", "An apple a day", "The Roman empire", "Coffee")]


def scrape(server) -> str:
    return httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=5).text


def blocks_used(server) -> float:
    return metric(scrape(server), "ingot_kv_blocks_used")


@pytest.fixture(scope="module")
def server(smollm2):
    running = _Running(create_app(smollm2, MODEL_ID, api_key=AUTH["Authorization"][7:], max_batch=16,
                                  kv_blocks=256))
    yield running
    running.stop()


def concurrently(server, bodies, path="/v1/completions") -> list[httpx.Response]:
    results = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def one(i):
        start.wait()
        results[i] = post(server, path, bodies[i], timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_greedy_requests_batch_and_equal_each_alone(server, smollm2, monkeypatch):
    """Their tokens come from one argmax of the step's rows (greedy_tokens), as each row's own would."""
    import ingot.server.engine

    alone = [smollm2.generate(p, max_tokens=4) for p in PROMPTS]
    peak, done = [0.0], threading.Event()
    batched = []  # rows of each step's greedy_tokens

    def counted(logits):
        batched.append(len(logits))
        return greedy_tokens(logits)

    monkeypatch.setattr(ingot.server.engine, "greedy_tokens", counted)

    def watch():
        while not done.wait(0.05):  # a tight loop would take the CPU from the requests it watches
            peak[0] = max(peak[0], metric(scrape(server), "ingot_running_batch_size"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = concurrently(server, [{"model": MODEL_ID, "prompt": p, "max_tokens": 4, "temperature": 0}
                                        for p in PROMPTS])
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in results] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in results] == alone
    assert peak[0] > 1 and max(batched) > 1
    server.wait_idle()
    assert blocks_used(server) == 0


def test_a_small_step_budget_spreads_prompts_over_steps_and_gives_the_same_text(smollm2):
    """--step-tokens 4: every prompt is prefilled 4 tokens (less the running decodes) a step, next to the
    other requests' decode rows, and each request still returns what it returns alone."""
    running = _Running(create_app(smollm2, MODEL_ID, max_batch=4, kv_blocks=64, step_tokens=4))
    try:
        prompts = PROMPTS[:4]
        alone = [smollm2.generate(p, max_tokens=3) for p in prompts]
        results = concurrently(running, [{"model": MODEL_ID, "prompt": p, "max_tokens": 3, "temperature": 0}
                                         for p in prompts])
        assert [r.status_code for r in results] == [200] * len(prompts)
        assert [r.json()["choices"][0]["text"] for r in results] == alone
        assert running.app.state.engine.scheduler.step_tokens == 4
    finally:
        running.stop()


def test_each_sequence_samples_with_its_own_parameters(server, smollm2):
    """Seeded sampling, penalties and stop strings, different for each request of one batch, give what
    each gives alone."""
    kinds = [dict(temperature=0.8, seed=1, top_k=20), dict(temperature=1.3, seed=2, top_p=0.9),
             dict(temperature=0.7, seed=3, min_p=0.1, presence_penalty=1.0, frequency_penalty=0.5),
             dict(temperature=0, stop=[" the"])]
    prompts = PROMPTS[:len(kinds)]
    alone = [smollm2.generate(p, max_tokens=6, **k) for p, k in zip(prompts, kinds)]
    results = concurrently(server, [{"model": MODEL_ID, "prompt": p, "max_tokens": 6, **k}
                                    for p, k in zip(prompts, kinds)])
    assert [r.json()["choices"][0]["text"] for r in results] == alone
    assert len(set(alone)) == len(alone)


SYSTEM = ("You are a meticulous assistant for a small bakery in Lyon. You answer questions about bread, "
          "pastries, opening hours and prices. Opening hours are 7 to 19, Tuesday to Sunday. Prices are in "
          "euros. Keep every answer to one short sentence and never invent products that are not listed: "
          "baguette, croissant, pain au chocolat, brioche, tarte aux pommes.")


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_repeated_system_prompt_is_served_from_the_prefix_cache(smollm2, prefix_cache):
    running = _Running(create_app(smollm2, MODEL_ID, max_batch=4, kv_blocks=64, prefix_cache=prefix_cache))
    try:
        usages, texts = [], []
        for question in ("When do you open?", "How much is a croissant?"):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            r = post(running, "/v1/chat/completions", {"model": MODEL_ID, "messages": messages, "max_tokens": 5,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
            texts.append(r.json()["choices"][0]["message"]["content"])
            assert texts[-1] == smollm2.generate(messages=messages, max_tokens=5)
        first, second = (u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        assert first == 0
        if prefix_cache:
            assert 64 <= second < usages[1]["prompt_tokens"]  # the system prompt's full blocks
            assert metric(scrape(running), "ingot_prefix_cache_hit_rate") > 0
        else:
            assert second == 0
    finally:
        running.stop()


def test_disconnect_mid_stream_frees_the_blocks(server):
    server.wait_idle()
    idle, before = blocks_used(server), scrape(server)
    body = {"model": MODEL_ID, "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0, "stream": True,
            "stop": ["never-appears-in-output"]}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert blocks_used(server) > idle
    until(lambda: blocks_used(server) == idle and server.health()["running"] == 0)
    name = "ingot_generation_tokens_total"
    generated = metric(scrape(server), name) - metric(before, name)
    assert 1 <= generated < 300  # stopped early, not run to the end


def test_waiting_requests_over_the_queue_limit_get_429(smollm2, monkeypatch):
    """--max-queue counts the requests that wait for a place in the batch, not the running ones."""
    import ingot.server.engine

    # the running request's steps wait for the gate, so it cannot finish (and free its place) before the third
    # request arrives, however fast the machine
    gate = threading.Event()
    monkeypatch.setattr(ingot.server.engine, "greedy_tokens",
                        lambda logits: gate.wait(60) and greedy_tokens(logits))
    running = _Running(create_app(smollm2, MODEL_ID, max_batch=1, max_queue=1, kv_blocks=64))
    try:
        body = {"model": MODEL_ID, "prompt": PROMPTS[1], "max_tokens": 30, "temperature": 0}
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(running, "/v1/completions", body)))
                   for _ in range(2)]
        threads[0].start()
        until(lambda: running.health()["running"] == 1)
        threads[1].start()
        until(lambda: running.health()["queued"] == 1)
        assert_error(post(running, "/v1/completions", body), 429, code="queue_full")
        gate.set()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200, 200]
    finally:
        gate.set()
        running.stop()


# -- fuzz: random batches of random requests (some of several choices), some abandoned mid-stream, on a cache
# small enough that sequences get preempted and cached blocks evicted ----------------------------------------------
_request = st.fixed_dictionaries(
    {"prompt": st.text(max_size=60) | st.sampled_from(PROMPTS), "max_tokens": st.integers(1, 3)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(0, 50),
              "min_p": st.floats(0, 1), "seed": st.integers(-2**40, 2**40), "presence_penalty": st.floats(-2, 2),
              "stop": st.lists(st.text(max_size=3), max_size=3), "stream": st.booleans(),
              "n": st.integers(1, 2), "logprobs": st.integers(0, 5),
              "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3),
              "abandon": st.booleans()})


@pytest.fixture(scope="module")
def small_server(smollm2):
    # 40 blocks: 640 positions, a little over one context of 512, for 4 sequences at once
    running = _Running(create_app(smollm2, MODEL_ID, max_batch=4, kv_blocks=40, max_queue=64))
    yield running
    running.stop()


def _fuzz_one(server, body, out, errors):
    try:
        _fuzz_request(server, body, out)
    except Exception as e:  # re-raised by the test: an assertion in a thread would only warn
        errors.append(e)


def _fuzz_request(server, body, out):
    body = {"model": MODEL_ID, **body}
    abandon = body.pop("abandon", False)
    if abandon and body.get("stream"):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            out.append(r.status_code)
            next(r.iter_lines(), None)
        return
    r = post(server, "/v1/completions", body, headers={}, timeout=120)
    out.append(r.status_code)
    if r.status_code == 200 and not body.get("stream"):
        c = r.json()
        assert len(c["choices"]) == body.get("n", 1)
        assert c["usage"]["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)
        assert all(choice["finish_reason"] in ("stop", "length") for choice in c["choices"])
    elif r.status_code != 200:
        assert_error(r, 400)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(_request, min_size=1, max_size=8))  # ~225 requests in all
def test_fuzz_leaves_the_server_up_and_every_block_free(small_server, batch):
    out, errors = [], []
    threads = [threading.Thread(target=_fuzz_one, args=(small_server, b, out, errors)) for b in batch]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert len(out) == len(batch) and set(out) <= {200, 400}
    until(lambda: small_server.health()["running"] == 0 and small_server.health()["queued"] == 0, timeout=60)
    assert blocks_used(small_server) == 0


# -- sizing the KV cache at start-up ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(kv_blocks=31), "fewer than one context of 512"),  # 31 * 16 = 496 positions
    (dict(kv_cache_gb=0.001), "fewer than one context"),
    (dict(kv_cache_gb=-1.0), "must be positive"),
    (dict(kv_blocks=64, kv_cache_gb=1.0), "not both"),
    (dict(max_batch=0), "at least 1"),
    (dict(step_tokens=0), "--step-tokens must be at least 1"),
])
def test_bad_kv_cache_sizes_are_refused_at_start(smollm2, kw, message):
    with pytest.raises(IngotError, match=message):
        create_app(smollm2, MODEL_ID, **kw)


def test_kv_cache_gb_sets_the_number_of_blocks(smollm2):
    app = create_app(smollm2, MODEL_ID, kv_cache_gb=0.05)
    engine = app.state.engine
    try:
        per_block = smollm2.backend.paged_block_bytes(16)  # 30 layers, K and V, 16 x 3 heads x 64, fp32
        assert per_block == 2 * 30 * 16 * 3 * 64 * 4
        assert engine.blocks.n_blocks == int(0.05 * 2**30 // per_block)
        assert engine.cache.nbytes == engine.blocks.n_blocks * per_block
    finally:
        engine.close()


def test_engine_choice(smollm2, monkeypatch):
    """Paged batching wherever the backend has paged steps, except one sequence at a time on a backend
    that replays captured decode graphs (CUDA), where Model.stream_ids is the faster path."""
    from ingot.server.engine import BatchEngine, SerialEngine, make_engine

    def kind(**batching):
        engine = make_engine(smollm2, **batching)
        engine.close()
        return type(engine)

    assert kind(max_batch=1, kv_blocks=64) is BatchEngine and kind(max_batch=4, kv_blocks=64) is BatchEngine
    monkeypatch.setattr(smollm2.backend, "use_graph", True, raising=False)
    assert kind(max_batch=1) is SerialEngine and kind(max_batch=4, kv_blocks=64) is BatchEngine


def test_a_dead_engine_fails_requests_and_health_rather_than_hanging(smollm2, monkeypatch):
    from ingot.server.engine import BatchEngine

    def broken(self):
        raise RuntimeError("no device")

    monkeypatch.setattr(BatchEngine, "_work", broken)
    running = _Running(create_app(smollm2, MODEL_ID, api_key=AUTH["Authorization"][7:], max_batch=2, kv_blocks=64),
                       health_status=503)
    try:
        health = httpx.get(f"{running.url}/health", timeout=5).json()
        assert health["status"] == "error" and "RuntimeError: no device" in health["error"]
        r = post(running, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert_error(r, 503, code="engine_down")
        assert "restart the server" in r.json()["error"]["message"]
    finally:
        running.stop()
