"""Per-layer shapes as the CUDA backend lays them out: what each layer's fused qkv row holds and which cache it
reads, and the widths of the activation buffers (the widest layer's, so one set of static buffers serves every
layer: a layer uses the first columns of each)."""

from __future__ import annotations

from typing import NamedTuple

from ingot.models.base import ModelSpec


class AttnShape(NamedTuple):
    head_dim: int
    n_kv_heads: int
    kv_in_row: int  # what follows q in the qkv row: 2 k and v, 1 k only (values = keys, k_eq_v), 0 nothing
    cache_layer: int  # the layer whose keys and values it attends to: itself unless it shares another's

    def qkv_width(self, n_heads: int) -> int:
        return (n_heads + self.kv_in_row * self.n_kv_heads) * self.head_dim


def attn_shapes(spec: ModelSpec) -> list[AttnShape]:
    shapes = []
    for i, layer in enumerate(spec.layers):
        hd, kv = spec.attn_dims(i)
        if layer.kv_source is not None:
            shapes.append(AttnShape(hd, kv, 0, layer.kv_source))
        else:
            shapes.append(AttnShape(hd, kv, 1 if layer.k_eq_v else 2, i))
    return shapes


def row_widths(spec: ModelSpec) -> dict[str, int]:
    """name: columns of every fp32 per-row activation buffer a step of the model writes."""
    shapes = attn_shapes(spec)
    h = spec.hidden_size
    widths = {
        "x": h,
        "h": h,  # a projection's output before its (sandwich) norm is added to x
        "qkv": max(a.qkv_width(spec.n_heads) for a in shapes),
        "attn": spec.n_heads * max(a.head_dim for a in shapes),
        "ff": max([spec.intermediate_size] + [l.intermediate_size or 0 for l in spec.layers]),
    }
    if any(l.moe and l.moe.parallel_dense for l in spec.layers):
        widths["mix"] = h  # the normed dense MLP output, the normed experts' output added to it
    if spec.per_layer_dim:
        widths["ple"] = widths["ple_proj"] = spec.n_layers * spec.per_layer_dim  # every layer's input; its source
        widths["ple_gate"] = spec.per_layer_dim
    return widths
