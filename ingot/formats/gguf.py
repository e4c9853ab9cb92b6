"""GGUF files (v2/v3): metadata and memory-mapped tensors."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingot.errors import FormatError

GGUF_MAGIC = b"GGUF"


# GGUF value type codes -> numpy dtype (scalars and arrays); 8 is a string, 9 an array.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass
class GGUFTensorInfo:
    name: str
    qtype: str
    shape: tuple[int, ...]  # torch order: GGUF lists the fastest-varying dimension first
    offset: int  # from the start of the data section
    nbytes: int


class GGUFFile:
    """A parsed GGUF header over a read-only memory map of the whole file.

    Our own parser rather than gguf.GGUFReader: the format is small and stable, and gguf-py's reader
    takes seconds per 100k vocabulary strings, which every model load would pay. gguf-py stays the
    reference for the quant types and writes the files the tests read back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
        if len(head) < 8 or head[:4] != GGUF_MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (no GGUF magic at the start)")
        self.version = int.from_bytes(head[4:8], "little")
        if self.version not in (2, 3):
            raise FormatError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self.map)
        try:
            self._parse(size)
        except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise FormatError(f"{self.path}: truncated or corrupt GGUF file ({e})") from None

    def _parse(self, size: int) -> None:
        from ingot.quant.ggml import BLOCK

        self._pos = 8
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            qtype_code, offset = self._unpack("<IQ")
            infos.append((name, dims, qtype_code, offset))
        align = int(self.metadata.get("general.alignment", 32))
        self.data_start = -(-self._pos // align) * align
        self.tensors = []
        for name, dims, code, offset in infos:
            qtype = _type_name(code)
            n = int(np.prod(dims)) if dims else 1
            elems, nbytes = BLOCK.get(qtype, (1, 0))
            self.tensors.append(GGUFTensorInfo(name, qtype, tuple(reversed(dims)), offset, n // elems * nbytes))
        end = max((self.data_start + t.offset + t.nbytes for t in self.tensors), default=self.data_start)
        if end > size:
            raise FormatError(f"{self.path}: truncated GGUF file ({size} bytes, its tensors need {end})")

    def tensor_data(self, t: GGUFTensorInfo) -> np.ndarray:
        at = self.data_start + t.offset
        return self.map[at : at + t.nbytes]

    def _unpack(self, fmt: str):
        vals = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return vals

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._pos)
        start = self._pos + 8
        self._pos = start + n
        if self._pos > len(self._buf):
            raise ValueError("string runs past the end of the file")
        return bytes(self._buf[start : self._pos]).decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_SCALARS[etype])
            arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos += dtype.itemsize * count
            return [bool(v) for v in arr] if etype == _BOOL else arr.tolist()
        dtype = np.dtype(_SCALARS[vtype])
        value = np.frombuffer(self._buf, dtype=dtype, count=1, offset=self._pos)[0].item()
        self._pos += dtype.itemsize
        return bool(value) if vtype == _BOOL else value


def _type_name(code: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(code).name
    except ValueError:
        return f"unknown type code {code}"


def read_metadata(path: str | Path) -> dict:
    """All key/value pairs as plain Python values (str, int, float, bool, lists of those)."""
    return GGUFFile(path).metadata


# GGUF architecture name -> Ingot family name.
GGUF_ARCHES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3moe", "gemma3": "gemma3", "gemma4": "gemma4"}

# llama.cpp's gemma4 names for the router scales, under the canonical names (which end in .weight).
_GEMMA4_RENAMES = {"ffn_gate_inp.scale": "ffn_gate_inp_scale.weight", "ffn_down_exps.scale": "ffn_exp_scale.weight"}


def _hf_config(arch: str, meta: dict, tensors: dict) -> dict:
    """The GGUF hyperparameters under Hugging Face config.json keys, so that families parse one form."""
    p = f"{arch}."

    def get(key, default=None):
        return meta.get(p + key, default)

    for key in ("attention.head_count", "embedding_length", "block_count", "feed_forward_length"):
        if key == "feed_forward_length" and arch == "qwen3moe":
            continue
        if get(key) is None:
            raise FormatError(f"GGUF metadata has no '{p + key}'")
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
        "tie_word_embeddings": "output.weight" not in tensors,
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
    if arch == "gemma4":
        cfg.update(_gemma4_config(get, cfg, tensors))
    if arch == "gemma3":
        cfg.update(
            sliding_window=get("attention.sliding_window"),
            sliding_window_pattern=6,  # llama.cpp's gemma3: every 6th layer is global
            rope_local_base_freq=10000.0,  # not stored in GGUF; llama.cpp fixes it
            query_pre_attn_scalar=head_dim,
            hidden_activation="gelu_pytorch_tanh",
        )
    return cfg


def _gemma4_config(get, cfg: dict, tensors: dict) -> dict:
    """What llama.cpp's converter writes for Gemma 4, back as Gemma4TextConfig keys: per-layer arrays for the
    sliding pattern, kv heads and MLP widths, the global head dim as key_length (key_length_swa the local one),
    and the proportional rope's rotated share as rope_freqs (1 for rotated frequency pairs, 1e30 for the rest)."""
    n = cfg["num_hidden_layers"]
    swa = get("attention.sliding_window_pattern")
    if not isinstance(swa, list) or len(swa) != n:
        raise FormatError(f"gemma4 GGUF: 'gemma4.attention.sliding_window_pattern' must list {n} layers, got {swa}")
    types = ["sliding_attention" if s else "full_attention" for s in swa]
    kv = cfg["num_key_value_heads"]
    kv = kv if isinstance(kv, list) else [kv] * n
    ff = cfg["intermediate_size"]
    ff = ff if isinstance(ff, list) else [ff] * n
    n_shared = get("attention.shared_kv_layers", 0)
    first_shared = n - n_shared
    double = [2 * ff[0] if i >= first_shared else ff[0] for i in range(n)]
    if ff not in ([ff[0]] * n, double):
        raise FormatError(f"gemma4 GGUF: feed_forward_length {ff} is neither uniform nor doubled on shared layers")
    swa_kv = {k for k, s in zip(kv, swa) if s}
    full_kv = {k for k, s in zip(kv, swa) if not s}
    if len(swa_kv) > 1 or len(full_kv) > 1:
        raise FormatError(f"gemma4 GGUF: head_count_kv {kv} varies within a layer type")
    first_full = types.index("full_attention")
    k_eq_v = f"blk.{first_full}.attn_v.weight" not in tensors
    head_dim, global_head_dim = get("attention.key_length_swa"), get("attention.key_length")
    # Rotary widths as the converter writes them: the global heads' whole width (the proportional share is in
    # rope_freqs) and the local heads' whole width; anything else would rotate dimensions Ingot does not.
    for key, want in (("rope.dimension_count", global_head_dim), ("rope.dimension_count_swa", head_dim)):
        if get(key, want) != want:
            raise FormatError(f"gemma4 GGUF: 'gemma4.{key}' is {get(key)}, but Ingot supports only {want} (the heads' "
                              "whole width) for it")
    full_rope = {"rope_type": "proportional", "rope_theta": get("rope.freq_base", 1000000.0),
                 "partial_rotary_factor": 1.0}
    if "rope_freqs.weight" in tensors:
        factors = tensors["rope_freqs.weight"].dequantize()
        full_rope["partial_rotary_factor"] = 2 * int((factors == 1.0).sum()) / global_head_dim
    out = dict(
        layer_types=types,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_key_value_heads=swa_kv.pop() if swa_kv else full_kv.copy().pop(),
        num_global_key_value_heads=full_kv.pop() if k_eq_v else None,
        attention_k_eq_v=k_eq_v,
        intermediate_size=ff[0],
        use_double_wide_mlp=ff != [ff[0]] * n,
        num_kv_shared_layers=n_shared,
        sliding_window=get("attention.sliding_window"),
        hidden_size_per_layer_input=get("embedding_length_per_layer_input", 0),
        final_logit_softcapping=get("final_logit_softcapping"),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10000.0)},
            "full_attention": full_rope,
        },
        hidden_activation="gelu_pytorch_tanh",
    )
    if "per_layer_token_embd.weight" in tensors:
        out["vocab_size_per_layer_input"] = tensors["per_layer_token_embd.weight"].shape[0]
    if get("expert_count"):
        out.update(enable_moe_block=True, num_experts=get("expert_count"), top_k_experts=get("expert_used_count"),
                   moe_intermediate_size=get("expert_feed_forward_length"))
    return out


def _gemma4_tensors(tensors: dict) -> None:
    """Canonical names for llama.cpp's gemma4 tensors: the fused expert gate_up split into its halves (gate
    first), the router scales renamed; rope_freqs dropped, as the spec's proportional rope already says it."""
    from ingot.formats.checkpoint import GGMLTensor

    tensors.pop("rope_freqs.weight", None)
    for name in [n for n in tensors if n.endswith(tuple(_GEMMA4_RENAMES))]:
        prefix, _, rest = name.partition(".")
        block, _, rest = rest.partition(".")
        tensors[f"{prefix}.{block}.{_GEMMA4_RENAMES[rest]}"] = tensors.pop(name)
    for name in [n for n in tensors if n.endswith("ffn_gate_up_exps.weight")]:
        t = tensors.pop(name)
        e, two_f, h = t.shape
        rows = np.arange(e * two_f).reshape(e, 2, two_f // 2)
        for j, part in enumerate(("gate", "up")):
            n = name.replace("gate_up", part)
            tensors[n] = GGMLTensor(n, t.qtype, (e, two_f // 2, h), t.data, rows[:, j].reshape(-1))


def _unpermute_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """llama.cpp's converter reorders Llama's q/k rows for interleaved RoPE; this restores HF's half-split."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def load_gguf(path: str | Path):
    """A Checkpoint over a GGUF file: tensors stay memory-mapped until dequantized or packed."""
    from ingot.formats.checkpoint import Checkpoint, GGMLTensor
    from ingot.models import check_arch
    from ingot.quant.ggml import check_type

    gf = GGUFFile(path)
    path, meta = gf.path, gf.metadata
    gguf_arch = meta.get("general.architecture")
    if gguf_arch is None:
        raise FormatError(f"{path}: GGUF file has no general.architecture")
    arch = check_arch(GGUF_ARCHES.get(gguf_arch, gguf_arch), source=f"{path} (GGUF architecture '{gguf_arch}')")
    for t in gf.tensors:
        check_type(t.qtype, t.name)
    tensors = {t.name: GGMLTensor(t.name, t.qtype, t.shape, gf.tensor_data(t)) for t in gf.tensors}
    try:
        config = _hf_config(gguf_arch, meta, tensors)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None

    if arch == "llama":
        for name, t in tensors.items():
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"]
                t.row_order = _unpermute_rows(heads, t.shape[0] // heads)
    if arch == "gemma4":
        _gemma4_tensors(tensors)

    def tokenizer():
        from ingot.tokenizer import Tokenizer

        return Tokenizer.from_gguf(meta) if "tokenizer.ggml.tokens" in meta else None

    return Checkpoint(path, "gguf", arch, config, tensors, tokenizer, meta)
