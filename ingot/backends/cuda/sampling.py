"""Token selection on the GPU for a batch of logits [M, V] fp32: greedy argmax, and sampling with
llama.cpp's chain (top-k, top-p, min-p, temperature). Both are graph-safe: per-row parameters and the
random stream are device tensors, nothing syncs with the host, and with the workspaces given nothing
allocates; the caller copies the int64 ids [M] to the host once per step.

Sampling sorts each row once (torch.sort, stable, descending: graph-capturable, and ties keep the lowest
index first, so temperature 0 and top-k 1 agree with argmax exactly). Every filter of the chain then keeps
a prefix of the sorted row, so one Triton program per row finds the prefix length and draws inside it by
inverse CDF, touching only the prefix wherever top-k, top-p or min-p bound it.

Randomness: one Philox-4x32 draw per row, counter = the row's int64 `seed_offset`, key fixed. A row's
token is then a pure function of (its logits, its parameters, its counter): it does not depend on which
other requests share the batch, a replayed graph draws fresh numbers once the caller bumps the counter
on the device (seed_offset += 1 each step), and a fixed counter reproduces a draw exactly. torch's
generators could not give that: their state lives on the host side, one stream serves the whole batch,
so a request's tokens would depend on its neighbours. Callers keep requests' streams apart by spacing
their counters (e.g. seed << 32 | step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ARGMAX_BLOCK = 1024  # ~150 programs for a 152k vocabulary at batch 1: about one per H100 SM
SAMPLE_BLOCK = 1024
_PHILOX_KEY = 0x5EED1A7C0FFEE


# --- argmax -------------------------------------------------------------------------------------------

@triton.jit
def _max_first(vals, idx, valid, SENTINEL):
    # torch.argmax's order: NaN beats everything, then the largest value; ties go to the lowest index.
    nan = (vals != vals) & valid
    has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    key = tl.where(valid, vals, float("-inf"))
    best = tl.max(tl.where(nan, float("-inf"), key), axis=0)
    winners = tl.where(has_nan, nan, valid & (key == best))
    first = tl.min(tl.where(winners, idx, SENTINEL), axis=0)
    return tl.where(has_nan, float("nan"), best), first


@triton.jit
def _argmax_partial_kernel(x_ptr, x_stride, V, pv_ptr, pi_ptr, p_stride, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * x_stride + offs, mask=valid, other=float("-inf"))
    best, first = _max_first(x, offs, valid, V)
    tl.store(pv_ptr + row * p_stride + blk, best)
    tl.store(pi_ptr + row * p_stride + blk, first)


@triton.jit
def _argmax_final_kernel(pv_ptr, pi_ptr, p_stride, NB, V, out_ptr, BLOCK_NB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_NB)
    valid = offs < NB
    vals = tl.load(pv_ptr + row * p_stride + offs, mask=valid, other=float("-inf"))
    idx = tl.load(pi_ptr + row * p_stride + offs, mask=valid, other=V)
    _, first = _max_first(vals, idx, valid, V)
    tl.store(out_ptr + row, first.to(tl.int64))


def _ids_out(out: torch.Tensor | None, M: int, device) -> torch.Tensor:
    """The int64 [M] token-id output both selectors write: the caller's buffer, checked, or a new one."""
    if out is None:
        return torch.empty(M, device=device, dtype=torch.int64)
    if out.shape != (M,) or out.dtype != torch.int64:
        raise ValueError(f"out must be int64 [{M}], got {out.dtype} {tuple(out.shape)}")
    return out


def argmax_workspace(M: int, V: int, device, block: int = ARGMAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    nb = triton.cdiv(V, block)
    return (torch.empty((M, nb), device=device, dtype=torch.float32),
            torch.empty((M, nb), device=device, dtype=torch.int32))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None,
           workspace: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = ARGMAX_BLOCK) -> torch.Tensor:
    """int64 [M]: the index of each row's maximum, like torch.argmax(logits, -1) (lowest index on ties,
    first NaN wins). Two launches: per-block maxima, then one reduce per row; the workspace comes from
    argmax_workspace(M, V, device, block)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [M, V] with contiguous rows, got {tuple(logits.shape)}")
    M, V = logits.shape
    if V >= 2**31:
        raise ValueError(f"vocabulary of {V} does not fit int32 indices")
    nb = triton.cdiv(V, block)
    if workspace is None:
        workspace = argmax_workspace(M, V, logits.device, block)
    pv, pi = workspace
    if pv.shape != (M, nb) or pi.shape != (M, nb) or pi.dtype != torch.int32 or pv.stride(0) != pi.stride(0):
        raise ValueError(f"argmax workspace must be float32 and int32 [{M}, {nb}] of equal strides")
    out = _ids_out(out, M, logits.device)
    if M == 0:
        return out
    _argmax_partial_kernel[(nb, M)](logits, logits.stride(0), V, pv, pi, pv.stride(0), BLOCK=block,
                                    num_warps=4)
    _argmax_final_kernel[(M,)](pv, pi, pv.stride(0), nb, V, out, BLOCK_NB=triton.next_power_of_2(nb),
                               num_warps=4 if nb > 256 else 1)
    return out


# --- sampling -----------------------------------------------------------------------------------------

@triton.jit
def _sample_sorted_kernel(vals_ptr, vals_stride, order_ptr, order_stride, V,
                          temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, u_ptr, out_ptr,
                          KEY: tl.constexpr, BLOCK: tl.constexpr, GIVEN_U: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = vals_ptr + row * vals_stride
    offs = tl.arange(0, BLOCK)
    top = tl.load(s_row)
    # An all -inf row would make every weight NaN; give it weight 0 everywhere and let rank 0 win.
    top = tl.where(top == float("-inf"), 0.0, top)
    temp = tl.load(temp_ptr + row)
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    k = tl.where((k > 0) & (k < V), k, V)
    use_p = top_p < 1.0

    # Weights e = exp(s - max) at temperature 1: the chain filters on these, min-p as e >= min_p (the
    # ratio to the top probability does not change when top-k or top-p renormalise).
    mass_k = 0.0  # mass of the top-k set, which top-p's threshold is relative to
    if use_p:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, k, BLOCK):
            o = start + offs
            acc += tl.exp(tl.load(s_row + o, mask=o < k, other=float("-inf")) - top)
        mass_k = tl.sum(acc, axis=0)
    p_mass = tl.where(use_p, top_p * mass_k, float("inf"))

    # Kept ranks form a prefix (rank < k, mass before < p, e >= min_p are all monotone in rank), so scan
    # until a block keeps fewer than all of its ranks.
    n_keep = 0
    before = 0.0
    start = 0
    go = start < k
    while go:
        o = start + offs
        valid = o < k
        e = tl.exp(tl.load(s_row + o, mask=valid, other=float("-inf")) - top)
        excl = tl.cumsum(e, axis=0) - e + before
        keep = valid & (excl < p_mass) & (e >= min_p)
        keep = keep | (o == 0)  # llama.cpp's min_keep = 1
        kept = tl.sum(keep.to(tl.int32), axis=0)
        n_keep += kept
        before += tl.sum(e, axis=0)
        start += BLOCK
        go = (start < k) & (kept == BLOCK)

    # Draw by inverse CDF over the prefix at the row's temperature.
    rank = 0
    if (temp > 0.0) & (n_keep > 1):
        inv_t = 1.0 / temp
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_keep, BLOCK):
            o = start + offs
            acc += tl.exp((tl.load(s_row + o, mask=o < n_keep, other=float("-inf")) - top) * inv_t)
        if GIVEN_U:
            u = tl.load(u_ptr + row)
        else:
            seed = tl.load(seed_ptr + row)
            zero = (seed * 0).to(tl.uint32)
            r0, _, _, _ = tl.philox(KEY, (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                    zero, zero)
            u = tl.uint_to_uniform_float(r0)
        target = u * tl.sum(acc, axis=0)
        # Rounding can leave the running sum a hair short of the total: fall back to the last rank
        # with any weight, never to one of weight 0.
        found = n_keep
        last = 0
        before = 0.0
        start = 0
        go = start < n_keep
        while go:
            o = start + offs
            valid = o < n_keep
            w = tl.exp((tl.load(s_row + o, mask=valid, other=float("-inf")) - top) * inv_t)
            incl = tl.cumsum(w, axis=0) + before
            found = tl.minimum(found, tl.min(tl.where(valid & (incl > target), o, n_keep), axis=0))
            last = tl.maximum(last, tl.max(tl.where(valid & (w > 0.0), o, 0), axis=0))
            before += tl.sum(w, axis=0)
            start += BLOCK
            go = (start < n_keep) & (found == n_keep)
        rank = tl.where(found < n_keep, found, last)
    tl.store(out_ptr + row, tl.load(order_ptr + row * order_stride + rank).to(tl.int64))


def sample_workspace(M: int, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((M, V), device=device, dtype=torch.float32),
            torch.empty((M, V), device=device, dtype=torch.int64))


def sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed_offset: torch.Tensor, out: torch.Tensor | None = None,
           workspace: tuple[torch.Tensor, torch.Tensor] | None = None, uniforms: torch.Tensor | None = None,
           block: int = SAMPLE_BLOCK) -> torch.Tensor:
    """int64 [M] token ids drawn from logits [M, V] fp32 with per-row float32 temperature / top_p / min_p and
    int32 top_k [M] (top_k 0, top_p >= 1, min_p 0 switch a filter off; temperature 0 is greedy) and the
    int64 Philox counter seed_offset [M]. The workspace (sorted values and order) comes from
    sample_workspace(M, V, device). `uniforms` (float32 [M] in [0, 1)) replaces the Philox draw: for callers
    that own their randomness, and for tests that check the inverse CDF on a fixed grid. When every row is
    greedy, argmax() is cheaper: it skips the sort."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 [M, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    M, V = logits.shape
    for name, t, dt in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                        ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
                        ("seed_offset", seed_offset, torch.int64)):
        if t.shape != (M,) or t.dtype != dt:
            raise ValueError(f"{name} must be {dt} [{M}], got {t.dtype} {tuple(t.shape)}")
    if uniforms is not None and (uniforms.shape != (M,) or uniforms.dtype != torch.float32):
        raise ValueError(f"uniforms must be float32 [{M}], got {uniforms.dtype} {tuple(uniforms.shape)}")
    if workspace is None:
        workspace = sample_workspace(M, V, logits.device)
    vals, order = workspace
    if vals.shape != (M, V) or order.shape != (M, V) or vals.dtype != torch.float32 or order.dtype != torch.int64:
        raise ValueError(f"sample workspace must be float32 and int64 [{M}, {V}]")
    out = _ids_out(out, M, logits.device)
    if M == 0:
        return out
    torch.sort(logits, dim=-1, descending=True, stable=True, out=(vals, order))
    _sample_sorted_kernel[(M,)](vals, vals.stride(0), order, order.stride(0), V,
                                temperature, top_k, top_p, min_p, seed_offset,
                                uniforms if uniforms is not None else temperature, out,
                                KEY=_PHILOX_KEY, BLOCK=block, GIVEN_U=uniforms is not None, num_warps=4)
    return out
