"""The .ingot format: a model already in the CUDA kernels' layout, so that loading is a memory map and one
copy to the device. `convert` writes one from a GGUF file or an HF / MLX folder; `load_native` reads it as a
Checkpoint. docs/format.md describes the bytes.

The container is safetensors, so any safetensors reader can list and read the planes. What safetensors
cannot say (the packed layout of a matrix, which rows of a fused matrix are attn_k, hashes, the tokenizer)
lives in its string-to-string `__metadata__`, under the key "ingot", as JSON. Two things bend the container
without leaving it: the header JSON is written with `__metadata__` first and its "format" key first, so that
bytes 8.. of every file are a fixed magic; and since safetensors allows no gaps between tensors, the 64 KiB
alignment is made of zero-filled `__pad__.N` uint8 tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ingot.errors import FormatError, IngotError, UnsupportedError
from ingot.quant.pack import PLANES

FORMAT = "ingot"
VERSION = 2  # 2: `every` (block-interleaved rows: the experts' [gate; up])
ALIGN = 64 * 1024  # page- and DMA-friendly on every platform, and what O_DIRECT reads would need
SUFFIX = ".ingot"
MAGIC = b'{"__metadata__":{"format":"ingot"'  # bytes 8.. of the file
PAD_PREFIX = "__pad__."
TARGETS = ("q4", "q8", "f16", "bf16")
GROUPS = (32, 64, 128)
# name -> (what it is, target of token_embd / output, target of every other matrix)
PROFILES = {
    "q4": ("q4 matrices, q8 embedding and lm_head (quality where it is cheapest)", "q8", "q4"),
    "q4-pure": ("q4 everywhere", "q4", "q4"),
    "q8": ("q8 everywhere", "q8", "q8"),
    "f16": ("float16 everywhere", "f16", "f16"),
    "bf16": ("bfloat16 everywhere (not kernel layout: the CUDA backend makes f16 of it at load)", "bf16", "bf16"),
}
# Matrices the CUDA backend fuses (weights.load_weights), so they are stored fused: name -> parts in order.
# Stacked experts ([E, rows, k]) fuse per expert: expert e's gate rows, then its up rows (pack.interleave_rows).
FUSED = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up"),
         "ffn_gate_up_exps": ("ffn_gate_exps", "ffn_up_exps")}

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I8": torch.int8,
           "I32": torch.int32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _hasher():
    import xxhash

    return xxhash.xxh3_64()


def _hash(t: torch.Tensor) -> str:
    h = _hasher()
    h.update(_byte_view(t))
    return h.hexdigest()


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def is_native(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8 + len(MAGIC))[8:] == MAGIC


# ---------------------------------------------------------------- reading


class NativeFile:
    """A parsed .ingot header over a memory map of the file. Every problem is a FormatError naming it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8 + len(MAGIC))
            if len(head) < 8 + len(MAGIC):
                raise FormatError(f"{self.path}: truncated .ingot file ({size} bytes, shorter than its header)")
            if head[8:] != MAGIC:
                raise FormatError(f"{self.path}: not an .ingot file (wrong magic at byte 8: expected {MAGIC!r})")
            n = int.from_bytes(head[:8], "little")
            if 8 + n > size:
                raise FormatError(f"{self.path}: truncated .ingot file ({size} bytes, its header needs {8 + n})")
            f.seek(0)
            self.header_bytes = f.read(8 + n)
        self.data_start = 8 + n
        try:
            entries = json.loads(self.header_bytes[8:])
            meta = entries.pop("__metadata__")
            version = int(meta["format_version"])
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{self.path}: corrupt .ingot header ({e})") from None
        if version > VERSION:
            raise FormatError(f"{self.path}: .ingot format version {version} is newer than this Ingot reads "
                              f"(up to {VERSION}); upgrade Ingot")
        try:
            self.info = json.loads(meta["ingot"])
            self.planes = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{self.path}: corrupt .ingot header ({e})") from None
        end = max((o[1] for _, _, o in self.planes.values()), default=0)
        if self.data_start + end > size:
            raise FormatError(f"{self.path}: truncated .ingot file ({size} bytes, its tensors need "
                              f"{self.data_start + end})")
        for name, (dtype, shape, (a, b)) in self.planes.items():
            if dtype not in _DTYPES or b - a != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
                raise FormatError(f"{self.path}: plane '{name}' ({dtype} {list(shape)}) does not fit its "
                                  f"{b - a} bytes")
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def blob_bytes(self) -> int:
        return len(self.map) - self.data_start

    def plane(self, name: str) -> torch.Tensor:
        dtype, shape, (a, b) = self.planes[name]
        with warnings.catch_warnings():
            # torch warns that the map is read-only; nothing writes into weights, so the zero-copy view is safe
            # (as for GGUF), and a private writable map would count the whole file against the commit limit.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self.map[self.data_start + a : self.data_start + b])
        return raw.view(_DTYPES[dtype]).view(shape)

    def matrix(self, name: str):
        """The stored PackedLinear `name`, its planes views of the map."""
        from ingot.quant.pack import PackedLinear

        m = self.info["matrices"][name]
        planes = {p: self.plane(m["planes"][p]) if p in m["planes"] else None for p in PLANES}
        try:
            return PackedLinear(m["layout"], m["n"], m["k"], m["group"], planes["qweight"], planes["scales"],
                                planes["mins"], m.get("source", ""), planes["qhigh"], planes["supers"])
        except (AssertionError, ValueError, TypeError):
            shapes = {p: list(t.shape) for p, t in planes.items() if t is not None}
            raise FormatError(f"{self.path}: matrix '{name}' ({m['layout']}, {m['n']} x {m['k']}, group "
                              f"{m['group']}) does not match its planes {shapes}") from None

    def verify(self, progress: bool | None = None) -> int:
        """Check every plane's xxhash, and that padding is zero; the number of planes checked."""
        from ingot.progress import byte_bar

        hashes = self.info.get("hashes", {})
        with byte_bar(self.blob_bytes, "verifying", progress) as bar:
            for name in self.planes:
                t = self.plane(name)
                if name.startswith(PAD_PREFIX):
                    if t.any():
                        raise FormatError(f"{self.path}: padding '{name}' is not zero (the file was changed)")
                elif name not in hashes:
                    raise FormatError(f"{self.path}: tensor '{name}' has no hash in the header")
                elif _hash(t) != hashes[name]:
                    raise FormatError(f"{self.path}: checksum mismatch in tensor '{name}' (the file is corrupt "
                                      "or was changed)")
                bar.update(t.numel() * t.element_size())
        return sum(not n.startswith(PAD_PREFIX) for n in self.planes)


def load_native(path: str | Path):
    """A Checkpoint over a .ingot file: matrices are PackedTensors over views of the memory map."""
    from ingot.formats.checkpoint import Checkpoint, DenseTensor, PackedTensor

    f = NativeFile(path)
    info = f.info
    try:
        arch, config = info["arch"], info["config"]
        cache: dict[str, object] = {}
        whole = {m: (lambda m=m: cache[m] if m in cache else cache.setdefault(m, f.matrix(m)))
                 for m in info["matrices"]}
        tensors = {}
        for name, e in info["tensors"].items():
            shape = tuple(e["shape"])
            _check_entry(f, name, e, shape)
            if e["kind"] == "dense":
                dtype = f.planes[e["plane"]][0]
                tensors[name] = DenseTensor(name, dtype, shape, lambda p=e["plane"], s=shape: f.plane(p).reshape(s),
                                            int(np.prod(shape)) * _DTYPES[dtype].itemsize)
            else:
                m = info["matrices"][e["matrix"]]
                start, stop = e["rows"]
                rows = (stop - start) * _period(e, m)[1]
                nbytes = sum(_plane_bytes(f, p) for p in m["planes"].values()) * rows // m["n"]
                tensors[name] = PackedTensor(name, m["layout"], shape, e["matrix"], whole[e["matrix"]], start, stop,
                                             nbytes, e.get("every", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{f.path}: corrupt .ingot header ({e!r})") from None

    def tokenizer():
        from ingot.tokenizer import Tokenizer

        t = info.get("tokenizer")
        return None if t is None else Tokenizer.from_dict(t, info.get("chat_template"))

    return Checkpoint(f.path, "ingot", arch, config, tensors, tokenizer, info)


def _check_entry(f: NativeFile, name: str, e: dict, shape: tuple) -> None:
    """A tensor's logical shape must be what its storage holds, or dequantizing it would fail far away."""
    if e["kind"] == "dense":
        stored = f.planes[e["plane"]][1]
        if int(np.prod(stored)) != int(np.prod(shape)):
            raise FormatError(f"{f.path}: tensor '{name}' has shape {list(shape)}, its plane holds {list(stored)}")
        return
    m = f.info["matrices"][e["matrix"]]
    start, stop = e["rows"]
    period, blocks = _period(e, m)
    if (not (0 <= start < stop <= period) or period * blocks != m["n"] or shape[-1] != m["k"]
            or int(np.prod(shape[:-1])) != (stop - start) * blocks):
        rows = f"rows {start}..{stop}" + (f" of every {period}" if e.get("every") else "")
        raise FormatError(f"{f.path}: tensor '{name}' (shape {list(shape)}, {rows}) does not fit "
                          f"matrix '{e['matrix']}' ({m['n']} x {m['k']})")


def _period(e: dict, m: dict) -> tuple[int, int]:
    """(rows a block, blocks) of a packed tensor entry's matrix m: its `every`, or the whole matrix once."""
    every = e.get("every", 0)
    return (every, m["n"] // every) if every else (m["n"], 1)


def _plane_bytes(f: NativeFile, name: str) -> int:
    a, b = f.planes[name][2]
    return b - a


# ---------------------------------------------------------------- writing


class _Writer:
    """Streams planes into a temporary file after a reserved header region, hashing them on the way; the
    header (which holds the hashes) is written last. The caller renames the file into place."""

    def __init__(self, tmp: Path, reserve: int):
        self.tmp, self.reserve = tmp, reserve
        self.f = open(tmp, "wb")
        self.f.seek(reserve)
        self.entries: dict[str, dict] = {}
        self.hashes: dict[str, str] = {}
        self.at = 0  # offset in the blob
        self.pads = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.at % ALIGN:
            gap = ALIGN - self.at % ALIGN
            self.entries[f"{PAD_PREFIX}{self.pads}"] = {"dtype": "U8", "shape": [gap],
                                                        "data_offsets": [self.at, self.at + gap]}
            self.f.write(bytes(gap))
            self.pads += 1
            self.at += gap
        data = _byte_view(t)
        self.f.write(data)
        h = _hasher()
        h.update(data)
        self.hashes[name] = h.hexdigest()
        self.entries[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.at, self.at + len(data)]}
        self.at += len(data)

    def finish(self, info: dict) -> None:
        info = {**info, "hashes": self.hashes}
        meta = {"format": FORMAT, "format_version": str(VERSION), "ingot": json.dumps(info, ensure_ascii=False)}
        # json.dumps keeps insertion order: __metadata__ and its "format" come first, making the magic.
        text = json.dumps({"__metadata__": meta, **self.entries}, ensure_ascii=False, separators=(",", ":"))
        body = text.encode()
        assert body.startswith(MAGIC)
        need = -(-(8 + len(body)) // ALIGN) * ALIGN
        if need > self.reserve:  # the estimate was short: move the blob (a copy, but never a wrong file)
            self.f.close()
            moved = self.tmp.with_name(self.tmp.name + ".move")
            with open(self.tmp, "rb") as src, open(moved, "wb") as dst:
                src.seek(self.reserve)
                dst.seek(need)
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
            os.replace(moved, self.tmp)
            self.f, self.reserve = open(self.tmp, "r+b"), need
        # safetensors lets the header end in spaces; they put the blob on a 64 KiB boundary.
        body += b" " * (self.reserve - 8 - len(body))
        self.f.seek(0)
        self.f.write(len(body).to_bytes(8, "little"))
        self.f.write(body)
        self.f.seek(0, os.SEEK_END)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# ---------------------------------------------------------------- converting


@dataclass
class TensorReport:
    name: str
    source: str  # the source's type
    stored: str  # the layout written (q4 g32 affine, q8, f16, bf16, f32, ...)
    rel_error: float  # ||stored - source|| / ||source|| over the dequantized values; 0.0 when exact
    note: str = ""


@dataclass
class Report:
    path: Path
    source: Path
    seconds: float = 0.0
    bytes: int = 0
    tensors: list[TensorReport] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"  {'tensor':<36} {'source':<8} {'stored':<18} {'rel error':>10}  note"]
        for t in self.tensors:
            err = "exact" if t.rel_error == 0.0 else f"{t.rel_error:.2e}"
            lines.append(f"  {t.name:<36} {t.source:<8} {t.stored:<18} {err:>10}  {t.note}")
        return "\n".join(lines)


def _recipe(quant: str | None, profile: str | None) -> tuple[str | None, str | None, str | None]:
    """(profile name, target of embedding/lm_head, target of other matrices); None keeps the stored type."""
    if quant and profile:
        raise IngotError("give --quant or --profile, not both (a profile already says each tensor's type)")
    if profile:
        if profile not in PROFILES:
            raise IngotError(f"unknown profile '{profile}' ({', '.join(PROFILES)})")
        return profile, PROFILES[profile][1], PROFILES[profile][2]
    if quant and quant not in TARGETS:
        raise IngotError(f"unknown quant '{quant}' ({', '.join(TARGETS)})")
    return (quant, quant, quant) if quant else ("as-stored", None, None)


def _is_quantized(ref) -> bool:
    return ref.qtype not in ("F32", "F16", "BF16")


def _rel_error(stored: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(ref.norm())
    err = float((stored.float() - ref).norm())
    return err / denom if denom else err


def _pack_one(ref, target: str | None, group: int, requantize: bool):
    """One matrix -> (PackedLinear, or a dense tensor for bf16 / kept floats, TensorReport).
    Quantized sources repack exactly (pack.from_ggml / from_mlx) unless `requantize`; floats follow target."""
    from ingot.formats.checkpoint import GGMLTensor
    from ingot.quant import pack

    name = ref.name
    if _is_quantized(ref) and not (requantize and target):
        if isinstance(ref, GGMLTensor):
            p = pack.from_ggml(ref)
        elif ref.qtype in ("MLX4", "MLX8"):
            w, s, b = (a.reshape(-1, a.shape[-1]) for a in ref.packed())
            p = pack.from_mlx(w, s, b, ref.bits, ref.group_size)
        else:
            raise UnsupportedError(f"tensor '{name}': no packed form for {ref.qtype}")
        note = "" if target in (None, p.kind) else f"kept (already {ref.qtype}; --requantize to make it {target})"
        if "exact" in p.source and "lossy" not in p.source:
            return p, TensorReport(name, ref.qtype, _describe(p), 0.0, note)
        return p, TensorReport(name, ref.qtype, _describe(p), _rel_error(p.dequantize(), _rows(ref)), p.source)
    values = _rows(ref)
    if target is None:  # as stored: f16 is already a kernel layout, bf16 / f32 stay dense and exact
        if ref.qtype == "F16":
            target = "f16"
        else:
            dense = values.to(_DTYPES[ref.qtype]).reshape(ref.shape)
            return dense, TensorReport(name, ref.qtype, ref.qtype.lower(), 0.0)
    if target == "bf16":
        dense = values.to(torch.bfloat16).reshape(ref.shape)
        return dense, TensorReport(name, ref.qtype, "bf16", _rel_error(dense.reshape(values.shape), values))
    if target in ("q4", "q8") and values.shape[-1] % group:
        raise IngotError(f"tensor '{name}': its rows of {values.shape[-1]} do not split into groups of {group} "
                         "(--group-size 32 fits more shapes)")
    p = pack.quantize(values, target, group=group if target != "f16" else 32, sym=(target == "q8"))
    return p, TensorReport(name, ref.qtype, _describe(p), _rel_error(p.dequantize(), values))


def _rows(ref) -> torch.Tensor:
    v = ref.dequantize()
    return v.reshape(-1, v.shape[-1])


def _describe(p) -> str:
    if p.kind in ("f16", "q6k"):
        return p.kind
    return f"{p.kind} g{p.group} {'affine' if p.mins is not None else 'sym'}"


def _source_hash(path: Path) -> str:
    """xxh3-128 of a file, or of a folder's files in name order (each file's name, then its bytes)."""
    import xxhash

    h = xxhash.xxh3_128()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for p in files:
        if path.is_dir():
            h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def convert(src, out, quant: str | None = None, group_size: int = 32, profile: str | None = None,
            requantize: bool = False, progress: bool | None = None) -> Report:
    """Write `out` (.ingot) from a GGUF file, an HF or MLX folder or an embedded name. Nothing is left at
    `out` unless the whole file was written (a temporary name, renamed at the end)."""
    import ingot
    from ingot.formats import open_checkpoint
    from ingot.models import build_spec
    from ingot.progress import byte_bar
    from ingot.quant.pack import interleave_rows
    from ingot.registry import resolve

    t0 = time.perf_counter()
    if group_size not in GROUPS:
        raise IngotError(f"group size {group_size} is not supported ({', '.join(map(str, GROUPS))})")
    name, head_target, body_target = _recipe(quant, profile)
    src = resolve(src)
    out = Path(out).expanduser()
    if out.resolve() == src.resolve():
        raise IngotError(f"{out}: the output would overwrite the source")
    if not out.parent.is_dir():
        raise IngotError(f"{out.parent}: no such folder for the output")
    if out.is_dir():
        raise IngotError(f"{out}: is a folder; give the output file's name")
    ckpt = open_checkpoint(src)
    if ckpt.format == "ingot":
        raise IngotError(f"{src}: already an .ingot file")
    spec = build_spec(ckpt.arch, ckpt.config)
    spec.check_tensors(ckpt.tensors, str(src))
    t = ckpt.tensors
    tok = ckpt.load_tokenizer()
    report = Report(out, src)
    names = list(spec.weights()) + [n for n in ("rope_freqs.weight",) if n in t]
    # Generous: a matrix has at most 5 planes, each with a pad entry; the tokenizer is escaped JSON.
    estimate = (2 * len(json.dumps(tok.to_dict())) if tok else 0) + 2 * len(json.dumps(ckpt.config))
    estimate += sum(12 * (len(n) + 160) for n in names) + ALIGN
    reserve = -(-estimate // ALIGN) * ALIGN

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        w = _Writer(tmp, reserve)
        tensors, matrices = {}, {}

        def put_dense(n, value: torch.Tensor):
            w.add(n, value.contiguous())
            tensors[n] = {"kind": "dense", "plane": n, "shape": list(value.shape)}

        def put_matrix(mname, p, parts, blocks=1):
            """parts: [(canonical name, logical shape, rows)], each part's rows in `blocks` equal runs, block-
            interleaved in p (pack.interleave_rows)."""
            planes = {}
            for plane in PLANES:
                value = getattr(p, plane)
                if value is not None:
                    planes[plane] = f"{mname}.{plane}"
                    w.add(planes[plane], value)
            matrices[mname] = {"layout": p.kind, "n": p.n, "k": p.k, "group": p.group, "planes": planes,
                               "source": p.source}
            at = 0
            for n, shape, rows in parts:
                tensors[n] = {"kind": "packed", "matrix": mname, "rows": [at, at + rows // blocks],
                              "shape": list(shape)}
                if blocks > 1:
                    tensors[n]["every"] = p.n // blocks
                at += rows // blocks

        def target_of(n):
            return head_target if n in ("token_embd.weight", "output.weight") else body_target

        bar = byte_bar(sum(t[n].nbytes for n in names), "converting", progress)
        done = set()
        for n in names:
            if n in done:
                continue
            ref = t[n]
            if len(ref.shape) == 1 or n.endswith("ffn_gate_inp.weight"):
                # Norms, rope factors and the MoE router: float32, as both backends read them (exact).
                put_dense(n, ref.dequantize().to(torch.float32))
                report.tensors.append(TensorReport(n, ref.qtype, "f32", 0.0))
                bar.update(ref.nbytes)
                done.add(n)
                continue
            group = [n]
            prefix, _, short = n.rpartition(".")[0].rpartition(".")
            for fused, members in FUSED.items():
                if short == members[0]:  # the members the layer has (Gemma 4's: q and k only, or q alone)
                    group = [g for g in (f"{prefix}.{m}.weight" for m in members) if g in t]
                    mname = f"{prefix}.{fused}"
            packed = []
            for g in group:
                value, row = _pack_one(t[g], target_of(g), group_size, requantize)
                packed.append(value)
                report.tensors.append(row)
                bar.update(t[g].nbytes)
                done.add(g)
            shapes = [tuple(t[g].shape) for g in group]
            rows = [int(np.prod(s[:-1])) for s in shapes]
            fusable = len(group) > 1 and not any(isinstance(v, torch.Tensor) for v in packed)
            if fusable:
                blocks = shapes[0][0] if len(shapes[0]) == 3 else 1  # stacked experts
                try:
                    put_matrix(mname, interleave_rows(packed, blocks), list(zip(group, shapes, rows)), blocks)
                    continue
                except UnsupportedError:
                    pass  # no exact common form: stored apart, and the CUDA backend concatenates at load
            for g, value, shape, r in zip(group, packed, shapes, rows):
                if isinstance(value, torch.Tensor):
                    put_dense(g, value)
                else:
                    put_matrix(g.removesuffix(".weight"), value, [(g, shape, r)])
        bar.close()
        info = {
            "format_version": VERSION,
            "created_by": f"ingot {ingot.__version__}",
            "arch": ckpt.arch,
            "config": ckpt.config,
            "tokenizer": tok.to_dict() if tok else None,
            "chat_template": tok.chat_template if tok else None,
            "quant": {"profile": name, "embeddings": head_target, "matrices": body_target,
                      "group_size": group_size, "requantize": requantize},
            "source": {"name": src.name, "format": ckpt.format, "xxh3_128": _source_hash(src)},
            "tensors": tensors,
            "matrices": matrices,
        }
        w.finish(info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, out)
    except BaseException as e:
        try:
            w.f.close()
        except (NameError, OSError):
            pass
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".move").unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a vanished folder: the user's to fix, no traceback
            raise IngotError(f"{out}: writing failed, nothing was written ({e})") from None
        raise
    report.bytes = out.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report
