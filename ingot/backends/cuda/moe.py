"""Mixture-of-experts block: x += sum_j w_j * down_e(act(gate_e(x')) * up_e(x')) over the top-k experts e
that the router picks for each row, x' = rms_norm(x) * ffn_norm. Everything stays on the GPU: the router
writes expert ids and weights to device memory and every later kernel reads them there, so no step waits
for the host (the decode step stays capturable in a CUDA graph).

- Router (one kernel): the logits x' @ R^T (R small, kept f16/fp32) with the RMSNorm folded in, tiled over
  rows and experts so that even one row's read of R is spread over many SMs (one program per row read all of
  R: 84 us a layer on the H200); the last tile of a row block to finish then does the rows' softmax, top-k
  by repeated argmax, the renormalisation of the k weights (norm_topk_prob), and Gemma 4's per-expert scale
  of them. Gemma 4's router normalises x with its own weight (router_norm), not the experts' norm.
- Decode (1..32 rows), two kernels after the router, on either of two schemes (INGOT_MOE_DECODE below):
  "byte" (gemv's general dequantizing tiles): one program per (row, choice) pair and slice of the expert's
  F rows computes gate and up for that pair's expert alone (the RMSNorm in its prologue as in gemv), writing
  act(g) * u; then one program per row and slice of the hidden size computes its k experts' down projections
  together and sums them, weighted, plus the residual. "word" (gemv's M = 1 int32-word scheme, q4/q8): the
  same gate/up programs; the down runs per (pair, slice) too and the last of a slice's k pair programs sums
  their weighted results in choice order, plus the residual (gemv's split-K ticket). Fixed-order
  reductions: deterministic either way.
- Prefill: the (row, choice) pairs are grouped by expert on the GPU (a stable counting sort in one kernel),
  each expert's run padded to the tile height, and one grouped tensor-core GEMM (gemm.py's dequantizing
  K loop) runs over all experts' tiles for gate/up, one for down; the down GEMM's epilogue applies the
  routing weight and scatters each pair's row back, and a last small kernel adds each row's k pairs in
  choice order to the residual. No per-expert loop, no host synchronisation.

Expert weights are ordinary PackedLinears with the experts stacked along n: gate_up is [E * 2F, H] with
expert e's gate rows at e*2F and its up rows right after (per expert, like a dense gate_up), down is
[E * H, F].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ingot.backends.cuda import gemm, gemv, pdl
from ingot.quant.pack import PackedLinear

MAX_DECODE_ROWS = 32
_ACTS = {"silu": 1, "gelu_tanh": 2}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The decode experts' scheme (f16 always takes "byte"): "auto" picks per kind what benchmarks/moe_check.py
# measured faster on the H200 (2026-12-02, a Qwen3-30B-A3B layer at one row, router included): q4 "byte"
# (37.3 us at its best tiles against the word kernels' 42.0), q8 "word" (40.8 against 55.9; 163 against 238 us
# at 8 rows). "byte" or "word" forces one for every kind (the A/B).
DECODE = os.environ.get("INGOT_MOE_DECODE", "auto")
if DECODE not in ("auto", "byte", "word"):
    raise ValueError(f"INGOT_MOE_DECODE must be 'auto', 'byte' or 'word', not {DECODE!r}")
# The prefill router's tl.dot (16 rows and up) on fp32: "ieee" FMAs (the default), or "tf32x3", three TF32
# tensor-core products whose sum keeps about fp32's precision (INGOT_ROUTER_DOT, for the A/B: the router took
# 84 us of each Qwen3-30B-A3B layer's 512-row prefill on the H200, 2026-12-04, for 0.27 GFLOP).
ROUTER_DOT = os.environ.get("INGOT_ROUTER_DOT", "ieee")
if ROUTER_DOT not in ("ieee", "tf32x3"):
    raise ValueError(f"INGOT_ROUTER_DOT must be 'ieee' or 'tf32x3', not {ROUTER_DOT!r}")


@dataclass
class MoEWeights:
    router: torch.Tensor  # [E, H] float16 or float32
    gate_up: PackedLinear  # [E * 2F, H]
    down: PackedLinear  # [E * H, F]
    top_k: int
    norm_topk: bool
    router_norm: torch.Tensor | None = None  # fp32 [H]: the router's own input norm weight (else the block's)
    expert_scale: torch.Tensor | None = None  # fp32 [E]: each chosen expert's weight is multiplied by its entry

    def __post_init__(self):
        e, h = self.router.shape
        if self.gate_up.n % (2 * e) or self.gate_up.k != h or self.down.n != e * h:
            raise ValueError(f"expert shapes gate_up {self.gate_up.shape}, down {self.down.shape} do not fit "
                             f"{e} experts of hidden size {h}")
        if self.down.k != self.ffn or not 1 <= self.top_k <= e:
            raise ValueError(f"down's k {self.down.k} != {self.ffn}, or top_k {self.top_k} outside 1..{e}")

    @property
    def n_experts(self) -> int:
        return self.router.shape[0]

    @property
    def hidden(self) -> int:
        return self.router.shape[1]

    @property
    def ffn(self) -> int:
        return self.gate_up.n // (2 * self.n_experts)

    def active_bytes(self) -> int:
        """Weight bytes one row reads: the router and k experts' gate/up and down."""
        per_expert = (self.gate_up.nbytes + self.down.nbytes) // self.n_experts
        return self.router.numel() * self.router.element_size() + self.top_k * per_expert


# ---------------------------------------------------------------- router


@triton.jit
def _router_dot(x_ptr, nw_ptr, r, t, t_ok, k, k_ok, stride_xm, NORMED: tl.constexpr, BLOCK_T: tl.constexpr,
                DOT: tl.constexpr):
    """One K tile's part of the logits (x * nw) @ r^T (fp32 [BLOCK_T, BLOCK_E]) and of the rows' sums of
    squares, from r, the tile's router rows [BLOCK_E, BLOCK_K]."""
    x = tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                other=0.0).to(tl.float32)
    ss = tl.zeros((BLOCK_T,), tl.float32)
    if not NORMED:
        ss = tl.sum(x * x, axis=1)
        x = x * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    r = r.to(tl.float32)
    if BLOCK_T >= 16:
        return tl.dot(x, tl.trans(r), input_precision=DOT), ss
    return tl.sum(x[:, None, :] * r[None, :, :], axis=2), ss


@triton.jit
def _router_kernel(x_ptr, nw_ptr, r_ptr, es_ptr, logits_ptr, cnt_ptr, ids_ptr, wts_ptr, ssi_ptr, T, K, E, stride_xm,
                   eps, n_parts, TOP_K: tl.constexpr, KP: tl.constexpr, NORM_TOPK: tl.constexpr,
                   EXPERT_SCALE: tl.constexpr, NORMED: tl.constexpr, PARTS_BLOCK: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, E_ALL: tl.constexpr,
                   ONE_TILE: tl.constexpr, RANK_BLOCK: tl.constexpr, DOT: tl.constexpr = "ieee",
                   PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    """One [BLOCK_T rows, BLOCK_E experts] tile of the logits (rms_norm(x) * nw) @ R^T in fp32 FMAs (the
    reference's sums: no tensor-core rounding that could flip a near-tied expert; from 16 rows through
    tl.dot's ieee path, or ROUTER_DOT's, as the decode tiles' broadcast-and-sum took 146 µs a Qwen3-30B-A3B
    layer at 512 rows on the H200, 2026-12-02), stored to the workspace;
    the row block's last tile to finish (an atomic ticket, as gemv's split-K) then takes the block's whole
    logit rows through the softmax, the top-k (the lowest id among equals) and the renormalisation (then
    Gemma 4's per-expert scale), and puts the counter back to 0. NORMED (one row): x came times nw, its sum
    of squares in n_parts pieces (gemv.linear's norm_parts). ONE_TILE: the whole of K in one tile, whose
    router rows (weights, not the previous kernel's output) are loaded before the PDL wait, so that one
    row's router reads overlap the kernel before it."""
    pid_t, pid_e = tl.program_id(0), tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok, e_ok = t < T, e < E
    r_rows = r_ptr + e.to(tl.int64)[:, None] * K
    if ONE_TILE:
        k = tl.arange(0, BLOCK_K)
        r = tl.load(r_rows + k[None, :], mask=e_ok[:, None] & (k < K)[None, :], other=0.0)
        pdl.begin(PDL, EARLY)
        acc, ss = _router_dot(x_ptr, nw_ptr, r, t, t_ok, k, k < K, stride_xm, NORMED, BLOCK_T, DOT)
    else:
        pdl.begin(PDL, EARLY)
        acc = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        ss = tl.zeros((BLOCK_T,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            r = tl.load(r_rows + k[None, :], mask=e_ok[:, None] & (k < K)[None, :], other=0.0)
            a, s = _router_dot(x_ptr, nw_ptr, r, t, t_ok, k, k < K, stride_xm, NORMED, BLOCK_T, DOT)
            acc += a
            ss += s
    # rstd is one scalar per row: applied to the finished logits rather than to every x element.
    if NORMED:
        acc = acc * gemv._handed_rstd(ssi_ptr, n_parts, K, eps, PARTS_BLOCK)
    else:
        acc = acc / tl.sqrt(ss / K + eps)[:, None]
    rows = t.to(tl.int64)[:, None] * E
    tl.store(logits_ptr + rows + e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
    tl.debug_barrier()  # every thread's stores before the (one-thread) release
    ticket = tl.atomic_add(cnt_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(1) - 1:
        if BLOCK_T == 1:
            _top_k_by_rank(logits_ptr, es_ptr, ids_ptr, wts_ptr, pid_t, E, TOP_K, NORM_TOPK, EXPERT_SCALE, E_ALL,
                           RANK_BLOCK)
        else:
            _top_k_by_argmax(logits_ptr, es_ptr, ids_ptr, wts_ptr, t, t_ok, E, TOP_K, KP, NORM_TOPK, EXPERT_SCALE,
                             BLOCK_T, E_ALL)
        tl.atomic_xchg(cnt_ptr + pid_t, 0)  # ready for the next call / graph replay


@triton.jit
def _top_k_by_rank(logits_ptr, es_ptr, ids_ptr, wts_ptr, row, E, TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr,
                   EXPERT_SCALE: tl.constexpr, E_ALL: tl.constexpr, RANK_BLOCK: tl.constexpr):
    """One row's top-k in one pass, where repeated argmax takes two dependent reductions a choice: each
    expert's rank is the number of experts ahead of it (a larger logit, or an equal one at a lower id), and
    the k of rank below k are stored at their rank (descending, as torch.topk). [E_ALL, RANK_BLOCK]
    comparisons at a time (for 128 experts, 16 columns compile to 48 registers a thread, 64 to 255; ptxas
    sm_90a); a BLOCK_T-row tile would need BLOCK_T times the registers, so more rows take _top_k_by_argmax."""
    ea = tl.arange(0, E_ALL)
    base = logits_ptr + row.to(tl.int64) * E
    # .cg: from L2, where the other programs' tiles are; a NaN row (padding, never a real one) ranks by id
    li = tl.load(base + ea, mask=ea < E, other=float("-inf"), cache_modifier=".cg")
    li = tl.where(li == li, li, float("-inf"))
    rank = tl.zeros((E_ALL,), tl.int32)
    for j0 in tl.static_range(0, E_ALL, RANK_BLOCK):
        j = j0 + tl.arange(0, RANK_BLOCK)
        lj = tl.load(base + j, mask=j < E, other=float("-inf"), cache_modifier=".cg")
        lj = tl.where(lj == lj, lj, float("-inf"))
        ahead = (lj[None, :] > li[:, None]) | ((lj[None, :] == li[:, None]) & (j[None, :] < ea[:, None]))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    top = tl.max(li, axis=0)
    p = tl.exp(li - tl.where(top == float("-inf"), 0.0, top))  # the softmax's numerators
    chosen = (rank < TOP_K) & (ea < E)
    w = p / tl.maximum(tl.sum(tl.where(chosen if NORM_TOPK else ea < E, p, 0.0), axis=0), 1e-30)
    if EXPERT_SCALE:
        w = w * tl.load(es_ptr + ea, mask=chosen, other=0.0)
    out = row.to(tl.int64) * TOP_K + rank
    tl.store(ids_ptr + out, ea, mask=chosen)
    tl.store(wts_ptr + out, w, mask=chosen)


@triton.jit
def _top_k_by_argmax(logits_ptr, es_ptr, ids_ptr, wts_ptr, t, t_ok, E, TOP_K: tl.constexpr, KP: tl.constexpr,
                     NORM_TOPK: tl.constexpr, EXPERT_SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
                     E_ALL: tl.constexpr):
    """BLOCK_T rows' top-k by repeated argmax (the lowest id among equals), as [BLOCK_T, E_ALL] tiles."""
    ea = tl.arange(0, E_ALL)
    ea_ok = ea < E
    rows = t.to(tl.int64)[:, None] * E
    # .cg: from L2, where the other programs' tiles are
    logits = tl.load(logits_ptr + rows + ea[None, :], mask=t_ok[:, None] & ea_ok[None, :], other=0.0,
                     cache_modifier=".cg")
    logits = tl.where(ea_ok[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(ea_ok[None, :] & (p == p), p, -1.0)  # a NaN row (padding, never a real one) stays in range
    j = tl.arange(0, KP)
    top_w = tl.zeros((BLOCK_T, KP), tl.float32)
    top_i = tl.zeros((BLOCK_T, KP), tl.int32)
    for c in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.minimum(tl.min(tl.where(p == best[:, None], ea[None, :], E_ALL), axis=1), E - 1)
        top_w = tl.where(j[None, :] == c, tl.maximum(best, 0.0)[:, None], top_w)
        top_i = tl.where(j[None, :] == c, idx[:, None], top_i)
        p = tl.where(ea[None, :] == idx[:, None], -2.0, p)
    if NORM_TOPK:
        top_w = top_w / tl.maximum(tl.sum(top_w, axis=1), 1e-30)[:, None]
    if EXPERT_SCALE:
        top_w = top_w * tl.load(es_ptr + top_i)
    out = t.to(tl.int64)[:, None] * TOP_K + j[None, :]
    ok = t_ok[:, None] & (j < TOP_K)[None, :]
    tl.store(ids_ptr + out, top_i, mask=ok)
    tl.store(wts_ptr + out, top_w, mask=ok)


def _router_tiles(t: int, e: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K). One row: one expert a program and the whole of K in one tile (loaded
    before the PDL wait), so the router's read is spread over E programs and in flight at once; other decode
    rows (up to 32): 4 experts a program, the [BLOCK_T, BLOCK_E, BLOCK_K] product in registers 2K to 8K
    values; prefill: tl.dot tiles of 16 rows x 32 experts (its smallest M is 16), so 512 rows of 128 experts
    are 128 programs."""
    if t == 1:
        return 1, 1, triton.next_power_of_2(k)
    if t <= MAX_DECODE_ROWS:
        bt, be = min(triton.next_power_of_2(t), 8), min(triton.next_power_of_2(e), 4)
        return bt, be, max(16, 2048 // (bt * be))
    bt, be, bk = ROUTER_PREFILL_TILES
    return bt, max(16, min(triton.next_power_of_2(e), be)), bk


# The prefill router's (BLOCK_T, BLOCK_E, BLOCK_K), tl.dot's smallest tiles (moe_check.py times others).
ROUTER_PREFILL_TILES = (16, 32, 64)


def route(x: torch.Tensor, w: MoEWeights, norm_weight: torch.Tensor, eps: float, *,
          ids: torch.Tensor | None = None, weights: torch.Tensor | None = None,
          logits: torch.Tensor | None = None, counters: torch.Tensor | None = None,
          norm_parts: torch.Tensor | None = None):
    """Expert ids (int32 [T, k]) and routing weights (fp32 [T, k]) of rows x (fp32/fp16 [T, H]), normed by
    w.router_norm where the model has one, else by norm_weight. `logits` (fp32 [T, E]) and `counters` (int32,
    one per BLOCK_T rows, zero) are the router's workspace: a captured step passes its own (the counters are
    back at zero after each call), else they are allocated. norm_parts: x is one row handed on pre-normed
    by norm_weight (as gemv.linear's norm_parts)."""
    t, h = x.shape
    if h != w.hidden or x.stride(1) != 1:
        raise ValueError(f"x of shape {tuple(x.shape)} (row stride 1 needed) does not match hidden {w.hidden}")
    k, e = w.top_k, w.n_experts
    bt, be, bk = _router_tiles(t, e, h)
    ids = torch.empty(t, k, device=x.device, dtype=torch.int32) if ids is None else ids
    weights = torch.empty(t, k, device=x.device, dtype=torch.float32) if weights is None else weights
    logits = torch.empty(t, e, device=x.device, dtype=torch.float32) if logits is None else logits
    counters = torch.zeros(triton.cdiv(t, bt), device=x.device, dtype=torch.int32) if counters is None else counters
    assert ids.shape == (t, k) and ids.dtype == torch.int32 and ids.is_contiguous()
    assert weights.shape == (t, k) and weights.dtype == torch.float32 and weights.is_contiguous()
    assert logits.shape == (t, e) and logits.dtype == torch.float32 and logits.is_contiguous()
    assert counters.numel() >= triton.cdiv(t, bt) and counters.dtype == torch.int32
    if norm_parts is not None and (t != 1 or w.router_norm is not None):
        raise ValueError("a handed-on row is one row normed by the block's own norm weight")
    if t:
        nw = w.router_norm if w.router_norm is not None else norm_weight
        es = w.expert_scale if w.expert_scale is not None else weights
        ssi, n_parts, handed = gemv.handed_args(norm_parts, weights)
        _router_kernel[(triton.cdiv(t, bt), triton.cdiv(e, be))](
            x, nw, w.router, es, logits, counters, ids, weights, ssi, t, h, e, x.stride(0), float(eps), n_parts,
            TOP_K=k, KP=triton.next_power_of_2(k), NORM_TOPK=w.norm_topk, EXPERT_SCALE=w.expert_scale is not None,
            BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, E_ALL=triton.next_power_of_2(e), ONE_TILE=bk >= h,
            RANK_BLOCK=min(triton.next_power_of_2(e), 16), DOT=ROUTER_DOT, num_warps=4, **handed,
            **pdl.LAUNCH_EARLY)
    return ids, weights


# ---------------------------------------------------------------- decode: the selected experts only


@triton.jit
def _expert_gate_up_kernel(x_ptr, nw_ptr, ids_ptr, qw_ptr, s_ptr, m_ptr, out_ptr, ssi_ptr, F, K, stride_xm, eps,
                           n_parts, TOP_K: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr,
                           HAS_MIN: tl.constexpr, ACT: tl.constexpr, NORMED: tl.constexpr,
                           PARTS_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    pdl.begin(PDL, EARLY)
    pair = tl.program_id(0)  # row * TOP_K + choice
    xrow = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
    expert = tl.load(ids_ptr + pair)  # read on the device: the step needs nothing from the host
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < F
    gate_rows = expert * (2 * F) + n
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    k_lo = tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, HALF)[None, :]
    acc = tl.zeros((BLOCK_N,), tl.float32)
    acc_u = tl.zeros((BLOCK_N,), tl.float32)
    ss = tl.zeros((NG, HALF), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k_lo
        ok_lo = kk < K
        ok_hi = kk + HALF < K
        x_lo = tl.load(xrow + kk, mask=ok_lo, other=0.0).to(tl.float32)
        x_hi = tl.load(xrow + kk + HALF, mask=ok_hi, other=0.0).to(tl.float32)
        if not NORMED:  # else x came times nw (gemv's norm handoff)
            ss += x_lo * x_lo + x_hi * x_hi
            x_lo = x_lo * tl.load(nw_ptr + kk, mask=ok_lo, other=0.0)
            x_hi = x_hi * tl.load(nw_ptr + kk + HALF, mask=ok_hi, other=0.0)
        w_lo, w_hi = gemv._dequant_tile(qw_ptr, s_ptr, m_ptr, gate_rows, n_ok, k0, K, K,
                                        KIND, GROUP, HAS_MIN, BLOCK_K)
        acc += tl.sum(tl.sum(w_lo * x_lo[None] + w_hi * x_hi[None], axis=2), axis=1)
        u_lo, u_hi = gemv._dequant_tile(qw_ptr, s_ptr, m_ptr, gate_rows + F, n_ok, k0, K, K,
                                        KIND, GROUP, HAS_MIN, BLOCK_K)
        acc_u += tl.sum(tl.sum(u_lo * x_lo[None] + u_hi * x_hi[None], axis=2), axis=1)
    ssq = tl.sum(tl.sum(ss, axis=1), axis=0) + tl.zeros((1,), tl.float32)
    acc, acc_u = gemv._handed_scale(acc, acc_u, ssi_ptr, n_parts, K, eps, NORMED, PARTS_BLOCK)
    out_row = out_ptr + pair.to(tl.int64) * F
    gemv._finish(acc[None, :], acc_u[None, :], ssq, tl.arange(0, 1), n, 1, F, K, eps, out_row, 0, out_row, 0,
                 not NORMED, ACT, False)


@triton.jit
def _expert_down_kernel(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, m_ptr, res_ptr, out_ptr, nwo_ptr, xn_ptr, sso_ptr,
                        N, K, stride_rm, stride_om,
                        TOP_K: tl.constexpr, KP: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr,
                        HAS_MIN: tl.constexpr, HAS_RES: tl.constexpr, NORM_OUT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                        EARLY: tl.constexpr = False):
    """out[row, n] = [res[row, n] +] sum over choices c of w_c * (down of expert e_c @ h[pair c])[n]. The tile
    holds all the row's experts at once (KP * BLOCK_N weight rows, choice-major), so their loads are in
    flight together rather than one expert after another; the weighted sum over choices is a fixed-order
    tree reduction (deterministic). NORM_OUT (one row): also the row handed on pre-normed, as gemv's."""
    pdl.begin(PDL, EARLY)
    row = tl.program_id(0)
    R: tl.constexpr = KP * BLOCK_N
    r = tl.arange(0, R)
    choice = r // BLOCK_N
    n = tl.program_id(1) * BLOCK_N + r % BLOCK_N
    c_ok = choice < TOP_K
    ok = c_ok & (n < N)
    pair = row * TOP_K + choice
    expert = tl.load(ids_ptr + pair, mask=c_ok, other=0)
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    k_lo = tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, HALF)[None, :]
    hrow = h_ptr + pair.to(tl.int64)[:, None, None] * K  # each weight row's activation row (L1-resident)
    acc = tl.zeros((R,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + k_lo)[None]
        h_lo = tl.load(hrow + kk, mask=ok[:, None, None] & (kk < K), other=0.0)
        h_hi = tl.load(hrow + kk + HALF, mask=ok[:, None, None] & (kk + HALF < K), other=0.0)
        w_lo, w_hi = gemv._dequant_tile(qw_ptr, s_ptr, m_ptr, expert * N + n, ok, k0, K, K,
                                        KIND, GROUP, HAS_MIN, BLOCK_K)
        acc += tl.sum(tl.sum(w_lo * h_lo + w_hi * h_hi, axis=2), axis=1)
    acc = acc * tl.load(wts_ptr + pair, mask=c_ok, other=0.0)
    total = tl.sum(tl.reshape(acc, (KP, BLOCK_N)), axis=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = row.to(tl.int64)
    if HAS_RES:
        total += tl.load(res_ptr + r64 * stride_rm + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + r64 * stride_om + cols, total, mask=cols < N)
    if NORM_OUT:
        gemv._norm_out(total[None, :], row == 0, cols, N, nwo_ptr, xn_ptr, sso_ptr + tl.program_id(1))


# The word scheme (see the comment above gemv._gemv_word_kernel): int32 weight words, several rows a thread
# sharing each x load, nibbles to fp32 by the 2^23 mantissa trick, the scale applied once per group. One
# kernel serves both projections, one program per (row, choice) pair and tile of BLOCK_N output rows, M = 1
# GEMVs whose weight rows are the pair's expert's (its id read on the device):
# - gate/up: x row pair // TOP_K, RMS-normed as in gemv (norm weight per element, rstd at the end), gated
#   with the up rows at + F, act(gate) * up into ff[pair];
# - down: x = ff[pair], times the pair's routing weight. Of the two deterministic layouts, a tile of all k
#   choices' rows (as the byte kernel) would give each thread rows of different choices, so an x load would
#   no longer serve all of a thread's rows, the point of the scheme; a separate fixed-order combine costs a
#   launch. So each pair program stores its result as a split-K partial and the last of a row's k programs
#   (an atomic ticket per (row, tile)) adds them in choice order plus the residual: gemv's _split_finish,
#   split over choices instead of K. One launch, registers as one M = 1 GEMV tile.
# Gate/up may split K (WORD_GATE_UP_SPLIT, grid axis 2), as gemv's split-K: each program stores its partial
# sums and the last of a (pair, tile)'s programs adds them and finishes (the rstd from the summed squares);
# the down does not (its split is over the choices). So the grid is t * k * N / BLOCK_N [* split] programs.


@triton.jit
def _expert_word_kernel(x_ptr, nw_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, m_ptr, res_ptr, out_ptr, part_ptr,
                        cnt_ptr, ssp_ptr, nwo_ptr, xn_ptr, sso_ptr, ssi_ptr, N, K, k_split, n_split, stride_xm,
                        stride_rm, stride_om, eps, magic, n_parts, TOP_K: tl.constexpr, WIDTH: tl.constexpr,
                        GROUP: tl.constexpr, HAS_MIN: tl.constexpr, SIGNED: tl.constexpr, GATED: tl.constexpr,
                        HAS_RES: tl.constexpr, UNPACK: tl.constexpr, EVEN: tl.constexpr, NORM_OUT: tl.constexpr,
                        NORMED: tl.constexpr, PARTS_BLOCK: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                        EARLY: tl.constexpr = False):
    """GATED (gate/up): out[pair, n] = act(g) * u of the pair's expert on rms_norm(x[pair // TOP_K]) * nw.
    Else (down): out[row, n] = [res[row, n] +] sum over choices c, in order, of wts[pair] * (W_e @ x[pair])[n],
    pair = row * TOP_K + c, through the partials part[pair, n] and tickets cnt[row * tiles + tile]; NORM_OUT
    (down, one row): also the row handed on pre-normed, as gemv's; NORMED (gate/up): x came so. SPLIT
    (gate/up): this program's k_split of K, its partials at part[pair, split, 2N], sums of squares at
    ssp[(pair * tiles + tile) * n_split + split], tickets cnt[pair * tiles + tile]."""
    pdl.begin(PDL, EARLY)
    pair = tl.program_id(0)
    tile = tl.program_id(1)
    pid_k = tl.program_id(2)
    if SPLIT:
        k_begin = pid_k * k_split
        k_end = tl.minimum(K, k_begin + k_split)
    else:  # as unsplit before: K itself bounds the steps (its divisibility is known, k_end's would not be)
        k_begin = tl.full((), 0, tl.int32)  # a tensor, not the constexpr 0: _weight_step hints multiple_of on it
        k_end = K
    NG: tl.constexpr = BLOCK_K // GROUP
    WPG: tl.constexpr = GROUP // (32 // WIDTH)  # words per group
    expert = tl.load(ids_ptr + pair).to(tl.int64)  # read on the device: the step needs nothing from the host
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows64 = expert * (2 * N if GATED != 0 else N) + n
    if GATED != 0:
        xrow = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
    else:
        xrow = x_ptr + pair.to(tl.int64) * stride_xm
    # The first K step's tiles; gemv._word_k_loop loads each next one before it computes the current one.
    wd0, s0, m0, wd1, s1, m1 = gemv._gate_up_step(qw_ptr, s_ptr, m_ptr, rows64, n_ok, N, k_begin, k_end, K,
                                                  WIDTH, GROUP, HAS_MIN, GATED, NG, WPG, EVEN)
    acc, acc_u, ss = gemv._word_k_loop(xrow, nw_ptr, qw_ptr, s_ptr, m_ptr, rows64, n_ok, N, k_begin, k_end, K,
                                       magic, wd0, s0, m0, wd1, s1, m1, WIDTH, GROUP, HAS_MIN, SIGNED,
                                       GATED != 0 and not NORMED, GATED, UNPACK, False, False, NG, WPG, EVEN,
                                       BLOCK_N, BLOCK_K)
    # _row_epilogue's flags: HAS_NORM, GATED, HAS_RES, SPLIT
    if GATED != 0:
        acc, acc_u = gemv._handed_scale(acc, acc_u, ssi_ptr, n_parts, K, eps, NORMED, PARTS_BLOCK)
        out_row = out_ptr + pair.to(tl.int64) * N
        gemv._row_epilogue(acc, acc_u, ss, n, pair * tl.num_programs(1) + tile, pid_k, n_split, N, K, eps,
                           part_ptr + pair.to(tl.int64) * n_split * 2 * N, ssp_ptr, cnt_ptr, out_row, 0, out_row,
                           0, not NORMED, GATED, False, SPLIT)
    else:
        row = pair // TOP_K
        r64 = row.to(tl.int64)
        acc = acc * tl.load(wts_ptr + pair)
        # split over the row's choices: partials at part[row * TOP_K + choice], one ticket per (row, tile)
        y, done = gemv._row_epilogue(acc, acc_u, ss, n, row * tl.num_programs(1) + tile, pair % TOP_K, TOP_K, N,
                                     K, eps, part_ptr + r64 * TOP_K * N, part_ptr, cnt_ptr,
                                     res_ptr + r64 * stride_rm, 0, out_ptr + r64 * stride_om, 0, False, 0,
                                     HAS_RES, True)
        if NORM_OUT:
            gemv._norm_out(y, done, n, N, nwo_ptr, xn_ptr, sso_ptr + tile)


def _word_flags(w: PackedLinear, gated: bool, block_n: int) -> tuple[tuple, dict]:
    """Pointers and constexprs of the word kernel for w, at gemv's M = 1 K step for its kind."""
    n_out = w.n // 2 if gated else w.n
    block_k = gemv._plan_word(n_out, w.k, w.kind, w.group, gated).block_k
    assert block_k % w.group == 0 and w.qweight.is_contiguous()
    ptrs = (w.qweight.view(torch.int32), w.scales, w.mins if w.mins is not None else w.scales)
    return ptrs, dict(WIDTH=4 if w.kind == "q4" else 8, GROUP=w.group, HAS_MIN=w.mins is not None,
                      SIGNED=w.qweight.dtype == torch.int8, UNPACK=1,
                      EVEN=gemv.whole_tiles(n_out, w.k, block_n, block_k), BLOCK_K=block_k)


def _gemv_flags(w: PackedLinear, max_block_k: int = 1024, block_k: int | None = None) -> tuple[tuple, dict]:
    """The byte kernels' pointers and constexprs for w: a K step of block_k values, else gemv's for its kind
    (at most max_block_k); at least a group."""
    group = w.group if w.kind != "f16" else gemv.F16_PSEUDO_GROUP
    scales = w.scales if w.scales is not None else w.qweight
    mins = w.mins if w.mins is not None else scales
    flags = dict(KIND=gemv.KIND_IDS[w.kind], GROUP=group, HAS_MIN=w.mins is not None,
                 BLOCK_K=max(group, block_k or min(max_block_k, gemv._block_k(w.kind, group))))
    return (w.qweight, scales, mins), flags


@dataclass
class DecodeBuffers:
    """What the decode path writes, allocated once per batch size so a captured graph can refer to it."""
    ids: torch.Tensor  # int32 [rows, k]
    weights: torch.Tensor  # fp32 [rows, k]
    ff: torch.Tensor  # fp32 [rows * k, F]: act(gate) * up of each (row, choice) pair
    logits: torch.Tensor  # fp32 [rows * E]: the router's
    counters: torch.Tensor  # int32 [rows]: the router's tickets, zero between calls
    partials: torch.Tensor  # fp32 [rows * k, H]: the word down's weighted result of each pair
    tickets: torch.Tensor  # int32 [rows * H / WORD_MIN_BLOCK_N]: the word down's, one per (row, tile), zero
    # the word gate/up's split-K (WORD_GATE_UP_SPLIT > 1; else one element each): partials [pair, split, 2F],
    # sums of squares [pair, tile, split] and tickets [pair, tile] (zero between calls)
    gate_up_partials: torch.Tensor
    gate_up_ss: torch.Tensor
    gate_up_tickets: torch.Tensor

    @classmethod
    def for_layers(cls, moes: list[MoEWeights], rows: int, device) -> DecodeBuffers:
        k = max(m.top_k for m in moes)
        f = max(m.ffn for m in moes)
        e = max(m.n_experts for m in moes)
        h = max(m.hidden for m in moes)
        zeros = lambda n, dtype=torch.float32: torch.zeros(n, device=device, dtype=dtype)  # noqa: E731
        split = WORD_GATE_UP_SPLIT
        tiles = rows * k * triton.cdiv(f, WORD_MIN_BLOCK_N) if split > 1 else 1
        return cls(zeros((rows, k), torch.int32), zeros((rows, k)), zeros(rows * k * f), zeros(rows * e),
                   zeros(rows, torch.int32), zeros(rows * k * h),
                   zeros(rows * triton.cdiv(h, WORD_MIN_BLOCK_N), torch.int32),
                   zeros(rows * k * split * 2 * f if split > 1 else 1), zeros(tiles * split),
                   zeros(tiles, torch.int32))

    def tensors(self):
        return (self.ids, self.weights, self.ff, self.logits, self.counters, self.partials, self.tickets,
                self.gate_up_partials, self.gate_up_ss, self.gate_up_tickets)


GATE_UP_BLOCK_N = 8  # gate and up tiles in registers at once (moe_check, H200: 8 a little ahead of 16)
GATE_UP_BLOCK_K = None  # its K step in values (None: gemv's for the kind, 256 q4 or 128 q8)
DOWN_BLOCK_N = 8  # x top_k experts = 64 weight rows a tile; 2048 / 8 = 256 programs for Qwen3-30B-A3B at one row
DOWN_BLOCK_K = 128  # at most this K step: the tile holds k experts' rows, a shorter one keeps it in registers
# Word kernels, rows a program of one pair (benchmarks/moe_check.py compares variants: these within 3% of the
# best on the H200, 2026-12-02). Qwen3-30B-A3B
# at one row: gate/up 8 pairs x 768 / 32 = 192 programs of 32 gate + 32 up rows (gemv's gated q4 tile holds
# 64 + 64, which would leave 96 programs for 132 SMs); down 8 x 2048 / 64 = 256 programs.
WORD_GATE_UP_BLOCK_N = 32
WORD_DOWN_BLOCK_N = 64
WORD_MIN_BLOCK_N = 16  # the smallest word tile DecodeBuffers has tickets for
# The word gate/up's K split: 1 (none), or programs along K per (pair, tile), reduced by the last one, for
# more loads in flight (Qwen3-30B-A3B at one row: 192 programs unsplit, 4 programs per SM by registers);
# DecodeBuffers made after it is set hold its workspace. Unmeasured on the GPU: moe_check times it.
WORD_GATE_UP_SPLIT = 1


def _word(w: PackedLinear) -> bool:
    """Whether w's decode kernel is the word one: a kind the word helpers cover (as gemv.linear's M = 1 choice)
    that INGOT_MOE_DECODE gives it (auto: q8)."""
    return w.kind in ("q4", "q8") and (DECODE == "word" or (DECODE == "auto" and w.kind == "q8"))


def decode_block(x: torch.Tensor, w: MoEWeights, norm_weight: torch.Tensor, eps: float, act: str = "silu",
                 buffers: DecodeBuffers | None = None, block_n: tuple[int, int] | None = None,
                 out: torch.Tensor | None = None, norm_out: "gemv.NormOut | None" = None,
                 normed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x (fp32 [T, H], T <= 32) += the MoE block of x, reading only the selected experts' weights; with `out`
    (fp32 [T, H]) the block's output goes there instead and x is left as it is.
    block_n (default: the kernels' own): output rows a program of the gate/up kernel (gate rows, each with
    its up row, of one pair, on both schemes) and of the down kernel ("byte": hidden rows of one row's k
    experts, k * block_n weight rows; "word": hidden rows of one pair's expert, at least WORD_MIN_BLOCK_N).
    The interpreter tests use larger ones. norm_out (one row): the block's output also handed on pre-normed,
    as gemv.linear's, in norm_parts(w) sums of squares. normed: x's own handoff (xn, sums of squares; one row,
    normed by norm_weight), which the router and the gate/up read in place of x (x stays the residual)."""
    t, h = x.shape
    if not 1 <= t <= MAX_DECODE_ROWS:
        raise ValueError(f"the decode MoE path takes 1..{MAX_DECODE_ROWS} rows, got {t}")
    if x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError("x must be fp32 with contiguous rows (it is updated in place)")
    out = _check_out(x, out)
    k, f = w.top_k, w.ffn
    buffers = buffers or DecodeBuffers.for_layers([w], t, x.device)
    ids, wts = buffers.ids[:t, :k], buffers.weights[:t, :k]
    if not (ids.is_contiguous() and wts.is_contiguous()):
        raise ValueError("decode buffers must be sized for this layer's top_k")
    xin, parts = normed if normed is not None else (x, None)
    route(xin, w, norm_weight, eps, ids=ids, weights=wts, logits=buffers.logits[: t * w.n_experts].view(t, -1),
          counters=buffers.counters, norm_parts=parts)
    ff = buffers.ff[: t * k * f].view(t * k, f)
    _gate_up(xin, w, norm_weight, eps, act, ids, ff, buffers, block_n[0] if block_n else None, parts)
    _down(ff, w, ids, wts, x, out, buffers, block_n[1] if block_n else None, norm_out)
    return out


def _gate_up(x, w: MoEWeights, norm_weight, eps: float, act: str, ids, ff, buffers: DecodeBuffers,
             block_n: int | None, norm_parts=None):
    """ff[pair] = act(gate) * up of the pair's expert on rms_norm(x[pair // k]) * norm_weight (x handed on
    so already, with its sums of squares in norm_parts, where they are given)."""
    (t, h), k, f = x.shape, w.top_k, w.ffn
    word = _word(w.gate_up)
    block_n = block_n or (WORD_GATE_UP_BLOCK_N if word else GATE_UP_BLOCK_N)
    grid = (t * k, triton.cdiv(f, block_n))
    ssi, n_parts, handed = gemv.handed_args(norm_parts, ff)
    if word:
        ptrs, flags = _word_flags(w.gate_up, gated=True, block_n=block_n)
        k_split = triton.cdiv(triton.cdiv(h, flags["BLOCK_K"]), WORD_GATE_UP_SPLIT) * flags["BLOCK_K"]
        n_split = triton.cdiv(h, k_split)
        split = n_split > 1
        b = buffers
        if split and (b.gate_up_tickets.numel() < grid[0] * grid[1] or b.gate_up_ss.numel() < grid[0] * grid[1]
                      * n_split or b.gate_up_partials.numel() < t * k * n_split * 2 * f):
            raise ValueError("decode buffers too small for the word gate/up's K split (made before it was set?)")
        _expert_word_kernel[(*grid, n_split)](
            x, norm_weight, ids, ids, *ptrs, x, ff, b.gate_up_partials, b.gate_up_tickets, b.gate_up_ss, ff, ff, ff,
            ssi, f, h, k_split, n_split, x.stride(0), 0, 0, float(eps), gemv.MAGIC, n_parts, TOP_K=k,
            GATED=_ACTS[act], HAS_RES=False, NORM_OUT=False, SPLIT=split, BLOCK_N=block_n, num_warps=4, **handed,
            **flags, **pdl.LAUNCH_EARLY)
    else:
        ptrs, flags = _gemv_flags(w.gate_up, block_k=GATE_UP_BLOCK_K)
        _expert_gate_up_kernel[grid](x, norm_weight, ids, *ptrs, ff, ssi, f, h, x.stride(0), float(eps), n_parts,
                                     TOP_K=k, ACT=_ACTS[act], BLOCK_N=block_n, num_warps=4, **handed, **flags,
                                     **pdl.LAUNCH_EARLY)


def _down(ff, w: MoEWeights, ids, wts, x, out, buffers: DecodeBuffers, block_n: int | None,
          norm_out: "gemv.NormOut | None"):
    """out[row] = [x[row] +] sum over the row's choices, in order, of wts * (down of the expert @ ff[pair])."""
    (t, h), k, f = x.shape, w.top_k, w.ffn
    has_res = out is x
    block_n = block_n or _down_block_n(w)
    hand = gemv.norm_out_args(norm_out, out)
    if norm_out is not None:
        assert t == 1 and norm_out.ss.numel() >= triton.cdiv(h, block_n), "a handoff takes one row, all tiles"
    if not _word(w.down):
        ptrs, flags = _gemv_flags(w.down, DOWN_BLOCK_K)
        _expert_down_kernel[(t, triton.cdiv(h, block_n))](
            ff, ids, wts, *ptrs, x, out, *hand, h, f, x.stride(0), out.stride(0),
            TOP_K=k, KP=triton.next_power_of_2(k), HAS_RES=has_res, NORM_OUT=norm_out is not None,
            BLOCK_N=block_n, num_warps=4, **flags, **pdl.LAUNCH_EARLY)
        return
    tiles = triton.cdiv(h, block_n)
    if t * tiles > buffers.tickets.numel() or buffers.partials.numel() < t * k * h:
        raise ValueError(f"decode buffers too small for the word down at block_n {block_n}")
    ptrs, flags = _word_flags(w.down, gated=False, block_n=block_n)
    ssi, n_parts, handed = gemv.handed_args(None, ff)
    _expert_word_kernel[(t * k, tiles)](ff, ff, ids, wts, *ptrs, x, out, buffers.partials, buffers.tickets,
                                        buffers.partials, *hand, ssi, h, f, f, 1, f, x.stride(0), out.stride(0), 0.0,
                                        gemv.MAGIC, n_parts, TOP_K=k, GATED=0, HAS_RES=has_res,
                                        NORM_OUT=norm_out is not None, SPLIT=False, BLOCK_N=block_n, num_warps=4,
                                        **handed, **flags, **pdl.LAUNCH_EARLY)


def _down_block_n(w: MoEWeights) -> int:
    return WORD_DOWN_BLOCK_N if _word(w.down) else DOWN_BLOCK_N


def norm_parts(w: MoEWeights) -> int:
    """How many sums of squares a decode block handing its row on (norm_out) writes: its down's column tiles."""
    return triton.cdiv(w.hidden, _down_block_n(w))


def _check_out(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x itself (the block adds to it), or a separate fp32 output of x's shape."""
    if out is None:
        return x
    if out.shape != x.shape or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be fp32 {tuple(x.shape)} with contiguous rows")
    return out


# ---------------------------------------------------------------- prefill: grouped GEMMs over all experts


@dataclass
class Groups:
    """The (row, choice) pairs sorted by expert, each expert's run padded to a multiple of block_m."""
    pair_of_slot: torch.Tensor  # int32 [capacity]: the pair in each padded slot, -1 for padding
    tile_expert: torch.Tensor  # int32 [capacity / block_m]: each tile's expert; n_experts past the last tile
    block_m: int

    @property
    def tiles(self) -> int:
        return self.tile_expert.numel()


# Grouping in one launch (torch's stable argsort, histogram, prefix sums and scatters took ~20 kernels a layer:
# 3.7 of a Qwen3-30B-A3B 512-token prefill's 32.5 ms on the H200, 2026-12-04). Each program takes GROUP_BLOCK
# pairs, SUB at a time: its per-expert counts (a one-hot [SUB pairs, experts] tile's column sums) and each
# pair's rank among its block's pairs of the same expert (the tile's exclusive cumsum down the pairs, plus the
# counts of the SUBs before). The last program to finish (an atomic ticket, as the router's) prefix-sums the
# blocks' counts into each (block, expert)'s first slot and places every pair at first slot + rank, so each
# expert's pairs keep their order (a stable sort), then writes the padding, the tiles' experts, and puts the
# ticket back to 0.
GROUP_MAX_BLOCKS = 64  # pair blocks at most: the last program's [blocks, experts] prefix sum


@triton.jit
def _group_kernel(ids_ptr, slot_ptr, tile_expert_ptr, rank_ptr, hist_ptr, base_ptr, cnt_ptr, PAIRS, E, TILES,
                  BLOCK_M: tl.constexpr, E_ALL: tl.constexpr, GROUP_BLOCK: tl.constexpr, SUB: tl.constexpr,
                  NB_ALL: tl.constexpr, PLACE_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    ea = tl.arange(0, E_ALL)
    seen = tl.zeros((E_ALL,), tl.int32)  # this block's pairs so far, per expert
    for p0 in range(0, GROUP_BLOCK, SUB):
        p = pid * GROUP_BLOCK + p0 + tl.arange(0, SUB)
        e = tl.load(ids_ptr + p, mask=p < PAIRS, other=E_ALL)  # E_ALL: no expert's column
        hot = (e[:, None] == ea[None, :]).to(tl.int32)
        rank = tl.sum(hot * (tl.cumsum(hot, axis=0) - hot + seen[None, :]), axis=1)
        tl.store(rank_ptr + p, rank, mask=p < PAIRS)
        seen += tl.sum(hot, axis=0)
    tl.store(hist_ptr + pid * E_ALL + ea, seen)
    tl.debug_barrier()  # every thread's stores before the (one-thread) release
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        b = tl.arange(0, NB_ALL)
        hist = tl.load(hist_ptr + b[:, None] * E_ALL + ea[None, :], mask=(b < tl.num_programs(0))[:, None],
                       other=0, cache_modifier=".cg")
        counts = tl.sum(hist, axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, axis=0)
        pad_start = pad_end - padded
        first = pad_start[None, :] + tl.cumsum(hist, axis=0) - hist  # each (block, expert)'s first slot
        tl.store(base_ptr + b[:, None] * E_ALL + ea[None, :], first)
        tl.debug_barrier()  # the bases before any thread reads another's
        for q0 in range(0, PAIRS, PLACE_BLOCK):
            q = q0 + tl.arange(0, PLACE_BLOCK)
            q_ok = q < PAIRS
            eq = tl.load(ids_ptr + q, mask=q_ok, other=0)
            r = tl.load(rank_ptr + q, mask=q_ok, other=0, cache_modifier=".cg")
            at = tl.load(base_ptr + (q // GROUP_BLOCK) * E_ALL + eq, mask=q_ok, other=0, cache_modifier=".cg")
            tl.store(slot_ptr + at + r, q, mask=q_ok)
        # padding: each expert's slots after its pairs, then every slot after the last expert's run
        j = tl.arange(0, BLOCK_M)
        pad = (pad_start + counts)[:, None] + j[None, :]
        tl.store(slot_ptr + pad, -1, mask=pad < pad_end[:, None])
        for s0 in range(tl.sum(padded, axis=0), TILES * BLOCK_M, PLACE_BLOCK):
            s = s0 + tl.arange(0, PLACE_BLOCK)
            tl.store(slot_ptr + s, -1, mask=s < TILES * BLOCK_M)
        # a tile's expert: the number of experts whose runs end at or before its first slot
        e_ok = ea < E
        for t0 in range(0, TILES, PLACE_BLOCK // E_ALL):
            t = t0 + tl.arange(0, PLACE_BLOCK // E_ALL)
            ahead = (pad_end[None, :] <= (t * BLOCK_M)[:, None]) & e_ok[None, :]
            tl.store(tile_expert_ptr + t, tl.sum(ahead.to(tl.int32), axis=1), mask=t < TILES)
        tl.atomic_xchg(cnt_ptr, 0)


def group_by_expert(ids: torch.Tensor, n_experts: int, block_m: int) -> Groups:
    """Group pairs by expert on the device, in one kernel (_group_kernel). Sizes come from the shapes alone
    (the worst case of padding: one partial tile per expert), so nothing waits for the GPU."""
    flat = ids.reshape(-1)
    assert flat.dtype == torch.int32 and flat.is_contiguous()
    pairs = flat.numel()
    c = group_constexprs(pairs, n_experts, block_m)
    blocks = triton.cdiv(pairs, c["GROUP_BLOCK"])
    tiles = triton.cdiv(pairs, block_m) + min(n_experts, pairs)
    dev = ids.device
    pair_of_slot = torch.empty(tiles * block_m, device=dev, dtype=torch.int32)
    tile_expert = torch.empty(tiles, device=dev, dtype=torch.int32)
    rank = torch.empty(pairs, device=dev, dtype=torch.int32)
    hist = torch.empty(c["NB_ALL"] * c["E_ALL"], device=dev, dtype=torch.int32)
    base = torch.empty_like(hist)
    ticket = torch.zeros(1, device=dev, dtype=torch.int32)
    _group_kernel[(blocks,)](flat, pair_of_slot, tile_expert, rank, hist, base, ticket, pairs, n_experts, tiles,
                             num_warps=8, **c)
    return Groups(pair_of_slot, tile_expert, block_m)


def group_constexprs(pairs: int, n_experts: int, block_m: int) -> dict:
    """_group_kernel's constexprs for `pairs` (row, choice) pairs (benchmarks/kernel_regs.py compiles them)."""
    e_all = max(16, triton.next_power_of_2(n_experts))
    group_block = max(16, triton.next_power_of_2(triton.cdiv(pairs, GROUP_MAX_BLOCKS)))
    return dict(BLOCK_M=block_m, E_ALL=e_all, GROUP_BLOCK=group_block, SUB=min(group_block, max(1, 4096 // e_all)),
                NB_ALL=max(16, triton.next_power_of_2(triton.cdiv(pairs, group_block))),
                PLACE_BLOCK=max(1024, e_all))


@triton.jit(do_not_specialize=["TILES"])  # follows the row count, as gemm's M
def _grouped_gemm_kernel(x_ptr, pair_ptr, tile_expert_ptr, wts_ptr, qw_ptr, s_ptr, mn_ptr, out_ptr,
                         N_OUT, K, E, ROWS_PER_EXPERT, TILES, stride_xm, stride_qn, stride_sn, stride_om,
                         TOP_K: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                         KIND: tl.constexpr, GROUP: tl.constexpr, SPAN: tl.constexpr, HAS_MINS: tl.constexpr,
                         ACT: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, FAST: tl.constexpr, SWAP: tl.constexpr = 0):
    """One [BLOCK_M, BLOCK_N] tile of one expert. GATHER: the A rows are the pairs' tokens (x rows), else
    the padded slots themselves. SCATTER: the result, times the pair's routing weight, goes to the pair's
    row of out; else to the slot's row. SWAP: computed transposed, as gemm's (the dequantized weight tile is
    wgmma's register operand, so a 32-row expert tile still runs on wgmma, whose M is at least 64)."""
    # Tiles vary fastest: neighbouring programs share the weight tile of one expert (or of the next).
    pid = tl.program_id(0)
    tile = pid % TILES
    pid_n = pid // TILES
    expert = tl.load(tile_expert_ptr + tile)
    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + slots)
    m_mask = pair >= 0
    if GATHER:
        a_rows = tl.where(m_mask, pair // TOP_K, 0)
    else:
        a_rows = slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    w_rows = expert * ROWS_PER_EXPERT + offs_n
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc
    k_end = tl.where(expert < E, K, 0)  # tiles past the last expert's run do no work
    for k0 in range(0, k_end, BLOCK_K):
        x_a, x_b = gemm._x_tiles(x_ptr, stride_xm, a_rows, m_mask, k0, K, KIND, GROUP, DOT, BLOCK_K)
        acc = gemm._dot_tile(acc, x_a, x_b, k0, K, qw_ptr, stride_qn, s_ptr, mn_ptr, stride_sn, w_rows, n_mask,
                             KIND, GROUP, SPAN, HAS_MINS, DOT, BLOCK_N, BLOCK_K, FAST, SWAP)
        if ACT != 0:
            acc_up = gemm._dot_tile(acc_up, x_a, x_b, k0, K, qw_ptr, stride_qn, s_ptr, mn_ptr, stride_sn,
                                    w_rows + N_OUT, n_mask, KIND, GROUP, SPAN, HAS_MINS, DOT, BLOCK_N, BLOCK_K,
                                    FAST, SWAP)
    if ACT != 0:
        acc = gemm._act(acc, ACT) * acc_up
    if SWAP:
        acc = tl.trans(acc)
    if SCATTER:
        acc = acc * tl.load(wts_ptr + pair, mask=m_mask, other=0.0)[:, None]
        o_rows = pair
    else:
        o_rows = slots
    o_mask = m_mask[:, None] & n_mask[None, :] & (expert < E)
    out = out_ptr + o_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_kernel(y_ptr, res_ptr, out_ptr, N, stride_rm, stride_om, TOP_K: tl.constexpr,
                    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[row] = [res[row] +] sum over its TOP_K pairs of y[pair], in choice order (deterministic)."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = n < N
    if HAS_RES:
        acc = tl.load(res_ptr + row * stride_rm + n, mask=ok, other=0.0)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
    for c in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (row * TOP_K + c) * N + n, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_om + n, acc, mask=ok)


def prefill_tiles(kind: str, group: int, gated: bool) -> dict:
    """Grouped-GEMM tiles. An expert sees ~T*k/E rows (32 at 512 tokens for Qwen3-30B-A3B), so taller tiles
    than 64 would be mostly padding; 64 rows is also the least at which a program of 4 warps gets Hopper's
    wgmma (Triton's TTGIR): at 32, the q4 dots fall back to mma.sync and a third of the main loop is register
    moves (705 instructions a 64 x 128 gate/up weight tile against 455; benchmarks/kernel_regs.py --moe), and
    at 512 tokens half of the experts need two 32-row tiles where one 64-row tile holds nearly all. q4 took
    32 rows up to 32 per expert until 2026-12-04, on eager, host-bound timings (moe_check, 2026-12-02: 999 µs
    against 1,096 at 64; repeats of the same tiles ranged 1.1-1.5 ms); 64 is unmeasured on the GPU as yet,
    and moe_check's graph-timed rows compare the two. q8: 128-wide tiles of 8 warps (971 µs against 1,450 at
    64 x 64 and 4 warps, the same eager timings)."""
    bk = max(128, group) if kind == "q4" else 64
    if kind == "q8":
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, num_warps=8, num_stages=3, FAST=2)
    return dict(BLOCK_M=64, BLOCK_N=64 if gated else 128, BLOCK_K=bk, num_warps=4, num_stages=3, FAST=2)


def _grouped_gemm(a, groups: Groups, w: PackedLinear, out, *, n_out: int, rows_per_expert: int, top_k: int,
                  gather: bool, act: str | None, weights=None, tiles: dict | None = None):
    cfg = prefill_tiles(w.kind, w.group, act is not None)
    cfg.update(tiles or {})
    cfg["BLOCK_M"] = groups.block_m
    if cfg["FAST"] == 2 and (_INTERPRET or a.device.type != "cuda"):
        cfg["FAST"] = 1  # the interpreter runs no PTX
    scales, mins, wflags = gemm.weight_operands(w, cfg["BLOCK_K"])
    n_experts = w.n // rows_per_expert
    grid = (groups.tiles * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a, groups.pair_of_slot, groups.tile_expert, weights if weights is not None else out,
        w.qweight, scales, mins, out, n_out, w.k, n_experts, rows_per_expert, groups.tiles,
        a.stride(0), w.qweight.stride(0), scales.stride(0), out.stride(0),
        TOP_K=top_k, GATHER=gather, SCATTER=weights is not None, ACT=_ACTS[act] if act else 0,
        DOT=tl.float16, **wflags, **cfg)
    return out


def prefill_block(x: torch.Tensor, w: MoEWeights, norm_weight: torch.Tensor, eps: float, act: str = "silu",
                  tiles: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (fp32 [T, H]) += the MoE block of x, for any number of rows, by grouped GEMMs over the experts (into
    `out` instead, as in decode_block, where it is given)."""
    t, h = x.shape
    if x.dtype != torch.float32 or x.stride(1) != 1 or h != w.hidden:
        raise ValueError(f"x must be fp32 [T, {w.hidden}] with contiguous rows (it is updated in place)")
    out = _check_out(x, out)
    if t == 0:
        return out
    k, f, e = w.top_k, w.ffn, w.n_experts
    ids, wts = route(x, w, norm_weight, eps)
    block_m = (tiles or {}).get("BLOCK_M", prefill_tiles(w.down.kind, w.down.group, False)["BLOCK_M"])
    groups = group_by_expert(ids, e, block_m)
    xn = gemm.rms_norm_half(x, norm_weight, eps)
    ff = torch.empty(groups.pair_of_slot.numel(), f, device=x.device, dtype=torch.float16)
    _grouped_gemm(xn, groups, w.gate_up, ff, n_out=f, rows_per_expert=2 * f, top_k=k, gather=True, act=act,
                  tiles=tiles)
    y = torch.empty(t * k, h, device=x.device, dtype=torch.float32)
    _grouped_gemm(ff, groups, w.down, y, n_out=h, rows_per_expert=h, top_k=k, gather=False, act=None,
                  weights=wts, tiles=tiles)
    block_n = min(1024, triton.next_power_of_2(h))
    _combine_kernel[(t, triton.cdiv(h, block_n))](y, x, out, h, x.stride(0), out.stride(0), TOP_K=k,
                                                   HAS_RES=out is x, BLOCK_N=block_n)
    return out


def block(x: torch.Tensor, w: MoEWeights, norm_weight: torch.Tensor, eps: float, act: str = "silu",
          buffers: DecodeBuffers | None = None, out: torch.Tensor | None = None,
          norm_out: "gemv.NormOut | None" = None, normed: tuple[torch.Tensor, torch.Tensor] | None = None
          ) -> torch.Tensor:
    """The MoE block on x in place (into `out` where given): the selected-experts kernels for up to 32 rows
    (or whenever decode buffers are given; norm_out, normed: see decode_block), the grouped GEMMs beyond."""
    if buffers is not None or x.shape[0] <= MAX_DECODE_ROWS:
        return decode_block(x, w, norm_weight, eps, act, buffers, out=out, norm_out=norm_out, normed=normed)
    if norm_out is not None or normed is not None:
        raise ValueError("a norm handoff takes the decode path (one row)")
    return prefill_block(x, w, norm_weight, eps, act, out=out)
