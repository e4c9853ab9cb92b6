"""M = 1 decode GEMV config sweep on the GPU: which tiles / unpack form / K split is fastest per shape and kind.

    python3 benchmarks/gemv_sweep.py --out DIR        (< 4 minutes on an H100; --budget-s caps it)

For each model shape x kind (q4-sym, q4-affine, q8-sym; group 32) it times the old byte kernel with its old
heuristic (the baseline), plan()'s current pick, and a set of word-kernel candidates (unpack form, BLOCK_N,
num_warps, K split). Every candidate's output is first checked against x @ w.dequantize().T in fp32 (rel err
< 1e-4; 2e-3 for unpack 2's fp16 products); a failing one is reported and not timed. Times are medians of
CUDA-graph replays of back-to-back launches over rotated weight copies (>= 160 MB in all, so the 50 MB L2 cannot hold them), as in
benchmarks/kernel_bench.py. GB/s = packed weight bytes / time, also as a share of the measured copy bandwidth.
Prints the best config per shape/kind and writes DIR/gemv_sweep.csv (every candidate) and
DIR/gemv_sweep_best.csv. Past --budget-s seconds only the baseline and plan() are timed for the remaining shapes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time

import torch
import triton

from graph_timing import time_graph
from ingot.backends.cuda import gemv
from ingot.backends.cuda.gemv import GemvConfig
from ingot.bench.roofline import copy_bandwidth
from ingot.quant import pack

SHAPES = {  # name: (N, K, gated)
    "llama1b.qkv": (3072, 2048, False), "llama1b.o": (2048, 2048, False),
    "llama1b.gate_up": (16384, 2048, True), "llama1b.down": (2048, 8192, False),
    "llama1b.lm_head": (128256, 2048, False),
    "llama3b.qkv": (5120, 3072, False), "llama3b.o": (3072, 3072, False),
    "llama3b.gate_up": (16384, 3072, True), "llama3b.down": (3072, 8192, False),
    "qwen8b.qkv": (6144, 4096, False), "qwen8b.o": (4096, 4096, False),
    "qwen8b.gate_up": (24576, 4096, True), "qwen8b.down": (4096, 12288, False),
    "qwen8b.lm_head": (151936, 4096, False),
    # Qwen3-30B-A3B's attention and output projections (its experts run moe's kernels): small matrices with a
    # short K, where a call's fixed cost weighs most
    "qwen30b.qkv": (5120, 2048, False), "qwen30b.o": (2048, 4096, False), "qwen30b.lm_head": (151936, 2048, False),
}
KINDS = {"q4-sym": ("q4", True), "q4-affine": ("q4", False), "q8-sym": ("q8", True)}
GROUP = 32
# word-kernel shapes: (unpack, block_n, num_warps)
WORD_TILES = [(1, 32, 4), (1, 64, 4), (1, 128, 4), (1, 128, 8), (1, 256, 8), (0, 64, 4), (0, 128, 8),
              (2, 64, 4), (2, 128, 4), (2, 128, 8), (2, 256, 8)]  # unpack 2: q4 only


def no_empty(split: int, k_tiles: int) -> int:
    split = max(1, min(split, k_tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def candidates(n_out, k, kind, gated):
    """(label, config) for the baseline, plan(), and the word-kernel grid."""
    out = [("byte-old", gemv._plan_byte(n_out, k, 1, kind, GROUP, gated)),
           ("plan", gemv.plan(n_out, k, 1, kind, GROUP, gated))]
    block_k = max(256 if kind == "q4" else 128, GROUP)
    k_tiles = triton.cdiv(k, block_k)
    for unpack, block_n, warps in WORD_TILES:
        if unpack == 2 and kind != "q4":
            continue
        tiles = triton.cdiv(n_out, block_n)
        splits = {1} | {no_empty(triton.cdiv(c * gemv.N_SMS, tiles), k_tiles) for c in (2, 4, 8)}
        for s in sorted(splits):
            out.append((f"word-u{unpack}", GemvConfig(1, block_n, block_k, s, warps, "word", unpack)))
    seen, uniq = set(), []
    for label, c in out:
        if c not in seen:
            seen.add(c)
            uniq.append((label, c))
    return uniq


def cfg_str(c: GemvConfig) -> str:
    return f"{c.kernel}/u{c.unpack} bn{c.block_n} bk{c.block_k} s{c.split} w{c.num_warps}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=200.0, help="after this, only baseline + plan() are timed")
    ap.add_argument("--shapes", default="", help="comma-separated subset of shape names")
    ap.add_argument("--kinds", default="", help="comma-separated subset of " + ", ".join(KINDS))
    args = ap.parse_args()
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}: copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    names = [s for s in args.shapes.split(",") if s] or list(SHAPES)
    rows, best_rows = [], []
    for name in names:
        n, k, gated = SHAPES[name]
        act = "silu" if gated else None
        n_out = n // 2 if gated else n
        for label, (kind, sym) in KINDS.items():
            if args.kinds and label not in args.kinds.split(","):
                continue
            torch.manual_seed(0)
            w = torch.randn(n, k, device=dev) * 0.02
            w0 = pack.quantize(w, kind, group=GROUP, sym=sym)
            del w
            nbytes = w0.nbytes
            copies = min(64, max(2, math.ceil(160e6 / nbytes)))
            packed = [w0] + [dataclasses.replace(w0, qweight=w0.qweight.clone(), scales=w0.scales.clone(),
                                                 mins=None if w0.mins is None else w0.mins.clone())
                             for _ in range(copies - 1)]
            reps = max(20, copies)
            x = torch.randn(1, k, device=dev)
            y = x @ w0.dequantize().T
            ref = torch.nn.functional.silu(y[:, :n_out]) * y[:, n_out:] if gated else y
            out = torch.empty(1, n_out, device=dev)
            cands = candidates(n_out, k, kind, gated)
            if time.time() - t_start > args.budget_s:
                cands = cands[:2]
            ws = torch.zeros(max(gemv.workspace_numel(w0, 1, act, c) for _, c in cands) + 1, device=dev)
            results = []
            for cname, cfg in cands:
                def step(i=0, cfg=cfg):
                    gemv.linear(x, packed[i % copies], out=out, gated=act, workspace=ws, config=cfg)

                out.fill_(float("nan"))
                try:
                    step()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result too
                    print(f"  {name} {label} {cfg_str(cfg)}: error {type(e).__name__}: {e}"[:300], flush=True)
                    continue
                err = ((out - ref).norm() / ref.norm()).item()
                ok = math.isfinite(err) and err < (2e-3 if cfg.unpack == 2 else 1e-4)  # 2: fp16 products
                t = time_graph(step, reps) if ok else float("nan")
                r = dict(shape=name, n=n, k=k, gated=int(gated), kind=label, cand=cname, config=cfg_str(cfg),
                         block_n=cfg.block_n, block_k=cfg.block_k, split=cfg.split, num_warps=cfg.num_warps,
                         kernel=cfg.kernel, unpack=cfg.unpack, rel_err=err, ok=int(ok), us=t * 1e6,
                         gbps=nbytes / t / 1e9, share=nbytes / t / bw)
                rows.append(r)
                if not ok:
                    print(f"  {name} {label} {cfg_str(cfg)}: WRONG rel err {err:.3g}", flush=True)
                else:
                    results.append(r)
            del packed, w0, y, ref
            if not results:
                continue
            best = min(results, key=lambda r: r["us"])
            base = next((r for r in results if r["cand"] == "byte-old"), None)
            planned = next((r for r in results if r["cand"] == "plan"), None)
            b = dict(best)
            b["plan_us"] = planned["us"] if planned else float("nan")
            b["plan_config"] = planned["config"] if planned else ""
            b["old_us"] = base["us"] if base else float("nan")
            best_rows.append(b)
            print(f"{name:16s} {label:9s} {n:>6}x{k:<6} best {best['us']:7.1f} us {best['gbps']:6.0f} GB/s "
                  f"{100 * best['share']:5.1f}% [{best['config']}]  plan {b['plan_us']:7.1f} us  "
                  f"old {b['old_us']:7.1f} us  x{b['old_us'] / best['us']:.2f}  ({time.time() - t_start:.0f}s)",
                  flush=True)
            torch.cuda.empty_cache()
    for fname, data in (("gemv_sweep.csv", rows), ("gemv_sweep_best.csv", best_rows)):
        if data:
            with open(f"{args.out}/{fname}", "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(data[-1]))
                wr.writeheader()
                wr.writerows(data)
    print("\nbest per shape/kind (GemvConfig(block_m, block_n, block_k, split, num_warps, kernel, unpack)):")
    for b in best_rows:
        print(f"  ({b['shape']!r}, {b['kind']!r}): GemvConfig(1, {b['block_n']}, {b['block_k']}, {b['split']}, "
              f"{b['num_warps']}, {b['kernel']!r}, {b['unpack']}),  # {b['us']:.1f} us, "
              f"{100 * b['share']:.0f}% of copy; plan {b['plan_us']:.1f} us [{b['plan_config']}]")
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
