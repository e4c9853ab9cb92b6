"""`ingot inspect`: what a model file holds, read from its header without loading weights."""

from __future__ import annotations

import json
from collections import defaultdict

from ingot.formats import open_checkpoint
from ingot.models import build_spec
from ingot.registry import resolve


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def summary(path_or_name) -> dict:
    path = resolve(path_or_name)
    ckpt = open_checkpoint(path)
    spec = build_spec(ckpt.arch, ckpt.config)
    tok = ckpt.load_tokenizer()
    by_type = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    tensors = []
    for t in ckpt.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        row = by_type[t.qtype]
        row["tensors"] += 1
        row["params"] += n
        row["bytes"] += t.nbytes
        tensors.append({"name": t.name, "type": t.qtype, "shape": list(t.shape), "bytes": t.nbytes})
    windows = sorted({l.sliding_window for l in spec.layers if l.sliding_window})
    return {
        "path": str(path),
        "format": ckpt.format,
        "architecture": ckpt.arch,
        "hyperparameters": {
            "layers": spec.n_layers, "hidden": spec.hidden_size, "intermediate": spec.intermediate_size,
            "heads": spec.n_heads, "kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
            "vocab": spec.vocab_size, "context": spec.max_context, "rms_norm_eps": spec.norm_eps,
            "rope_theta": sorted({l.rope.theta for l in spec.layers}),
            "sliding_window": windows[0] if windows else None,
            "tied_embeddings": spec.tie_embeddings,
            **({"experts": spec.layers[0].moe.n_experts, "experts_per_token": spec.layers[0].moe.top_k}
               if spec.layers[0].moe else {}),
        },
        "tokenizer": None if tok is None else {
            "kind": tok.kind, "vocab": tok.vocab_size, "bos": tok.bos_id, "eos": tok.eos_id,
            "stop_ids": sorted(tok.stop_ids), "chat_template": bool(tok.chat_template),
        },
        **({"ingot": _native_header(ckpt)} if ckpt.format == "ingot" else {}),
        "types": dict(sorted(by_type.items())),
        "total_bytes": sum(t["bytes"] for t in tensors),
        "tensors": tensors,
    }


def _native_header(ckpt) -> dict:
    """What an .ingot header says beyond the model: its version, how it was quantized, from what."""
    info = ckpt.metadata
    layouts = defaultdict(int)
    for m in info["matrices"].values():
        layouts[m["layout"]] += 1
    fused = sum(m.endswith(("attn_qkv", "ffn_gate_up")) for m in info["matrices"])
    return {"format_version": info["format_version"], "created_by": info.get("created_by"),
            "quant": info["quant"], "source": info["source"], "matrices": dict(sorted(layouts.items())),
            "fused_matrices": fused}


def describe(path_or_name, show_tensors: bool = False, as_json: bool = False) -> str:
    s = summary(path_or_name)
    if not show_tensors:
        s_out = {k: v for k, v in s.items() if k != "tensors"}
    else:
        s_out = s
    if as_json:
        return json.dumps(s_out, indent=2)
    lines = [f"{s['path']}", f"  format        {s['format']}", f"  architecture  {s['architecture']}", ""]
    if "ingot" in s:
        h = s["ingot"]
        lines.append(".ingot header")
        lines.append(f"  {'format_version':<17} {h['format_version']}  ({h['created_by']})")
        lines += [f"  {'quant ' + k:<17} {v}" for k, v in h["quant"].items()]
        lines += [f"  {'source ' + k:<17} {v}" for k, v in h["source"].items()]
        lines.append(f"  {'matrices':<17} " + ", ".join(f"{n} {k}" for k, n in h["matrices"].items())
                     + f" ({h['fused_matrices']} fused QKV / gate-up)")
        lines.append("")
    lines.append("hyperparameters")
    lines += [f"  {k:<17} {v}" for k, v in s["hyperparameters"].items()]
    lines.append("")
    tok = s["tokenizer"]
    lines.append("tokenizer" if tok else "tokenizer       none (token ids only)")
    if tok:
        lines += [f"  {k:<17} {v}" for k, v in tok.items()]
    lines += ["", f"  {'type':<8} {'tensors':>8} {'params':>14} {'size':>12}"]
    for qtype, row in s["types"].items():
        lines.append(f"  {qtype:<8} {row['tensors']:>8} {row['params']:>14,} {_size(row['bytes']):>12}")
    params = sum(r["params"] for r in s["types"].values())
    lines.append(f"  {'total':<8} {len(s['tensors']):>8} {params:>14,} {_size(s['total_bytes']):>12}")
    if show_tensors:
        lines += ["", f"  {'name':<40} {'type':<8} {'shape':<20} {'size':>10}"]
        for t in s["tensors"]:
            lines.append(f"  {t['name']:<40} {t['type']:<8} {str(t['shape']):<20} {_size(t['bytes']):>10}")
    return "\n".join(lines)
