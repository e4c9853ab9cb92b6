"""Token selection on the GPU for a batch of logits [M, V] fp32: llama.cpp's penalties, greedy argmax, and
sampling with llama.cpp's chain (top-k, top-p, min-p, temperature). All are graph-safe: per-row parameters and the
random stream are device tensors, nothing syncs with the host, and with the workspaces given nothing
allocates; the caller copies the int64 ids [M] to the host once per step.

Sampling sorts only the head of each row: a prefilter picks at most CANDIDATES tokens (all those above a
distance from the row max) without sorting, and one stable sort orders them, so ties keep the lowest index
first and temperature 0 and top-k 1 agree with argmax exactly. Every filter of the chain then keeps a prefix
of the sorted head, and one Triton program per row finds the prefix length and draws inside it by inverse
CDF. When the prefix may run past the candidates, that program samples the unsorted row instead (see the
sampling section). A workspace made with candidates=None sorts the whole row, as before: the A/B baseline.
Penalties (apply_penalties) change the logits in place before either selector.

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

from ingot.backends.cuda import pdl

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
def _argmax_partial_kernel(x_ptr, x_stride, V, pv_ptr, pi_ptr, p_stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * x_stride + offs, mask=valid, other=float("-inf"))
    best, first = _max_first(x, offs, valid, V)
    tl.store(pv_ptr + row * p_stride + blk, best)
    tl.store(pi_ptr + row * p_stride + blk, first)


@triton.jit
def _argmax_final_kernel(pv_ptr, pi_ptr, p_stride, NB, V, out_ptr, BLOCK_NB: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
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
                                    num_warps=4, **pdl.LAUNCH)
    _argmax_final_kernel[(M,)](pv, pi, pv.stride(0), nb, V, out, BLOCK_NB=triton.next_power_of_2(nb),
                               num_warps=4 if nb > 256 else 1, **pdl.LAUNCH)
    return out


# --- sampling -----------------------------------------------------------------------------------------
#
# The chain keeps a prefix of each row sorted by value, so only the head of the row needs sorting. A
# prefilter finds it without sorting the vocabulary: three parallel passes over the row (block max and
# softmax mass; a histogram of each token's distance to the row max over LEVELS; compaction of the tokens
# above the deepest level whose total count fits CANDIDATES, in index order), then a small stable sort of
# those candidates. The chain kernel then runs on the sorted candidates and checks that the kept prefix
# really ends inside them (top-k within the candidates, or the top-p mass, or the min-p bound reached);
# when it does not (top_k above the capacity, a nearly flat row, or plain temperature sampling of the
# whole distribution) it samples from the unsorted row itself: thresholds for top-k and top-p found by
# bisection on the float order, then an inverse-CDF scan in index order. Same distribution, no sort.

CANDIDATES = 1024
PREFILTER_BLOCK = 1024
LEVELS = 32  # distance d = max - x: level 0 is d == 0, level j holds d <= 2**((j - 20) / 2), the last all


@triton.jit
def _level(x, m):
    d = tl.where(x == m, 0.0, m - x)
    lvl = tl.ceil(2.0 * tl.log2(tl.maximum(d, 1e-30))) + 20.0
    lvl = tl.minimum(tl.maximum(lvl, 1.0), 31.0)
    return tl.where(d == 0.0, 0, lvl.to(tl.int32))


@triton.jit
def _block_max_mass_kernel(x_ptr, x_stride, V, bmax_ptr, bsum_ptr, p_stride, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + offs, mask=offs < V, other=float("-inf"))
    bm = tl.max(x, axis=0)
    safe = tl.where(bm == float("-inf"), 0.0, bm)
    tl.store(bmax_ptr + row * p_stride + blk, bm)
    tl.store(bsum_ptr + row * p_stride + blk, tl.sum(tl.exp(x - safe), axis=0))


@triton.jit
def _row_max_mass(bmax_ptr, bsum_ptr, p_stride, row, NB, BLOCK_NB: tl.constexpr):
    o = tl.arange(0, BLOCK_NB)
    bm = tl.load(bmax_ptr + row * p_stride + o, mask=o < NB, other=float("-inf"))
    bs = tl.load(bsum_ptr + row * p_stride + o, mask=o < NB, other=0.0)
    m = tl.max(bm, axis=0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(bs * tl.exp(tl.where(bs > 0.0, bm - safe, 0.0)), axis=0)


@triton.jit
def _level_histogram_kernel(x_ptr, x_stride, V, bmax_ptr, bsum_ptr, p_stride, NB, hist_ptr,
                            BLOCK: tl.constexpr, BLOCK_NB: tl.constexpr, NL: tl.constexpr):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    m, _ = _row_max_mass(bmax_ptr, bsum_ptr, p_stride, row, NB, BLOCK_NB)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * x_stride + offs, mask=valid, other=float("-inf"))
    h = tl.histogram(_level(x, m), NL, mask=valid)
    tl.store(hist_ptr + (row * p_stride + blk) * NL + tl.arange(0, NL), h)


@triton.jit
def _compact_kernel(x_ptr, x_stride, V, bmax_ptr, bsum_ptr, p_stride, NB, hist_ptr,
                    cv_ptr, ci_ptr, c_stride, row_ptr, CAP,
                    BLOCK: tl.constexpr, BLOCK_NB: tl.constexpr, NL: tl.constexpr, BLOCK_CAP: tl.constexpr):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    m, z = _row_max_mass(bmax_ptr, bsum_ptr, p_stride, row, NB, BLOCK_NB)
    b = tl.arange(0, BLOCK_NB)
    lv = tl.arange(0, NL)
    h = tl.load(hist_ptr + (row * p_stride + b[:, None]) * NL + lv[None, :], mask=b[:, None] < NB, other=0)
    per_block = tl.cumsum(h, axis=1)  # [block, level]: tokens at distance <= level
    total = tl.sum(per_block, axis=0)
    # The deepest level whose tokens all fit; -1 when even the ties at the max overflow (no candidates).
    cut = tl.max(tl.where(total <= CAP, lv, -1), axis=0)
    at_cut = tl.sum(tl.where(lv[None, :] == cut, per_block, 0), axis=1)  # [block]
    n = tl.sum(at_cut, axis=0)
    start = tl.sum(tl.where(b < blk, at_cut, 0), axis=0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * x_stride + offs, mask=valid, other=float("-inf"))
    take = valid & (_level(x, m) <= cut)
    dst = start + tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(cv_ptr + row * c_stride + dst, x, mask=take)
    tl.store(ci_ptr + row * c_stride + dst, offs.to(tl.int64), mask=take)
    if blk == 0:
        # The sort needs the slots past n at -inf; the chain needs m, the mass and a bound on what was
        # left out: every token outside weighs less than exp(-distance of the cut level).
        for s0 in range(0, CAP, BLOCK_CAP):
            o = s0 + tl.arange(0, BLOCK_CAP)
            tl.store(cv_ptr + row * c_stride + o, float("-inf"), mask=(o >= n) & (o < CAP))
        bound = tl.where(cut < 1, 1.0, tl.exp(-tl.exp2((cut.to(tl.float32) - 20.0) * 0.5)))
        bound = tl.where(cut == NL - 1, 0.0, bound)
        tl.store(row_ptr + row * 4 + 0, m)
        tl.store(row_ptr + row * 4 + 1, z)
        tl.store(row_ptr + row * 4 + 2, n.to(tl.float32))
        tl.store(row_ptr + row * 4 + 3, bound)


@triton.jit
def _key(x):
    # Signed int32 keys in the order of the floats (NaN aside).
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _bisect_cut(x_row, V, m, floor_key, limit, BY_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """The smallest key v with (count or mass of tokens of key > v and >= floor_key) < limit: the chain
    keeps exactly the tokens at or above it (ties at the cut all kept). A 16-way search: each pass over
    the row tries 16 keys, so 8 passes cover the 2**32 keys."""
    offs = tl.arange(0, BLOCK)
    way = tl.arange(0, 16).to(tl.int64)
    lo = floor_key - 1  # the predicate is false here and true at hi
    hi = floor_key * 0 + 2147483647
    while hi - lo > 1:
        step = (hi - lo + 15) // 16
        probe = tl.minimum(lo + (way + 1) * step, hi)
        acc = tl.zeros([BLOCK, 16], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            o = start + offs
            x = tl.load(x_row + o, mask=o < V, other=float("-inf"))
            k = _key(x)
            above = ((o < V) & (k >= floor_key))[:, None] & (k[:, None] > probe[None, :])
            if BY_MASS:
                acc += tl.where(above, tl.exp(x - m)[:, None], 0.0)
            else:
                acc += above.to(tl.float32)
        ok = tl.sum(acc, axis=0) < limit
        hi = tl.min(tl.where(ok, probe, hi), axis=0)
        lo = tl.max(tl.where(ok, lo, probe), axis=0)
    return hi


@triton.jit
def _sample_unsorted(x_row, V, m, z, k, top_p, min_p, temp, u, BLOCK: tl.constexpr):
    """The chain on the unsorted row: thresholds by bisection, then inverse CDF in index order."""
    offs = tl.arange(0, BLOCK)
    safe = tl.where(m == float("-inf"), 0.0, m)
    key_max = _key(m)
    floor_key = (key_max * 0) - 2147483648
    if k < V:
        floor_key = tl.minimum(_bisect_cut(x_row, V, safe, floor_key, k.to(tl.float32), False, BLOCK), key_max)
    if top_p < 1.0:
        mass_k = z
        if k < V:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                o = start + offs
                x = tl.load(x_row + o, mask=o < V, other=float("-inf"))
                acc += tl.where(_key(x) >= floor_key, tl.exp(x - safe), 0.0)
            mass_k = tl.sum(acc, axis=0)
        floor_key = tl.minimum(_bisect_cut(x_row, V, safe, floor_key, top_p * mass_k, True, BLOCK), key_max)
    inv_t = 1.0 / tl.where(temp > 0.0, temp, 1.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        o = start + offs
        x = tl.load(x_row + o, mask=o < V, other=float("-inf"))
        keep = (_key(x) >= floor_key) & (tl.exp(x - safe) >= min_p)
        acc += tl.where(keep, tl.exp((x - safe) * inv_t), 0.0)
    target = u * tl.sum(acc, axis=0)
    found = V
    last = V
    first_max = V
    before = 0.0
    for start in range(0, V, BLOCK):
        o = start + offs
        valid = o < V
        x = tl.load(x_row + o, mask=valid, other=float("-inf"))
        keep = valid & (_key(x) >= floor_key) & (tl.exp(x - safe) >= min_p)
        w = tl.where(keep, tl.exp((x - safe) * inv_t), 0.0)
        incl = tl.cumsum(w, axis=0) + before
        found = tl.minimum(found, tl.min(tl.where(keep & (incl > target) & (w > 0.0), o, V), axis=0))
        last = tl.where(tl.max(w, axis=0) > 0.0, tl.max(tl.where(w > 0.0, o, -1), axis=0), last)
        first_max = tl.minimum(first_max, tl.min(tl.where(valid & (x == m), o, V), axis=0))
        before += tl.sum(w, axis=0)
    first_max = tl.where(first_max < V, first_max, 0)
    pick = tl.where(found < V, found, tl.where(last < V, last, first_max))
    return tl.where(temp > 0.0, pick, first_max)


@triton.jit
def _sample_sorted_kernel(vals_ptr, vals_stride, order_ptr, order_stride, ids_ptr, L, x_ptr, x_stride, V, row_ptr,
                          temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, u_ptr, out_ptr,
                          KEY: tl.constexpr, BLOCK: tl.constexpr, GIVEN_U: tl.constexpr,
                          PREFILTERED: tl.constexpr):
    """The chain on the head of a row sorted by value (the whole row, or the prefilter's L candidates,
    n of them real), with the unsorted row as the fallback when the kept prefix may reach past them."""
    row = tl.program_id(0).to(tl.int64)
    s_row = vals_ptr + row * vals_stride
    offs = tl.arange(0, BLOCK)
    temp = tl.load(temp_ptr + row)
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    k = tl.where((k > 0) & (k < V), k, V)
    use_p = top_p < 1.0
    if PREFILTERED:
        z = tl.load(row_ptr + row * 4 + 1)
        n = tl.load(row_ptr + row * 4 + 2).to(tl.int32)
        bound = tl.load(row_ptr + row * 4 + 3)
    else:
        z = 0.0
        n = L
        bound = 0.0
    k_in = k <= n  # the whole top-k set is sorted here
    lim = tl.minimum(k, n)
    top = tl.load(s_row)
    # An all -inf row would make every weight NaN; give it weight 0 everywhere and let rank 0 win.
    top = tl.where(top == float("-inf"), 0.0, top)

    # Weights e = exp(s - max) at temperature 1: the chain filters on these, min-p as e >= min_p (the
    # ratio to the top probability does not change when top-k or top-p renormalise).
    mass_k = z  # mass of the top-k set, which top-p's threshold is relative to: the row's without top-k
    if use_p & k_in:
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
    go = start < lim
    while go:
        o = start + offs
        valid = o < lim
        e = tl.exp(tl.load(s_row + o, mask=valid, other=float("-inf")) - top)
        excl = tl.cumsum(e, axis=0) - e + before
        keep = valid & (excl < p_mass) & (e >= min_p)
        keep = keep | (o == 0)  # llama.cpp's min_keep = 1
        kept = tl.sum(keep.to(tl.int32), axis=0)
        n_keep += kept
        before += tl.sum(e, axis=0)
        start += BLOCK
        go = (start < lim) & (kept == BLOCK)
    # The prefix is complete when a filter cut it inside, or nothing past the candidates can be kept:
    # top-k ends here, the candidates already hold the top-p mass, or all outside weigh below min_p.
    exact = k_in | (n_keep < lim) | (before >= p_mass) | (bound <= min_p)
    exact = (exact & (n > 0) & (k_in | ~use_p | (k == V))) | ((temp == 0.0) & (n > 0))

    if GIVEN_U:
        u = tl.load(u_ptr + row)
    else:
        seed = tl.load(seed_ptr + row)
        zero = (seed * 0).to(tl.uint32)
        r0, _, _, _ = tl.philox(KEY, (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                zero, zero)
        u = tl.uint_to_uniform_float(r0)
    if exact:
        # Draw by inverse CDF over the prefix at the row's temperature.
        rank = 0
        if (temp > 0.0) & (n_keep > 1):
            inv_t = 1.0 / temp
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_keep, BLOCK):
                o = start + offs
                acc += tl.exp((tl.load(s_row + o, mask=o < n_keep, other=float("-inf")) - top) * inv_t)
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
        tok = tl.load(order_ptr + row * order_stride + rank)
        if PREFILTERED:
            tok = tl.load(ids_ptr + row * order_stride + tok)
        tl.store(out_ptr + row, tok.to(tl.int64))
    else:
        m = tl.load(row_ptr + row * 4 + 0)
        # int64 like the other branch's token: the compiler merges variables across an if/else by type
        tok = _sample_unsorted(x_ptr + row * x_stride, V, m, z, k, top_p, min_p, temp, u, BLOCK).to(tl.int64)
        tl.store(out_ptr + row, tok)


def sample_workspace(M: int, V: int, device, candidates: int | None = CANDIDATES,
                     block: int = PREFILTER_BLOCK) -> dict[str, torch.Tensor]:
    """Buffers for sample(): with `candidates` (at least the largest top_k the rows use, for the fast
    path) the prefilter's; with None the old whole-row sort's (the A/B baseline)."""
    f32, i64 = torch.float32, torch.int64
    if candidates is None:
        return dict(vals=torch.empty((M, V), device=device, dtype=f32),
                    order=torch.empty((M, V), device=device, dtype=i64))
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    cap, nb = min(candidates, V), triton.cdiv(V, block)
    return dict(vals=torch.empty((M, cap), device=device, dtype=f32),
                order=torch.empty((M, cap), device=device, dtype=i64),
                cand_vals=torch.empty((M, cap), device=device, dtype=f32),
                cand_ids=torch.empty((M, cap), device=device, dtype=i64),
                bmax=torch.empty((M, nb), device=device, dtype=f32), bsum=torch.empty((M, nb), device=device, dtype=f32),
                hist=torch.empty((M, nb, LEVELS), device=device, dtype=torch.int32),
                row=torch.empty((M, 4), device=device, dtype=f32))


def _check_workspace(ws: dict, M: int, V: int, block: int) -> None:
    cap = ws["vals"].shape[1]
    want = {"vals": (torch.float32, (M, V if "cand_vals" not in ws else cap)), "order": (torch.int64, (M, cap))}
    if "cand_vals" in ws:
        nb = triton.cdiv(V, block)
        want.update(cand_vals=(torch.float32, (M, cap)), cand_ids=(torch.int64, (M, cap)),
                    bmax=(torch.float32, (M, nb)), bsum=(torch.float32, (M, nb)),
                    hist=(torch.int32, (M, nb, LEVELS)), row=(torch.float32, (M, 4)))
    for name, (dt, shape) in want.items():
        t = ws.get(name)
        if t is None or t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"sample workspace {name} must be contiguous {dt} {list(shape)}: use sample_workspace()")
    if "cand_vals" in ws and cap > V:
        raise ValueError(f"sample workspace holds {cap} candidates, more than the vocabulary of {V}")


def sample(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed_offset: torch.Tensor, out: torch.Tensor | None = None,
           workspace: dict[str, torch.Tensor] | None = None, uniforms: torch.Tensor | None = None,
           block: int = SAMPLE_BLOCK, prefilter_block: int = PREFILTER_BLOCK) -> torch.Tensor:
    """int64 [M] token ids drawn from logits [M, V] fp32 with per-row float32 temperature / top_p / min_p and
    int32 top_k [M] (top_k 0, top_p >= 1, min_p 0 switch a filter off; temperature 0 is greedy) and the
    int64 Philox counter seed_offset [M]. The workspace comes from sample_workspace(M, V, device): its
    kind picks the prefilter (default) or the whole-row sort. `uniforms` (float32 [M] in [0, 1)) replaces
    the Philox draw: for callers that own their randomness, and for tests that check the inverse CDF on a
    fixed grid. When every row is greedy, argmax() is cheaper."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 [M, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    M, V = logits.shape
    if V >= 2**31 or V == 0:
        raise ValueError(f"vocabulary of {V} is empty or does not fit int32 indices")
    for name, t, dt in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                        ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
                        ("seed_offset", seed_offset, torch.int64)):
        if t.shape != (M,) or t.dtype != dt:
            raise ValueError(f"{name} must be {dt} [{M}], got {t.dtype} {tuple(t.shape)}")
    if uniforms is not None and (uniforms.shape != (M,) or uniforms.dtype != torch.float32):
        raise ValueError(f"uniforms must be float32 [{M}], got {uniforms.dtype} {tuple(uniforms.shape)}")
    ws = workspace if workspace is not None else sample_workspace(M, V, logits.device, block=prefilter_block)
    _check_workspace(ws, M, V, prefilter_block)
    out = _ids_out(out, M, logits.device)
    if M == 0:
        return out
    vals, order = ws["vals"], ws["order"]
    prefiltered = "cand_vals" in ws
    if prefiltered:
        nb, cap = triton.cdiv(V, prefilter_block), vals.shape[1]
        bnb = triton.next_power_of_2(nb)
        common = (logits, logits.stride(0), V, ws["bmax"], ws["bsum"], ws["bmax"].stride(0))
        _block_max_mass_kernel[(nb, M)](*common, BLOCK=prefilter_block, num_warps=4)
        _level_histogram_kernel[(nb, M)](*common, nb, ws["hist"], BLOCK=prefilter_block, BLOCK_NB=bnb, NL=LEVELS,
                                         num_warps=4)
        _compact_kernel[(nb, M)](*common, nb, ws["hist"], ws["cand_vals"], ws["cand_ids"], cap, ws["row"], cap,
                                 BLOCK=prefilter_block, BLOCK_NB=bnb, NL=LEVELS,
                                 BLOCK_CAP=min(1024, triton.next_power_of_2(cap)), num_warps=4)
        torch.sort(ws["cand_vals"], dim=-1, descending=True, stable=True, out=(vals, order))
    else:
        torch.sort(logits, dim=-1, descending=True, stable=True, out=(vals, order))
    _sample_sorted_kernel[(M,)](vals, vals.stride(0), order, order.stride(0),
                                ws["cand_ids"] if prefiltered else order, vals.shape[1],
                                logits, logits.stride(0), V, ws["row"] if prefiltered else vals,
                                temperature, top_k, top_p, min_p, seed_offset,
                                uniforms if uniforms is not None else temperature, out,
                                KEY=_PHILOX_KEY, BLOCK=block, GIVEN_U=uniforms is not None,
                                PREFILTERED=prefiltered, num_warps=4)
    return out


# --- penalties ----------------------------------------------------------------------------------------
#
# llama.cpp's penalties over the last W tokens of each row: repeat_penalty divides a positive logit (and
# multiplies a negative one) of every token seen; frequency and presence penalties subtract count *
# frequency + presence. The window is a device ring of token ids (-1 = empty), so a step touches W logits,
# not the vocabulary, and the counts come from the ring itself.

@triton.jit
def _penalize_kernel(x_ptr, x_stride, V, win_ptr, W, rep_ptr, pres_ptr, freq_ptr, BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_W)
    ids = tl.load(win_ptr + row * W + j, mask=j < W, other=-1)
    same = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    count = tl.sum(same.to(tl.float32), axis=1)
    # Each distinct token once: at its first slot in the ring.
    first = tl.sum((same & (j[None, :] < j[:, None])).to(tl.int32), axis=1) == 0
    act = (ids >= 0) & (ids < V) & first
    rep = tl.load(rep_ptr + row)
    ptr = x_ptr + row * x_stride + ids
    x = tl.load(ptr, mask=act, other=0.0)
    x = tl.where(x > 0.0, x / rep, x * rep)
    x = x - count * tl.load(freq_ptr + row) - tl.load(pres_ptr + row)
    tl.store(ptr, x, mask=act)


@triton.jit
def _push_kernel(win_ptr, W, pos_ptr, ids_ptr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row)
    tl.store(win_ptr + row * W + pos % W, tl.load(ids_ptr + row))
    tl.store(pos_ptr + row, pos + 1)


def _check_window(window: torch.Tensor, M: int) -> None:
    if window.dim() != 2 or window.shape[0] != M or window.dtype != torch.int64 or not window.is_contiguous():
        raise ValueError(f"window must be contiguous int64 [{M}, W], got {window.dtype} {tuple(window.shape)}")


def apply_penalties(logits: torch.Tensor, window: torch.Tensor, *, repeat_penalty: torch.Tensor,
                    presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor) -> torch.Tensor:
    """Penalise, in place, the logits [M, V] fp32 of the tokens in each row's window (int64 [M, W] token ids,
    -1 for empty slots) with per-row float32 [M] penalties (1, 0, 0 switch them off); returns logits."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 [M, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    M, V = logits.shape
    _check_window(window, M)
    for name, t in (("repeat_penalty", repeat_penalty), ("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty)):
        if t.shape != (M,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [{M}], got {t.dtype} {tuple(t.shape)}")
    if M and window.shape[1]:
        W = window.shape[1]
        _penalize_kernel[(M,)](logits, logits.stride(0), V, window, W, repeat_penalty, presence_penalty,
                               frequency_penalty, BLOCK_W=triton.next_power_of_2(W), num_warps=4)
    return logits


def push_window(window: torch.Tensor, position: torch.Tensor, ids: torch.Tensor) -> None:
    """Write each row's new token (int64 [M], on the device: e.g. the sampler's output) into its ring at
    position % W and advance the int64 [M] position: no host round trip, graph-safe."""
    M = ids.shape[0]
    _check_window(window, M)
    if ids.shape != (M,) or ids.dtype != torch.int64 or position.shape != (M,) or position.dtype != torch.int64:
        raise ValueError("ids and position must be int64 [M]")
    if M and window.shape[1]:
        _push_kernel[(M,)](window, window.shape[1], position, ids, num_warps=1)
