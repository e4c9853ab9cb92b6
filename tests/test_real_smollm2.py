"""The real SmolLM2-135M-Instruct GGUF: our greedy tokens equal transformers' from the same file."""

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Here are three tips for staying healthy:\n1.",
]
STEPS = 24


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(smollm2, hf_model, prompt):
    ids = smollm2.tokenizer.encode(prompt)
    ours = smollm2.generate_ids(ids, max_tokens=STEPS)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False,
                                eos_token_id=sorted(smollm2.tokenizer.stop_ids), pad_token_id=0)
    theirs = out[0, len(ids):].tolist()
    theirs = [t for t in theirs if t not in smollm2.tokenizer.stop_ids]
    assert len(ours) >= 1
    assert ours == theirs


def test_logits_match_transformers(smollm2, hf_model):
    ids = smollm2.tokenizer.encode(PROMPTS[2])
    ours = smollm2.logits(ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_chat_template_matches_transformers(smollm2, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],
    ]
    for messages in conversations:
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert smollm2.render_chat(messages) == expected


def test_chat_answer_stops_at_end_of_turn(smollm2):
    text = smollm2.generate(messages=[{"role": "user", "content": "Say hello."}], max_tokens=48)
    assert text.strip()
    assert "<|im_end|>" not in text
    assert smollm2.last_stats.generated_tokens <= 48


def test_stream_equals_generate(smollm2):
    args = dict(prompt="Write a haiku about the sea.", max_tokens=20, temperature=0.9, top_k=40, seed=7)
    pieces = list(smollm2.stream(**args))
    assert len(pieces) > 1
    assert "".join(pieces) == smollm2.generate(**args)  # the same seed samples the same tokens


def test_stop_string(smollm2):
    full = smollm2.generate("1, 2, 3, 4, 5,", max_tokens=16)
    assert " 7" in full
    cut = smollm2.generate("1, 2, 3, 4, 5,", max_tokens=16, stop=[" 7"])
    assert cut == full[: full.index(" 7")]
    assert smollm2.last_stats.finish_reason == "stop"


def test_prefix_reuse_gives_same_tokens(smollm2):
    """A second prompt that extends the first reuses cached keys; the result must not change."""
    a = smollm2.tokenizer.encode("The quick brown fox")
    b = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy")
    smollm2.generate_ids(a, max_tokens=3)
    reused = smollm2.generate_ids(b, max_tokens=8)
    smollm2.runner.tokens = []  # force a cold prefill
    cold = smollm2.generate_ids(b, max_tokens=8)
    assert reused == cold


def test_presence_and_frequency_penalties_through_the_api(smollm2):
    """OpenAI's penalties on greedy decoding equal an argmax over penalised full-sequence logits (the prompt
    and the tokens so far, last 64, as llama.cpp counts them), and they change a repetitive continuation."""
    from collections import Counter

    prompt = smollm2.tokenizer.encode("1, 1, 1, 1, 1, 1, 1,")
    got = smollm2.generate_ids(prompt, max_tokens=10, presence_penalty=0.5, frequency_penalty=1.5)
    ids, want = list(prompt), []
    for _ in range(10):
        row = smollm2.logits(ids)[-1].clone()
        for t, n in Counter(ids[-64:]).items():
            row[t] -= 1.5 * n + 0.5
        nxt = int(row.argmax())
        if nxt in smollm2.tokenizer.stop_ids:
            break
        want.append(nxt)
        ids.append(nxt)
    assert got == want
    assert got != smollm2.generate_ids(prompt, max_tokens=10)
    with pytest.raises(Exception, match="presence_penalty must be between -2 and 2"):
        smollm2.generate_ids(prompt, max_tokens=2, presence_penalty=3.0)
