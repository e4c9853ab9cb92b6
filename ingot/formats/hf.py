"""Hugging Face and MLX safetensors folders: config.json plus one or many *.safetensors files.

Tensors are only described at load time (safetensors headers); data is read when a tensor is dequantized.
HF names map onto the canonical names of ingot.formats.checkpoint; MoE experts are stacked, Gemma's
(1 + w) norms become plain multipliers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ingot.errors import FormatError, UnsupportedError
from ingot.formats.checkpoint import Checkpoint, DenseTensor, TensorRef

MLX_BITS = (4, 8)
MLX_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_ITEM_SIZE = {**FLOAT_DTYPES, "U32": 4, "I32": 4, "F64": 8, "I64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Used only when config.json has no model_type.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Gemma4ForCausalLM": "gemma4",
    "Gemma4ForConditionalGeneration": "gemma4",
}

# Multimodal checkpoints nest the text model; transformers 5 writes language_model.model., MLX-VLM too,
# transformers 5's in-memory names are model.language_model.
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_TOP = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "lm_head": "output",
    "embed_tokens_per_layer": "per_layer_token_embd",
    "per_layer_model_projection": "per_layer_model_proj",
    "per_layer_projection_norm": "per_layer_proj_norm",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
# Gemma's post_attention_layernorm normalises the attention output; its pre-MLP norm is a separate one.
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Gemma 4 adds the MoE block's norms and router scales, the per-layer input path and the layer output scalar
# (under GGUF's names for them where llama.cpp's gguf-py has one).
_GEMMA4_LAYER = {
    **_GEMMA_LAYER,
    "pre_feedforward_layernorm_2": "pre_ffw_norm_2",
    "post_feedforward_layernorm_1": "post_ffw_norm_1",
    "post_feedforward_layernorm_2": "post_ffw_norm_2",
    "router.proj": "ffn_gate_inp",
    "router.scale": "ffn_gate_inp_scale",
    "router.per_expert_scale": "ffn_exp_scale",
    "per_layer_input_gate": "inp_gate",
    "per_layer_projection": "proj",
    "post_per_layer_input_norm": "post_norm",
    "layer_scalar": "layer_output_scale",
}
_TABLES = {"gemma3": _GEMMA_LAYER, "gemma4": _GEMMA4_LAYER}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj")  # one tensor per expert (HF)
_FUSED_RE = re.compile(r"(?:mlp\.)?experts\.(gate_up|down)_proj")  # transformers 5 (Gemma 4 without mlp.)
_SWITCH_RE = re.compile(r"(?:mlp\.switch_mlp|experts\.switch_glu)\.(gate|up|down)_proj")  # mlx-lm's stacked experts

# Gemma3TextConfig defaults: multimodal Gemma 3 configs leave most text_config keys out.
_GEMMA3_DEFAULTS = dict(
    vocab_size=262208,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)


@dataclass
class MLXTensor(TensorRef):
    """An MLX affine-quantized matrix (or stack of them): packed uint32 words, per-group scales and biases."""

    name: str
    qtype: str  # "MLX4" | "MLX8"
    shape: tuple[int, ...]  # logical: (..., rows, cols)
    bits: int
    group_size: int
    loader: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    bytes_: int = 0

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight uint32 (..., cols*bits/32), scales, biases (..., cols/group_size)) as stored."""
        return self.loader()

    def dequantize(self) -> torch.Tensor:
        from ingot.quant.mlx import dequantize_mlx

        return dequantize_mlx(*self.loader(), self.bits, self.group_size).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.bytes_


@dataclass
class _Stored:
    """One module's weight as stored, before it becomes a TensorRef: float, or MLX (weight, scales, biases)."""

    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Callable[[], torch.Tensor], ...]
    nbytes: int
    bits: int = 0
    group_size: int = 0

    def rows(self, start: int, stop: int) -> _Stored:
        # Rows are the second-to-last dim of weight, scales and biases alike, so MLX slices stay exact.
        parts = tuple(lambda p=p: p()[..., start:stop, :] for p in self.parts)
        shape = (*self.shape[:-2], stop - start, self.shape[-1])
        nbytes = self.nbytes * (stop - start) // self.shape[-2]
        return _Stored(self.dtype, shape, parts, nbytes, self.bits, self.group_size)

    def ref(self, name: str, gemma_norm: bool = False) -> TensorRef:
        if self.bits:
            load = lambda parts=self.parts: tuple(p() for p in parts)  # noqa: E731
            return MLXTensor(name, f"MLX{self.bits}", self.shape, self.bits, self.group_size, load, self.nbytes)
        weight = self.parts[0]
        if gemma_norm:  # in float32: 1 + w rounded back to bf16 would lose the small offsets
            return DenseTensor(name, "F32", self.shape, lambda: weight().float() + 1.0, 4 * _numel(self.shape))
        return DenseTensor(name, self.dtype, self.shape, weight, self.nbytes)


def _stack(stored: list[_Stored], what: str) -> _Stored:
    first = stored[0]
    for s in stored[1:]:
        if (s.dtype, s.shape, s.bits, s.group_size) != (first.dtype, first.shape, first.bits, first.group_size):
            raise FormatError(f"{what}: experts differ in type or shape ({first.shape} vs {s.shape})")
    parts = tuple(
        lambda i=i: torch.stack([s.parts[i]() for s in stored]) for i in range(len(first.parts))
    )
    nbytes = sum(s.nbytes for s in stored)
    return _Stored(first.dtype, (len(stored), *first.shape), parts, nbytes, first.bits, first.group_size)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FormatError(f"{index} names shards that are not in the folder: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no *.safetensors files (Ingot reads safetensors weights, not .bin or .pt)")
    return files


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FormatError(f"{path}: no config.json (a Hugging Face or MLX model folder needs one)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    return cfg


def _family(cfg: dict, path: Path) -> str:
    from ingot.models import HF_MODEL_TYPES, check_arch

    model_type = cfg.get("model_type") or cfg.get("text_config", {}).get("model_type")
    if model_type:
        return check_arch(HF_MODEL_TYPES.get(model_type, model_type), source=f"{path} (model_type '{model_type}')")
    archs = cfg.get("architectures") or ["<none>"]
    return check_arch(HF_ARCHITECTURES.get(archs[0], archs[0]), source=f"{path} (architectures {archs})")


def _text_config(cfg: dict, arch: str) -> dict:
    """The config the family reads: text_config for multimodal models, with keys that files may leave out."""
    text = dict(cfg.get("text_config") or cfg)
    for key in ("quantization", "quantization_config"):
        if key in cfg:
            text.setdefault(key, cfg[key])
    if arch == "gemma3":
        for k, v in _GEMMA3_DEFAULTS.items():
            text.setdefault(k, v)
        if not text.get("layer_types"):
            pattern = text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or 6
            text["layer_types"] = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(text["num_hidden_layers"])
            ]
    if arch == "qwen3moe" and "num_experts" not in text and "num_local_experts" in text:
        text["num_experts"] = text["num_local_experts"]  # transformers 5 writes the latter
    return text


def _quantization(cfg: dict, path: Path) -> dict | None:
    """MLX's quantization block: default bits/group_size plus per-layer overrides keyed by module path."""
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if not q:
        return None
    if "bits" not in q or "group_size" not in q:
        method = q.get("quant_method", "unknown")
        raise UnsupportedError(f"{path}: quantization method '{method}' is not supported (MLX affine 4/8-bit is)")
    if q.get("mode", "affine") != "affine":
        raise UnsupportedError(f"{path}: MLX quantization mode '{q['mode']}' is not supported (affine is)")
    _check_mlx(q["bits"], q["group_size"], str(path))
    overrides = {_strip(k): v for k, v in q.items() if isinstance(v, dict)}
    return {"bits": q["bits"], "group_size": q["group_size"], "overrides": overrides}


def _check_mlx(bits, group_size, what: str) -> None:
    if bits not in MLX_BITS or group_size not in MLX_GROUP_SIZES:
        raise UnsupportedError(
            f"{what}: MLX quantization with {bits} bits, group size {group_size} is not supported "
            f"(bits {MLX_BITS}, group sizes {MLX_GROUP_SIZES})"
        )


def load_hf(path: str | Path) -> Checkpoint:
    """A Checkpoint over a Hugging Face (float) or MLX (affine-quantized) safetensors folder."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    raw_cfg = _read_config(path)
    arch = _family(raw_cfg, path)
    config = _text_config(raw_cfg, arch)
    quant = _quantization(raw_cfg, path)

    # module path (prefix stripped) -> {"weight"|"scales"|"biases": (file, handle, key, dtype, shape)}
    modules: dict[str, dict[str, tuple]] = {}
    for file in _safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{file}: truncated or corrupt safetensors file ({e})") from None
        for key in keys:
            module, _, kind = key.rpartition(".")
            if kind == "bias" and module.endswith("_proj") and _strip(module).startswith("layers."):
                # The families here have no linear biases; dropping one would silently change the model.
                raise UnsupportedError(f"{file}: '{key}': linear layers with a bias are not supported")
            if kind not in ("weight", "scales", "biases"):
                module, kind = key, "weight"  # bare parameters: experts.gate_up_proj, but also inv_freq
            s = handle.get_slice(key)
            entry = (file, handle, key, s.get_dtype(), tuple(s.get_shape()))
            modules.setdefault(_strip(module), {}).setdefault(kind, entry)

    def stored(module: str) -> _Stored:
        parts = modules[module]
        file, handle, key, dtype, shape = parts["weight"]
        load = lambda h=handle, k=key: h.get_tensor(k)  # noqa: E731
        if "scales" not in parts:
            if dtype not in FLOAT_DTYPES:
                raise FormatError(
                    f"{file}: tensor '{key}' has dtype {dtype}; unquantized weights must be F32, F16 or BF16"
                    + ("" if quant else " (uint32 weights need an MLX 'quantization' block in config.json)")
                )
            return _Stored(dtype, shape, (load,), _numel(shape) * FLOAT_DTYPES[dtype])
        if quant is None:
            raise FormatError(f"{file}: '{key}' has scales but config.json has no 'quantization' block")
        if "biases" not in parts:
            raise FormatError(f"{file}: '{key}' has scales but no biases (only MLX affine quantization is read)")
        o = quant["overrides"].get(module, {})
        bits, gs = o.get("bits", quant["bits"]), o.get("group_size", quant["group_size"])
        _check_mlx(bits, gs, f"{path}: layer '{module}'")
        s_shape = parts["scales"][4]
        cols = shape[-1] * 32 // bits
        if dtype != "U32" or s_shape != (*shape[:-1], cols // gs) or parts["biases"][4] != s_shape or cols % gs:
            raise FormatError(
                f"{file}: '{key}' ({dtype} {shape}) with scales {s_shape} does not fit {bits}-bit MLX quantization "
                f"with group size {gs}"
            )
        loads = (load,) + tuple(lambda p=parts[k]: p[1].get_tensor(p[2]) for k in ("scales", "biases"))
        nbytes = sum(_numel(parts[k][4]) * _ITEM_SIZE.get(parts[k][3], 4) for k in ("weight", "scales", "biases"))
        return _Stored(dtype, (*shape[:-1], cols), loads, nbytes, bits, gs)

    gemma = arch == "gemma3"  # Gemma 3's norms store w of a (1 + w) multiplier; Gemma 4's the multiplier
    table = _TABLES.get(arch, _LAYER)
    tensors: dict[str, TensorRef] = {}
    experts: dict[tuple[int, str], dict[int, str]] = {}  # (layer, gate|up|down) -> expert -> module
    for module in modules:
        name = None
        if module in _TOP:
            name = _TOP[module]
        elif m := _LAYER_RE.fullmatch(module):
            i, rest = int(m[1]), m[2]
            if rest in table:
                name = f"blk.{i}.{table[rest]}"
            elif e := _EXPERT_RE.fullmatch(rest):
                experts.setdefault((i, e[2]), {})[int(e[1])] = module
            elif f := _FUSED_RE.fullmatch(rest):
                s = stored(module)
                if f[1] == "down":
                    tensors[f"blk.{i}.ffn_down_exps.weight"] = s.ref(f"blk.{i}.ffn_down_exps.weight")
                else:  # transformers' fused experts (Qwen3-MoE, Gemma 4) chunk gate_up's output: gate first, then up
                    half = s.shape[-2] // 2
                    for j, part in enumerate(("gate", "up")):
                        n = f"blk.{i}.ffn_{part}_exps.weight"
                        tensors[n] = s.rows(j * half, (j + 1) * half).ref(n)
            elif w := _SWITCH_RE.fullmatch(rest):
                n = f"blk.{i}.ffn_{w[1]}_exps.weight"
                tensors[n] = stored(module).ref(n)
        if name is not None:
            name += ".weight"
            tensors[name] = stored(module).ref(name, gemma_norm=gemma and name.endswith("norm.weight"))

    for (i, part), by_expert in experts.items():
        n = f"blk.{i}.ffn_{part}_exps.weight"
        if sorted(by_expert) != list(range(len(by_expert))):
            missing = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
            raise FormatError(f"{path}: layer {i} {part}_proj is missing experts {missing}")
        tensors[n] = _stack([stored(by_expert[e]) for e in range(len(by_expert))], f"{path}: {n}").ref(n)

    if config.get("tie_word_embeddings", arch in _TABLES) and "output.weight" in tensors:
        # Some exporters write the tied lm_head anyway; the spec then expects no output.weight.
        del tensors["output.weight"]

    def tokenizer():
        if not (path / "tokenizer.json").exists():
            return None
        from ingot.tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(path)

    return Checkpoint(path, "mlx" if quant else "hf", arch, config, tensors, tokenizer)
