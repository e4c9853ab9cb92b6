"""Model weights in the CUDA backend's form: packed linears (QKV and gate/up fused), fp32 norms,
all copied into one device arena."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ingot.backends.cuda import gemm, gemv
from ingot.backends.cuda.moe import MoEWeights
from ingot.errors import IngotError
from ingot.models.base import ModelSpec
from ingot.quant import pack


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: pack.PackedLinear  # q, then k and v where the layer has them (layout.AttnShape.kv_in_row)
    o: pack.PackedLinear
    ffn_norm: torch.Tensor
    gate_up: pack.PackedLinear | None  # None in a mixture-of-experts layer without a dense MLP beside it
    down: pack.PackedLinear | None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    moe: MoEWeights | None = None
    # Gemma 4's experts beside the dense MLP: the dense output's norm, the experts' input and output norms
    post_ffn_norm_1: torch.Tensor | None = None
    pre_ffn_norm_2: torch.Tensor | None = None
    post_ffn_norm_2: torch.Tensor | None = None
    # Gemma 4's per-layer input: its gate [P, H], the projection back [H, P] and that projection's norm
    inp_gate: pack.PackedLinear | None = None
    proj: pack.PackedLinear | None = None
    post_norm: torch.Tensor | None = None
    layer_scale: torch.Tensor | None = None  # fp32 [1]: the layer's output is multiplied by it (Gemma 4)


@dataclass
class ModelWeights:
    embed: pack.PackedLinear  # token_embd; also the lm_head when embeddings are tied
    lm_head: pack.PackedLinear
    output_norm: torch.Tensor
    layers: list[LayerWeights] = field(default_factory=list)
    arena_bytes: int = 0
    # Gemma 4's per-layer inputs: their token embedding [V, L * P], the projection of the main embedding
    # [L * P, H] and its per-slice norm [P]
    per_layer_embed: pack.PackedLinear | None = None
    per_layer_proj: pack.PackedLinear | None = None
    per_layer_norm: torch.Tensor | None = None

    def layer_linears(self, l: LayerWeights):
        """A layer's dense linears (the experts aside)."""
        return [p for p in (l.qkv, l.o, l.gate_up, l.down, l.inp_gate, l.proj) if p is not None]

    def linears(self):
        yield self.lm_head
        if self.embed is not self.lm_head:
            yield self.embed
        yield from (p for p in (self.per_layer_embed, self.per_layer_proj) if p is not None)
        for l in self.layers:
            yield from self.layer_linears(l)
            if l.moe:
                yield from (l.moe.gate_up, l.moe.down)

    def workspace_numel(self, m: int, lm_head_rows: int) -> int:
        """The split-K workspace the largest projection of a step needs, GEMV or short GEMM (whichever runs at
        that row count; the two share one layout): every layer's linears at m rows, the lm_head at
        lm_head_rows (so one workspace serves the whole step and no call allocates)."""
        def numel(p, rows, gated=None):
            n = gemm.workspace_numel(p, rows, gated)
            return max(n, gemv.workspace_numel(p, rows, gated)) if rows <= gemv.MAX_M else n

        need = [numel(self.lm_head, lm_head_rows)]
        if self.per_layer_proj is not None:
            need.append(numel(self.per_layer_proj, m))
        for l in self.layers:
            need += [numel(p, m, gated="silu" if p is l.gate_up else None) for p in self.layer_linears(l)]
        return max(max(need), 1)

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every linear once, of the embedding tables one row, and of a
        mixture-of-experts layer the router and the k experts a token uses."""
        total = sum(p.nbytes for p in self.linears())
        for table in (self.embed, self.per_layer_embed):
            if table is not None and table is not self.lm_head:
                total -= table.nbytes - table.nbytes // table.n
        total += sum(t.numel() * t.element_size() for l in self.layers for t in _norms(l))
        for l in self.layers:
            if l.moe:
                total += l.moe.active_bytes() - l.moe.gate_up.nbytes - l.moe.down.nbytes
        return total


def _norms(l: LayerWeights):
    return [t for t in (l.attn_norm, l.ffn_norm, l.q_norm, l.k_norm, l.post_attn_norm, l.post_ffn_norm,
                        l.post_ffn_norm_1, l.pre_ffn_norm_2, l.post_ffn_norm_2, l.post_norm, l.layer_scale)
            if t is not None]


# GGUF Q6_K (the output / tied embedding of llama-quantize's Q4_0 files) is held as its exact q8 form with
# group-16 scales by default: 10 bits per weight against 6.56, but the q8 GEMV reads it twice as fast as the
# native q6k kernel (benchmarks/q6k_ab.py, H200, 2026-12-01: Llama-3.2-1B's 128256x2048 lm_head 98 against
# 197 us at plan()'s tiles, 3.4 against 1.1 TB/s; 1042 against 3384 us at batch 8). INGOT_Q6K_NATIVE=1
# keeps the native kind (gemv_q6k.py), a third less memory for that matrix.
Q6K_NATIVE = os.environ.get("INGOT_Q6K_NATIVE") == "1"


def kernel_form(p: pack.PackedLinear) -> pack.PackedLinear:
    """The form the kernels read a packed matrix in: q6k as exact q8 unless Q6K_NATIVE."""
    return pack.q6k_as_q8(p) if p.kind == "q6k" and not Q6K_NATIVE else p


def pack_tensor(ref, quant: str | None) -> pack.PackedLinear:
    """One stored matrix in kernel layout. GGUF and MLX types repack as exactly as the layout allows;
    float tensors stay f16 unless a quant ("q4" | "q8") is asked for."""
    from ingot.formats.checkpoint import GGMLTensor, PackedTensor

    if isinstance(ref, PackedTensor):  # a .ingot file: already in kernel layout
        return kernel_form(ref.packed())
    if isinstance(ref, GGMLTensor) and ref.qtype not in ("F32", "F16", "BF16"):
        return kernel_form(pack.from_ggml(ref))
    # Stacked experts [E, rows, k] become one [E * rows, k] matrix.
    if ref.qtype in ("MLX4", "MLX8"):
        weight, scales, biases = (a.reshape(-1, a.shape[-1]) for a in ref.packed())
        return pack.from_mlx(weight, scales, biases, ref.bits, ref.group_size)
    values = ref.dequantize()
    values = values.reshape(-1, values.shape[-1])
    if quant in ("q4", "q8"):
        return pack.quantize(values, quant, group=32, sym=(quant == "q8"))
    if quant not in (None, "f16"):
        raise IngotError(f"unknown quant '{quant}' (q4, q8 or f16)")
    return pack.quantize(values, "f16")


def check_fits(need: dict[str, int], free: int, device) -> None:
    """Refuse, with the numbers, a model whose weights, cache and buffers exceed the device's free memory."""
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{name} {n / 2**30:.2f} GiB" for name, n in need.items())
        raise IngotError(f"the model needs {total / 2**30:.2f} GiB on {device} ({parts}); only "
                         f"{free / 2**30:.2f} GiB is free. A smaller max_context shrinks the KV cache.")


def kv_cache_bytes(spec: ModelSpec, max_context: int, max_batch: int = 1) -> int:
    """fp16 keys and values for every layer that keeps its own, as CudaKVCache allocates them."""
    per_position = sum(kv * hd for kv, hd in (s for s in spec.kv_cache_shapes() if s is not None))
    return 2 * max_batch * max_context * per_position * 2


def load_weights(ckpt, spec: ModelSpec, device, quant: str | None = None, progress: bool | None = None,
                 reserve: dict[str, int] | None = None):
    """Packed weights in one device arena. `reserve`: other allocations (KV cache, buffers) the fit check
    counts before anything is allocated."""
    from ingot.formats.checkpoint import fused_matrix
    from ingot.progress import byte_bar

    t = ckpt.tensors
    bar = byte_bar(sum(t[n].nbytes for n in spec.weights()), "packing", progress)

    def linear(*names):
        bar.update(sum(t[n].nbytes for n in names))
        stored = fused_matrix([t[n] for n in names])  # a .ingot file's fused QKV / gate-up: no repacking
        if stored is not None:
            return kernel_form(stored)
        parts = [pack_tensor(t[n], quant) for n in names]
        return parts[0] if len(parts) == 1 else pack.concat_rows(parts)

    def norm(name):
        if name not in t:
            return None
        bar.update(t[name].nbytes)
        return t[name].dequantize().to(torch.float32)

    def router(name):
        """f16 where that is exact, else fp32: the router's choices must not move with a rounding."""
        bar.update(t[name].nbytes)
        r = t[name].dequantize().to(torch.float32)
        return r.half() if torch.equal(r.half().float(), r) else r

    def experts(p, moe):
        names = p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"
        stored = fused_matrix([t[n] for n in names])  # a .ingot file's [gate; up] per expert
        if stored is not None:
            bar.update(sum(t[n].nbytes for n in names))
            gate_up = kernel_form(stored)
        else:
            gate_up = pack.interleave_rows([linear(n) for n in names], moe.n_experts)
        scales = {}
        if moe.router_scales:  # Gemma 4: the router's input is normed with scale / sqrt(hidden), not ffn_norm
            scales = dict(router_norm=norm(p + "ffn_gate_inp_scale.weight") * spec.hidden_size**-0.5,
                          expert_scale=norm(p + "ffn_exp_scale.weight"))
        return MoEWeights(router=router(p + "ffn_gate_inp.weight"), gate_up=gate_up,
                          down=linear(p + "ffn_down_exps.weight"), top_k=moe.top_k, norm_topk=moe.norm_topk_prob,
                          **scales)

    embed = linear("token_embd.weight")
    lm_head = embed if spec.tie_embeddings else linear("output.weight")
    w = ModelWeights(embed=embed, lm_head=lm_head, output_norm=norm("output_norm.weight"))
    if spec.per_layer_dim:
        w.per_layer_embed = linear("per_layer_token_embd.weight")
        w.per_layer_proj = linear("per_layer_model_proj.weight")
        w.per_layer_norm = norm("per_layer_proj_norm.weight")
    for i, layer in enumerate(spec.layers):
        p = f"blk.{i}."
        moe = layer.moe
        dense = moe is None or moe.parallel_dense
        attn = ["attn_q"] + (["attn_k"] if layer.kv_source is None else []) + \
            (["attn_v"] if layer.kv_source is None and not layer.k_eq_v else [])
        w.layers.append(LayerWeights(
            attn_norm=norm(p + "attn_norm.weight"),
            qkv=linear(*(p + n + ".weight" for n in attn)),
            o=linear(p + "attn_output.weight"),
            ffn_norm=norm(p + "ffn_norm.weight"),
            gate_up=linear(p + "ffn_gate.weight", p + "ffn_up.weight") if dense else None,
            down=linear(p + "ffn_down.weight") if dense else None,
            moe=experts(p, moe) if moe else None,
            q_norm=norm(p + "attn_q_norm.weight"),
            k_norm=norm(p + "attn_k_norm.weight"),
            post_attn_norm=norm(p + "post_attention_norm.weight"),
            post_ffn_norm=norm(p + "post_ffw_norm.weight"),
            post_ffn_norm_1=norm(p + "post_ffw_norm_1.weight"),
            pre_ffn_norm_2=norm(p + "pre_ffw_norm_2.weight"),
            post_ffn_norm_2=norm(p + "post_ffw_norm_2.weight"),
            inp_gate=linear(p + "inp_gate.weight") if spec.per_layer_dim else None,
            proj=linear(p + "proj.weight") if spec.per_layer_dim else None,
            post_norm=norm(p + "post_norm.weight"),
            layer_scale=norm(p + "layer_output_scale.weight"),
        ))
    bar.close()
    return _to_arena(w, torch.device(device), reserve or {}, progress)


def _tensors(w: ModelWeights):
    """(owner, attribute) of every tensor, each once (a tied lm_head is the embedding)."""
    seen = set()
    owners = [w] + [p for p in w.linears()] + w.layers + [l.moe for l in w.layers if l.moe]
    for owner in owners:
        for attr, value in vars(owner).items():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                yield owner, attr, value


STAGING_BYTES = 64 << 20  # each of the two pinned buffers a load streams the weights through


class _Staging:
    """Host-to-device copies into a flat device tensor through two pinned buffers, pinned once: the host fills
    one buffer while the other's transfer runs. Pinning each tensor instead (pin_memory per tensor) costs a
    page-locking allocation as large as the tensor, slower than the copy itself. Consecutive small tensors
    share one buffer fill and one transfer (the alignment padding between them goes along)."""

    def __init__(self, dst: torch.Tensor, nbytes: int | None = None):
        self.dst = dst
        self.cuda = dst.device.type == "cuda"
        size = max(1, min(nbytes or STAGING_BYTES, dst.numel()))
        self.bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.done = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.i, self.base, self.end = 0, 0, 0  # this buffer holds dst[base : base + end]

    def put(self, offset: int, src: torch.Tensor) -> None:
        """Copy src (flat uint8) to dst[offset:]; offsets must not decrease from one call to the next."""
        cap, at = self.bufs[0].numel(), 0
        while at < src.numel():
            if self.end == 0:
                self.base = offset + at
            room = cap - (offset + at - self.base)
            if room <= 0:
                self.flush()
                continue
            n = min(room, src.numel() - at)
            lo = offset + at - self.base
            self.bufs[self.i][lo : lo + n].copy_(src[at : at + n])
            self.end, at = lo + n, at + n

    def flush(self) -> None:
        if self.end:
            self.dst[self.base : self.base + self.end].copy_(self.bufs[self.i][: self.end], non_blocking=self.cuda)
            if self.cuda:
                self.done[self.i].record()
            self.i ^= 1
            if self.cuda:
                self.done[self.i].synchronize()  # the transfer that last read the next buffer has finished
        self.end = 0


def _to_arena(w: ModelWeights, device: torch.device, reserve: dict[str, int], progress: bool | None = None
              ) -> ModelWeights:
    """Copy every tensor into one device allocation, 256-byte aligned, through pinned staging."""
    from ingot.progress import byte_bar

    align = 256
    items = list(_tensors(w))
    sizes = [-(-v.numel() * v.element_size() // align) * align for _, _, v in items]
    total = sum(sizes)
    if device.type == "cuda":
        check_fits({"weights": total, **reserve}, torch.cuda.mem_get_info(device)[0], device)
    arena = torch.empty(total, dtype=torch.uint8, device=device)
    staging = _Staging(arena)
    at = 0
    with byte_bar(total, f"copying to {device.type}", progress) as bar:
        for (owner, attr, value), size in zip(items, sizes):
            nbytes = value.numel() * value.element_size()
            staging.put(at, value.contiguous().view(torch.uint8).reshape(-1))
            setattr(owner, attr, arena[at : at + nbytes].view(value.dtype).view(value.shape))
            at += size
            bar.update(size)
        staging.flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w.arena_bytes = total
    return w
