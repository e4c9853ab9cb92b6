"""Decode attention and the fused q/k-norm + RoPE + KV-store kernel at batch 1, on the GPU machine.

    python3 benchmarks/small_ops_sweep.py --out DIR [--budget-s 150]

For the head shapes of Llama-3.2-1B, Qwen3-0.6B, Qwen3-8B and Gemma-3-1B (plus Gemma's 512-key sliding-window
layers) at context lengths 64, 512, 4096 and 32768 in a 32768-position cache, times:
  * decode attention: the previous two-launch path (split + reduce kernels, "old"), the single-launch path
    with the shipped defaults ("new"), and single-launch tile variants (keys per split, keys per tile, warps,
    programs per KV head);
  * qk_norm_rope_store: the previous one-program-per-(token, head) kernel ("old", kept below for comparison)
    against the per-token kernel at each num_warps.
Every variant is first checked against a torch reference; times are medians over replays of a CUDA graph of 50
launches (CUDA events), per launch, which is how the decode step runs them. Each model gets an equal share of
--budget-s to start tile variants (old/new defaults always run), which keeps the run under ~3 minutes.
Prints the best variant per case and writes DIR/small_ops_sweep.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from graph_timing import time_graph
from ingot.backends.cuda import attention, rope  # noqa: E402

MODELS = {  # name: (q heads, kv heads, head_dim, qk norm, rope theta, window)
    "llama3.2-1b": (32, 8, 64, False, 500000.0, 0),
    "qwen3-0.6b": (16, 8, 128, True, 1000000.0, 0),
    "qwen3-8b": (32, 8, 128, True, 1000000.0, 0),
    "gemma3-1b": (4, 1, 256, True, 1000000.0, 0),
    "gemma3-1b-local": (4, 1, 256, True, 10000.0, 512),
}
CONTEXTS = [64, 512, 4096, 32768]
MAX_CTX = 32768
LAUNCHES = 50
TRIALS = 15


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# --- decode attention -------------------------------------------------------------------------------------

def attn_reference(q, k, v, scale, window):
    """q [Hq, D] fp32 for the last of n positions; k, v [n, Hkv, D] fp16."""
    n, hkv = k.shape[0], k.shape[1]
    g = q.shape[0] // hkv
    lo = max(0, n - window) if window else 0
    k = k[lo:].float().repeat_interleave(g, dim=1)
    v = v[lo:].float().repeat_interleave(g, dim=1)
    p = (torch.einsum("hd,nhd->hn", q, k) * scale).softmax(-1)
    return torch.einsum("hn,nhd->hd", p, v)


def attn_variants(d, g):
    """(name, chunk, block_n, num_warps, programs, fused); None means the shipped default."""
    dn, dw, _ = attention.DECODE_CONFIGS.get((d, g > 1), (32, 4, 2))
    out = [("old", attention.CHUNK, None, None, attention.MAX_PROGRAMS, False),
           ("new", attention.CHUNK, None, None, attention.MAX_PROGRAMS, True)]
    for chunk in (64, 128, 256):
        for nw in (2, 4, 8):
            if (chunk, nw) != (attention.CHUNK, dw):
                out.append((f"c{chunk}/w{nw}", chunk, None, nw, attention.MAX_PROGRAMS, True))
    if dn != 32:
        out.append((f"c{attention.CHUNK}/n32", attention.CHUNK, 32, None, attention.MAX_PROGRAMS, True))
    for progs in (16, 32, 128):
        out.append((f"c{attention.CHUNK}/P{progs}", attention.CHUNK, None, None, progs, True))
    return out


def sweep_attention(dev, rows, budget_s):
    gen = torch.Generator(device=dev).manual_seed(0)
    # Each model gets an equal share of the budget to start (and so compile) tile variants; a variant once
    # started runs at every context length, so the table compares like with like.
    share = budget_s / len([m for m in MODELS if not MODELS[m][5]])
    for model, (hq, hkv, d, _, _, window) in MODELS.items():
        deadline = time.monotonic() + share
        started = set()
        k_cache = (torch.randn(1, MAX_CTX, hkv, d, device=dev, generator=gen) * 1.5).half()
        v_cache = torch.randn(1, MAX_CTX, hkv, d, device=dev, generator=gen).half()
        scale = d**-0.5
        variants = attn_variants(d, hq // hkv)
        if window:  # the local layers only need the comparison of the defaults
            variants = variants[:2]
        for ctx in CONTEXTS:
            q = torch.randn(1, hq, d, device=dev, generator=gen)
            seq_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
            slots = torch.zeros(1, dtype=torch.int32, device=dev)
            want = attn_reference(q[0], k_cache[0, :ctx], v_cache[0, :ctx], scale, window)
            for name, chunk, bn, nw, progs, fused in variants:
                if name not in started and name not in ("old", "new") and time.monotonic() > deadline:
                    continue
                started.add(name)
                scratch = attention.decode_scratch(1, hq, d, MAX_CTX, dev, chunk=chunk, programs=progs)
                out = torch.empty(1, hq, d, device=dev)

                def fn():
                    attention.decode_attention(q, k_cache, v_cache, seq_lens, slots, scale=scale, window=window,
                                               out=out, scratch=scratch, block_n=bn, num_warps=nw, fused=fused)

                try:
                    out.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    err = rel_err(out[0], want)
                    ok = err < 2e-3 and bool((scratch.count == 0).all())
                    sec = time_graph(lambda i: fn(), LAUNCHES, TRIALS) if ok else math.nan
                    # The graph replays must leave the same (deterministic) result and clean counters.
                    ok = ok and rel_err(out[0], want) < 2e-3 and bool((scratch.count == 0).all())
                except Exception as e:  # a config that does not compile (e.g. out of shared memory)
                    print(f"  {model} ctx {ctx} {name}: {type(e).__name__}: {str(e)[:120]}")
                    err, ok, sec = math.nan, False, math.nan
                rows.append(dict(op="attention", model=model, ctx=ctx, variant=name, chunk=chunk, block_n=bn or "",
                                 num_warps=nw or "", programs=progs, fused=int(fused), us=sec * 1e6, rel_err=err,
                                 ok=int(ok)))
        del k_cache, v_cache
        torch.cuda.empty_cache()


# --- q/k norm + rope + KV store ---------------------------------------------------------------------------
# The previous kernel (one program per (token, q head) and per (token, kv head)), kept here as the baseline.

@triton.jit
def _old_norm_rope(x1, x2, w_ptr, inv_freq_ptr, pos, offs, mask, D, eps, NORM: tl.constexpr, HALF: tl.constexpr):
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
        x1 = x1 * inv * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = x2 * inv * tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    c = tl.cos(angle)
    s = tl.sin(angle)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _old_rope_kernel(
        qkv_ptr, qkv_stride, pos_ptr, slot_ptr, inv_freq_ptr, qn_ptr, kn_ptr,
        q_ptr, q_s0, q_s1, k_ptr, k_s0, k_s1, k_s2, v_ptr, v_s0, v_s1, v_s2,
        n_heads, n_kv_heads, eps,
        HALF: tl.constexpr, BLOCK: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    D = 2 * HALF
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    pos = tl.load(pos_ptr + t)
    row = qkv_ptr + t * qkv_stride
    if head < n_heads:
        src = row + head * D
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        y1, y2 = _old_norm_rope(x1, x2, qn_ptr, inv_freq_ptr, pos, offs, mask, D, eps, Q_NORM, HALF)
        q_dst = q_ptr + t * q_s0 + head * q_s1
        tl.store(q_dst + offs, y1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_dst + HALF + offs, y2.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        kv = head - n_heads
        src = row + (n_heads + kv) * D
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        y1, y2 = _old_norm_rope(x1, x2, kn_ptr, inv_freq_ptr, pos, offs, mask, D, eps, K_NORM, HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        p64 = pos.to(tl.int64)
        k_dst = k_ptr + slot * k_s0 + p64 * k_s1 + kv * k_s2
        tl.store(k_dst + offs, y1.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF + offs, y2.to(k_ptr.dtype.element_ty), mask=mask)
        vsrc = row + (n_heads + n_kv_heads + kv) * D
        vdst = v_ptr + slot * v_s0 + p64 * v_s1 + kv * v_s2
        tl.store(vdst + offs, tl.load(vsrc + offs, mask=mask).to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=mask).to(v_ptr.dtype.element_ty), mask=mask)


def old_rope(qkv, n_heads, n_kv_heads, head_dim, q_norm, k_norm, eps, inv_freq, positions, slots, k_cache, v_cache,
             q_out):
    half = head_dim // 2
    block = triton.next_power_of_2(half)
    _old_rope_kernel[(qkv.shape[0], n_heads + n_kv_heads)](
        qkv, qkv.stride(0), positions, slots, inv_freq,
        q_norm if q_norm is not None else inv_freq, k_norm if k_norm is not None else inv_freq,
        q_out, q_out.stride(0), q_out.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_heads, n_kv_heads, float(eps),
        HALF=half, BLOCK=block, Q_NORM=q_norm is not None, K_NORM=k_norm is not None,
        num_warps=max(1, min(4, block // 32)))


def rope_reference(qkv, hq, hkv, d, qn, kn, eps, inv_freq, pos):
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w if w is not None else x

    def rot(x, c, s):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)

    ang = torch.tensor(float(pos), device=inv_freq.device) * inv_freq  # one fp32 product, as the kernel
    c, s = ang.cos(), ang.sin()
    q = qkv[0, : hq * d].view(hq, d)
    k = qkv[0, hq * d:(hq + hkv) * d].view(hkv, d)
    v = qkv[0, (hq + hkv) * d:].view(hkv, d)
    return rot(norm(q, qn), c, s), rot(norm(k, kn), c, s), v


def sweep_rope(dev, rows):
    gen = torch.Generator(device=dev).manual_seed(1)
    for model, (hq, hkv, d, qk_norm, theta, _) in MODELS.items():
        if model.endswith("-local"):
            continue
        inv_freq = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(dev)
        qn = torch.randn(d, device=dev, generator=gen) + 1 if qk_norm else None
        kn = torch.randn(d, device=dev, generator=gen) + 1 if qk_norm else None
        k_cache = torch.zeros(1, MAX_CTX, hkv, d, device=dev, dtype=torch.float16)
        v_cache = torch.zeros_like(k_cache)
        qkv = torch.randn(1, (hq + 2 * hkv) * d, device=dev, generator=gen)
        slots = torch.zeros(1, dtype=torch.int32, device=dev)
        for ctx in CONTEXTS:
            pos = torch.tensor([ctx - 1], dtype=torch.int32, device=dev)
            q_out = torch.empty(1, hq, d, device=dev)
            wq, wk, wv = rope_reference(qkv, hq, hkv, d, qn, kn, 1e-6, inv_freq, ctx - 1)
            variants = [("old", None, True)] + [("new", None, False)] + [(f"w{w}", w, False) for w in (1, 2, 4, 8)]
            for name, nw, old in variants:
                args = dict(n_heads=hq, n_kv_heads=hkv, head_dim=d, q_norm=qn, k_norm=kn, eps=1e-6, inv_freq=inv_freq,
                            positions=pos, slots=slots, k_cache=k_cache, v_cache=v_cache, q_out=q_out)
                if old:
                    def fn():
                        old_rope(qkv, **args)
                else:
                    def fn():
                        rope.qk_norm_rope_store(qkv, num_warps=nw, **args)
                q_out.fill_(float("nan"))
                k_cache[0, ctx - 1].fill_(float("nan"))
                v_cache[0, ctx - 1].fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                err = max(rel_err(q_out[0], wq), rel_err(k_cache[0, ctx - 1], wk))
                ok = err < 2e-3 and torch.equal(v_cache[0, ctx - 1], wv.half())
                sec = time_graph(lambda i: fn(), LAUNCHES, TRIALS) if ok else math.nan
                rows.append(dict(op="rope", model=model, ctx=ctx, variant=name, chunk="", block_n="",
                                 num_warps=nw or "", programs="", fused="", us=sec * 1e6, rel_err=err, ok=int(ok)))
        del k_cache, v_cache


def table(rows):
    print(f"\n{'op':9s} {'model':16s} {'ctx':>6s} {'old us':>8s} {'new us':>8s} {'best us':>8s}  best variant")
    keys = []
    for r in rows:
        k = (r["op"], r["model"], r["ctx"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in rows if (r["op"], r["model"], r["ctx"]) == k]
        by = {r["variant"]: r for r in rs}
        good = [r for r in rs if r["ok"]]
        best = min(good, key=lambda r: r["us"]) if good else None
        fmt = lambda r: f"{r['us']:8.2f}" if r and r["ok"] else f"{'FAIL':>8s}"  # noqa: E731
        print(f"{k[0]:9s} {k[1]:16s} {k[2]:6d} {fmt(by.get('old'))} {fmt(by.get('new'))} {fmt(best)}  "
              f"{best['variant'] if best else '-'}")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"\n{len(bad)} variant(s) failed the reference check or did not compile:")
        for r in bad:
            print(f"  {r['op']} {r['model']} ctx {r['ctx']} {r['variant']}: rel_err {r['rel_err']:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=80.0,
                    help="time for starting attention tile variants, shared by the models")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    t0 = time.monotonic()
    print(f"{torch.cuda.get_device_name(dev)}, triton {triton.__version__}, torch {torch.__version__}")
    rows = []
    sweep_rope(dev, rows)
    sweep_attention(dev, rows, args.budget_s)
    table(rows)
    path = os.path.join(args.out, "small_ops_sweep.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {path} ({len(rows)} rows) in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
