"""GGUF files (v2/v3) through llama.cpp's own reader, gguf-py: metadata and memory-mapped tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingot.errors import FormatError

GGUF_MAGIC = b"GGUF"


def open_reader(path: str | Path):
    """A gguf.GGUFReader over the memory-mapped file, or a FormatError naming what is wrong."""
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise FormatError(f"{path}: truncated or corrupt GGUF file ({e})") from None


def read_metadata(reader_or_path) -> dict:
    """All key/value pairs as plain Python values (str, int, float, bool, lists of those)."""
    reader = open_reader(reader_or_path) if isinstance(reader_or_path, (str, Path)) else reader_or_path
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    return meta


# GGUF architecture name -> Ingot family name.
GGUF_ARCHES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3moe", "gemma3": "gemma3"}


def _hf_config(arch: str, meta: dict, tensor_names: set[str]) -> dict:
    """The GGUF hyperparameters under Hugging Face config.json keys, so that families parse one form."""
    p = f"{arch}."

    def get(key, default=None):
        return meta.get(p + key, default)

    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or None
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": get("context_length", 4096),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if get("rope.scaling.type") == "linear" and get("rope.scaling.factor"):
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    if arch == "qwen3moe":
        cfg.update(
            num_experts=get("expert_count"),
            num_experts_per_tok=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length"),
            norm_topk_prob=True,  # llama.cpp always renormalises the top-k weights for this architecture
        )
    if arch == "gemma3":
        cfg.update(
            sliding_window=get("attention.sliding_window"),
            sliding_window_pattern=6,  # llama.cpp's gemma3: every 6th layer is global
            rope_local_base_freq=10000.0,  # not stored in GGUF; llama.cpp fixes it
            query_pre_attn_scalar=head_dim,
            hidden_activation="gelu_pytorch_tanh",
        )
    return cfg


def _unpermute_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """llama.cpp's converter reorders Llama's q/k rows for interleaved RoPE; this restores HF's half-split."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def load_gguf(path: str | Path):
    """A Checkpoint over a GGUF file: tensors stay memory-mapped until dequantized or packed."""
    from ingot.formats.checkpoint import Checkpoint, GGMLTensor
    from ingot.models import check_arch
    from ingot.quant.ggml import check_type

    path = Path(path)
    reader = open_reader(path)
    meta = read_metadata(reader)
    gguf_arch = meta.get("general.architecture")
    if gguf_arch is None:
        raise FormatError(f"{path}: GGUF file has no general.architecture")
    arch = check_arch(GGUF_ARCHES.get(gguf_arch, gguf_arch), source=f"{path} (GGUF architecture '{gguf_arch}')")
    names = {t.name for t in reader.tensors}
    config = _hf_config(gguf_arch, meta, names)

    tensors = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        check_type(qtype, t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        order = None
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in t.name else config["num_key_value_heads"]
            order = _unpermute_rows(heads, shape[0] // heads)
        tensors[t.name] = GGMLTensor(t.name, qtype, shape, t.data, order)
    expected_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if expected_end > path.stat().st_size:
        raise FormatError(f"{path}: truncated GGUF file ({path.stat().st_size} bytes, tensors need {expected_end})")

    def tokenizer():
        from ingot.tokenizer import Tokenizer

        return Tokenizer.from_gguf(meta) if "tokenizer.ggml.tokens" in meta else None

    return Checkpoint(path, "gguf", arch, config, tensors, tokenizer, meta)
