"""The synthetic GGUF files carry what llama.cpp's loader requires, so llama-bench loads them as it loads Ingot's.

The lists below are written from llama.cpp's source (the copy vendored by llama-cpp-python 0.3.36, ggml 0.25.3):
src/llama-model.cpp (llama_model_base::load_hparams), src/models/gemma3.cpp (load_arch_hparams /
load_arch_tensors), src/llama-vocab.cpp (llama_vocab::impl::load) and src/llama-arch.cpp (the names). A key of
the wrong GGUF type, an unknown tokenizer name, a missing tensor, a tensor of another shape or one tensor too many
each make llama.cpp's loader throw, and llama-bench then says only "failed to load model".
"""

from __future__ import annotations

import warnings

import pytest

import ingot
from ingot.bench import synthetic

U32, F32, STR, ARR, I32 = "UINT32", "FLOAT32", "STRING", "ARRAY", "INT32"

# llama-vocab.cpp: the tokenizer.ggml.model values it knows (anything else: "unknown tokenizer: '...'").
LLAMA_CPP_TOKENIZER_MODELS = {"no_vocab", "none", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv",
                              "test", "plamo2", "gemma4"}
# llama-vocab.cpp: the tokenizer.ggml.pre values it knows for a BPE ("gpt2") vocabulary; anything else:
# "unknown pre-tokenizer type: '...'". (Its GPT-2 regex is named "gpt-2"; "gpt2" is not in the list.)
LLAMA_CPP_BPE_PRE = {
    "default", "minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano", "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "falcon", "mpt",
    "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
    "modern-bert", "jais-2", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "jina-v1-en", "jina-v2-code",
    "roberta-bpe", "whitespace", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "qwen35",
    "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe", "glm4", "glm5", "viking", "jais", "tekken",
    "smollm", "codeshell", "bloom", "gpt3-finnish", "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b",
    "megrez", "gpt-4o", "llama4", "kanana2", "talkie", "granite-embed-multi-97m", "tiny_aya", "cohere2moe",
    "superbpe", "trillion", "granite-docling", "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder", "hunyuan",
    "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2", "ufakzeka", "grok-2", "afmoe", "laguna", "minimax-m2",
    "solar-open", "mellum2",
}

# The keys llama.cpp reads for gemma3, with the GGUF type it insists on (llama-model-loader.cpp: "key ... has
# wrong type"). Required ones throw when absent; the others default to values that would not be this model.
GEMMA3_KEYS = {
    "general.architecture": STR,
    "gemma3.context_length": U32,  # required (load_hparams)
    "gemma3.embedding_length": U32,  # required
    "gemma3.block_count": U32,  # required
    "gemma3.attention.layer_norm_rms_epsilon": F32,  # required (gemma3.cpp)
    "gemma3.feed_forward_length": U32,
    "gemma3.attention.head_count": U32,
    "gemma3.attention.head_count_kv": U32,
    "gemma3.attention.key_length": U32,
    "gemma3.attention.value_length": U32,
    "gemma3.attention.sliding_window": U32,  # > 0: the interleaved sliding-window graph (pattern 6)
    "gemma3.rope.freq_base": F32,
    "tokenizer.ggml.model": STR,  # required (llama-vocab.cpp)
    "tokenizer.ggml.tokens": (ARR, STR),  # required
    "tokenizer.ggml.token_type": (ARR, I32),
    "tokenizer.ggml.merges": (ARR, STR),  # required for "gpt2"
    "tokenizer.ggml.bos_token_id": U32,
    "tokenizer.ggml.eos_token_id": U32,
}


def gemma3_tensors(n_layer, n_embd, n_vocab, n_ff, n_head, n_head_kv, head_dim) -> dict[str, tuple[int, ...]]:
    """src/models/gemma3.cpp load_arch_tensors, in GGML order (ne0 first), for a tied-embedding file."""
    t = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t.update({
            p + "attn_norm.weight": (n_embd,),
            p + "attn_q.weight": (n_embd, head_dim * n_head),  # create_tensor_qkv, unfused
            p + "attn_k.weight": (n_embd, head_dim * n_head_kv),
            p + "attn_v.weight": (n_embd, head_dim * n_head_kv),
            p + "attn_output.weight": (head_dim * n_head, n_embd),
            p + "post_attention_norm.weight": (n_embd,),
            p + "attn_k_norm.weight": (head_dim,),
            p + "attn_q_norm.weight": (head_dim,),
            p + "ffn_norm.weight": (n_embd,),
            p + "ffn_gate.weight": (n_embd, n_ff),
            p + "ffn_up.weight": (n_embd, n_ff),
            p + "ffn_down.weight": (n_ff, n_embd),
            p + "post_ffw_norm.weight": (n_embd,),
        })
    return t


def _fields(path):
    import gguf

    r = gguf.GGUFReader(path)
    types = {}
    for k, f in r.fields.items():
        ts = [t.name for t in f.types]
        types[k] = (ts[0], ts[1]) if ts and ts[0] == ARR else (ts[0] if ts else None)
    return r, types, {k: f.contents() for k, f in r.fields.items()}


def _small(tmp_path, key, quant="q8_0"):
    # gguf-py's reader is slow over a 262k vocabulary on a slow CPU; the layout is the same with 1024.
    return synthetic.write_synthetic_gguf(key, quant, tmp_path / f"{key}.gguf", layers=2, progress=False,
                                          overrides={"vocab_size": 1024})


@pytest.mark.parametrize("key", ["llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b"])
def test_tokenizer_names_are_ones_llama_cpp_knows(tmp_path, key):
    _, _, v = _fields(_small(tmp_path, key))
    assert v["tokenizer.ggml.model"] in LLAMA_CPP_TOKENIZER_MODELS
    if v["tokenizer.ggml.model"] == "gpt2":
        assert v["tokenizer.ggml.pre"] in LLAMA_CPP_BPE_PRE
        assert "tokenizer.ggml.merges" in v


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_gemma3_file_has_what_llama_cpp_gemma3_loader_requires(tmp_path, quant):
    cfg = synthetic.model_shapes()["gemma-3-1b"]
    r, types, v = _fields(_small(tmp_path, "gemma-3-1b", quant))
    for k, t in GEMMA3_KEYS.items():
        assert k in types, k
        assert types[k] == t, (k, types[k], t)
    assert v["general.architecture"] == "gemma3"
    assert v["gemma3.block_count"] == 2
    assert v["gemma3.attention.sliding_window"] == cfg["sliding_window"] > 0
    n_vocab = len(v["tokenizer.ggml.tokens"])
    assert n_vocab == len(v["tokenizer.ggml.token_type"]) == 1024
    assert all(0 <= v[f"tokenizer.ggml.{s}_token_id"] < n_vocab for s in ("bos", "eos"))
    want = gemma3_tensors(2, cfg["hidden_size"], n_vocab, cfg["intermediate_size"], cfg["num_attention_heads"],
                          cfg["num_key_value_heads"], cfg["head_dim"])
    got = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert got == want  # an extra tensor is an error too ("wrong number of tensors")


def test_gemma3_file_loads_and_generates_in_ingot(tmp_path):
    path = synthetic.write_synthetic_gguf("gemma-3-1b", "q4_0", tmp_path / "g.gguf", layers=2, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = ingot.load(path, device="cpu", max_context=64, progress=False)
    assert not [w for w in caught if "tokenizer.ggml.pre" in str(w.message)]  # Ingot knows the name too
    ids = m.generate_ids([1, 2, 3], max_tokens=4)
    assert 1 <= len(ids) <= 4 and all(0 <= i < m.spec.vocab_size for i in ids)
    assert "gpt-2" in m.tokenizer.kind


@pytest.mark.parametrize("key,layers", [("gemma-4-e2b", 5), ("gemma-4-26b-a4b", 6)])
def test_gemma4_rotary_widths_are_the_converters(tmp_path, key, layers):
    """convert_hf_to_gguf writes rope.dimension_count as the global heads' whole width (rope_freqs marks the
    proportional share) and rope.dimension_count_swa as the local heads'. Without them llama.cpp rotates every
    layer by key_length, past the local heads' end, and ggml_rope aborts (n_dims <= ne0)."""
    small = {"vocab_size": 1024, "vocab_size_per_layer_input": 1024, "num_experts": 4, "top_k_experts": 2}
    path = synthetic.write_synthetic_gguf(key, "q8_0", tmp_path / f"{key}.gguf", layers=layers, progress=False,
                                          overrides=small)
    _, types, v = _fields(path)
    for k in ("gemma4.rope.dimension_count", "gemma4.rope.dimension_count_swa"):
        assert types[k] == U32, k
    cfg = synthetic.model_shapes()[key]
    assert v["gemma4.rope.dimension_count"] == v["gemma4.attention.key_length"] == cfg["global_head_dim"]
    assert v["gemma4.rope.dimension_count_swa"] == v["gemma4.attention.key_length_swa"] == cfg["head_dim"]
    assert ingot.load(path, device="cpu", max_context=64, progress=False).spec.n_layers == layers
