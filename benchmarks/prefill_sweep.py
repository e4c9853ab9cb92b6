"""Prefill GEMM tile sweep at M=512 on the real matrices of the benchmark models, on the GPU machine.

    python3 benchmarks/prefill_sweep.py --out DIR [--budget 210] [--models llama1b,qwen8b] [--kinds q4_0,q8_0]

For every (model, matrix, weight kind) it times ingot.backends.cuda.gemm.matmul under a set of tile configs:
"old" (the previous heuristic: fp32 dequantization, W through shared memory), "default" (what pick_tiles
chooses now) and candidates (FAST dequantization modes, the swapped W @ x^T form, other tile shapes), each
first checked against x @ W.dequantize().T (relative error < 3e-3; a config that fails to compile or to match
is reported, never timed). Operands mirror the backend's prefill: qkv and gate_up read the fp16 rows the
RMSNorm prologue writes, o and down read fp32 activations and add the residual in place. Times are CUDA-event
medians of 20 launches queued behind a GPU sleep (so launch latency is not timed), after 3 warm-up launches.
cuBLAS (torch.matmul on the fp16-dequantized weight, fp16 out) is timed on the same shape as the reference.
lm_head (one row at prefill) is skipped.

Prints the best config per shape with TFLOP/s, and per model the summed GEMM time of one 512-token chunk
(all layers) for old / default / best / cuBLAS. Writes DIR/prefill_sweep.csv (every config) and
DIR/prefill_best.csv (the winners). Compilation dominates the run time; --budget (seconds) stops adding
candidates once spent (old and default are always run).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

from ingot.backends.cuda import gemm, gemv  # noqa: E402
from ingot.quant.pack import PackedLinear  # noqa: E402

M = 512
# (name, N, K, gated, x fp32 + residual)
MODELS = {
    "llama1b": dict(layers=16, mats=[("qkv", 3072, 2048, False, False), ("o", 2048, 2048, False, True),
                                     ("gate_up", 16384, 2048, True, False), ("down", 2048, 8192, False, True)]),
    "llama3b": dict(layers=28, mats=[("qkv", 5120, 3072, False, False), ("o", 3072, 3072, False, True),
                                     ("gate_up", 16384, 3072, True, False), ("down", 3072, 8192, False, True)]),
    # Qwen3-4B: 32 heads of 128 make o's K 4096, wider than the 2560 hidden
    "qwen4b": dict(layers=36, mats=[("qkv", 6144, 2560, False, False), ("o", 2560, 4096, False, True),
                                    ("gate_up", 19456, 2560, True, False), ("down", 2560, 9728, False, True)]),
    "qwen8b": dict(layers=36, mats=[("qkv", 6144, 4096, False, False), ("o", 4096, 4096, False, True),
                                    ("gate_up", 24576, 4096, True, False), ("down", 4096, 12288, False, True)]),
    # Qwen3-30B-A3B's dense projections (its MLPs are experts: moe_check.py): 6.3 of its 32.5 ms pp512 (H200)
    "qwen30b": dict(layers=48, mats=[("qkv", 5120, 2048, False, False), ("o", 2048, 4096, False, True)]),
}
# (label, packed kind, group, scale dtype): GGUF Q4_0, Q8_0, and the Q6_K tensors of the llama Q4_0 files.
KINDS = {"q4_0": ("q4", 32, torch.float16), "q8_0": ("q8", 32, torch.float16), "q6_k": ("q8", 16, torch.float32)}


def candidates(kind: str, gated: bool) -> list[tuple[str, dict]]:
    """(label, tile overrides). Gated tiles carry two W tiles, so BLOCK_N is halved there."""
    h = 2 if gated else 1
    q4 = kind == "q4"
    bk = 128 if q4 else 64
    if M <= 64:
        return short_candidates(bk)
    c = [
        ("f1", dict(FAST=1, SWAP=0)),
        ("f2_128x128", dict(BLOCK_M=128, BLOCK_N=128 // h, BLOCK_K=bk, num_warps=8, num_stages=3, FAST=2, SWAP=0)),
        ("f2_128x256", dict(BLOCK_M=128, BLOCK_N=256 // h, BLOCK_K=64, num_warps=8, num_stages=3, FAST=2, SWAP=0)),
        ("f2_256x128", dict(BLOCK_M=256, BLOCK_N=128 // h, BLOCK_K=64, num_warps=8, num_stages=3, FAST=2, SWAP=0)),
        ("f2_64x128", dict(BLOCK_M=64, BLOCK_N=128 // h, BLOCK_K=bk, num_warps=4, num_stages=4, FAST=2, SWAP=0)),
        # Swapped: BLOCK_N is wgmma's M (64 per warpgroup), BLOCK_M its N (up to 256).
        ("sw_256x128", dict(BLOCK_M=256, BLOCK_N=128 // h, BLOCK_K=64, num_warps=8, num_stages=3, FAST=2, SWAP=1)),
        ("sw_128x128", dict(BLOCK_M=128, BLOCK_N=128 // h, BLOCK_K=64, num_warps=8, num_stages=4, FAST=2, SWAP=1)),
        ("sw_256x64", dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, FAST=2, SWAP=1)),
        ("sw_128x64", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=3, FAST=2, SWAP=1)),
    ]
    return c


def short_candidates(bk: int) -> list[tuple[str, dict]]:
    """Batched decode rows (--m 8, 16): 16-row tiles instead of pick_tiles' 64, swapped (W as wgmma's A
    operand from registers) or as mma.sync dots; the ones ptxas compiles for sm_90a without big spills."""
    c = []
    for swap in (1, 0):
        for bn, warps in ((128, 8), (64, 4)):
            c.append((f"{'sw' if swap else 'mma'}16_n{bn}_w{warps}",
                      dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=warps, num_stages=4, FAST=2, SWAP=swap)))
    c.append(("sw32_n128_w8", dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, FAST=2, SWAP=1)))
    c.append(("f2_64_k" + str(bk), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, num_warps=8, num_stages=4, FAST=2,
                                        SWAP=0)))
    return c


def make_weight(kind, group, sdtype, n, k, dev, gen) -> PackedLinear:
    ng = k // group
    scales = (torch.rand(n, ng, device=dev, generator=gen) * 0.02 + 0.005).to(sdtype)
    if kind == "q4":
        qw = torch.randint(0, 256, (n, k // 2), device=dev, generator=gen, dtype=torch.int32).to(torch.uint8)
    else:
        lim = 32 if group == 16 else 128  # Q6_K quants are -32..31
        qw = torch.randint(-lim, lim, (n, k), device=dev, generator=gen, dtype=torch.int32).to(torch.int8)
    return PackedLinear(kind, n, k, group, qw, scales, None)


def time_ms(fn, reps=20, warmup=3) -> float:
    if not torch.cuda.is_available():  # --device cpu: a dry run of the script's logic under the interpreter
        fn()
        return 1.0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(20_000_000)  # ~10 ms of GPU busy-wait: the launches below queue up behind it
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def _set_m(m: int) -> int:
    global M
    M = m
    return m


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def main():  # noqa: C901 (one linear sweep)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=210.0, help="seconds after which only old/default run")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--m", type=int, default=512, help="rows (the chunk length)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    M = _set_m(args.m)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    t0 = time.time()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"
    print(f"{name}  M={M}  budget {args.budget:.0f}s")
    rows, best_rows = [], []
    chunk = {}  # (model, kind) -> {label: summed ms}
    models = [m for m in args.models.split(",") if m]
    for kind_label in [k for k in args.kinds.split(",") if k]:
        kind, group, sdtype = KINDS[kind_label]
        for model in models:
            spec = MODELS[model]
            totals = chunk.setdefault((model, kind_label), {"old": 0.0, "default": 0.0, "best": 0.0, "cublas": 0.0})
            for name, n, k, gated, fp32_res in spec["mats"]:
                w = make_weight(kind, group, sdtype, n, k, dev, gen)
                x = torch.randn(M, k, device=dev, generator=gen)
                if not fp32_res:
                    x = x.half()
                dq = w.dequantize()
                n_out = n // 2 if gated else n
                res = torch.randn(M, n_out, device=dev, generator=gen) if fp32_res else None
                want = x.float() @ dq.T
                if gated:
                    want = F.silu(want[:, :n_out]) * want[:, n_out:]
                if res is not None:
                    want = want + res
                flop = 2.0 * M * n * k
                out = torch.empty(M, n_out, device=dev, dtype=torch.float32)
                act = "silu" if gated else None

                # cuBLAS reference: fp16 x @ fp16 W^T, fp16 out.
                w16, x16 = dq.half(), x.half()
                cub = time_ms(lambda: torch.matmul(x16, w16.T))
                del w16

                base = gemm.pick_tiles(M, n_out, k, kind, group, gated, x.element_size())
                configs = [("old", dict(base, FAST=0, SWAP=0)), ("default", dict(base))]
                configs += [(lab, dict(base, **c)) for lab, c in candidates(kind, gated)]
                if kind_label == "q6_k":  # lowest priority: the best-guess shapes only
                    configs = [c for c in configs if c[0] in ("old", "default", "f2_128x256", "sw_256x128")]
                results = {}
                for label, cfg in configs:
                    if label not in ("old", "default") and time.time() - t0 > args.budget:
                        continue
                    key = tuple(sorted(cfg.items()))
                    if key in results.values():
                        continue  # a candidate identical to old/default
                    rec = dict(model=model, matrix=name, kind=kind_label, M=M, N=n, K=k, gated=int(gated),
                               x_dtype="fp32" if fp32_res else "fp16", config=label, **cfg,
                               ok=0, rel_err="", ms="", tflops="", cublas_ms=f"{cub:.4f}",
                               cublas_tflops=f"{flop / cub / 1e9:.1f}", note="")

                    def run(cfg=cfg):
                        if res is not None:
                            out.copy_(res)
                            return gemm.matmul(x, w, out=out, residual=out, gated=act, tiles=cfg)
                        return gemm.matmul(x, w, out=out, gated=act, tiles=cfg)

                    try:
                        err = rel_err(run(), want)
                        rec["rel_err"] = f"{err:.2e}"
                        if err < 3e-3:
                            rec["ok"] = 1
                            if res is not None:  # time without the residual re-copy
                                ms = time_ms(lambda: gemm.matmul(x, w, out=out, residual=out, tiles=cfg))
                            else:
                                ms = time_ms(run)
                            rec["ms"], rec["tflops"] = f"{ms:.4f}", f"{flop / ms / 1e9:.1f}"
                            results[label] = key
                        else:
                            rec["note"] = "WRONG RESULT"
                    except Exception as e:  # compile failure (e.g. shared memory), launch error
                        rec["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
                    rows.append(rec)
                    status = f"{float(rec['ms']):8.3f} ms {float(rec['tflops']):6.1f} TF/s" if rec["ms"] else \
                        f"FAILED {rec['note'] or rec['rel_err']}"
                    print(f"  {model:8s} {name:8s} {kind_label} {label:11s} {status}  err {rec['rel_err']}",
                          flush=True)
                if M <= gemv.MAX_M:  # what these rows would take with INGOT_DECODE_ROWS >= M (the M > 1 byte GEMV)
                    xg = x.float().contiguous()
                    try:
                        err = rel_err(gemv.linear(xg, w, out=out, gated=act, residual=res), want)
                        gms = time_ms(lambda: gemv.linear(xg, w, out=out, gated=act))
                        print(f"  {model:8s} {name:8s} {kind_label} {'gemv':11s} {gms:8.3f} ms  err {err:.2e}",
                              flush=True)
                    except Exception as e:
                        print(f"  {model:8s} {name:8s} {kind_label} gemv FAILED {type(e).__name__}: {e}", flush=True)
                timed = [r for r in rows if r["model"] == model and r["matrix"] == name and r["kind"] == kind_label
                         and r["ms"]]
                if not timed:
                    continue
                best = min(timed, key=lambda r: float(r["ms"]))
                get = {r["config"]: float(r["ms"]) for r in timed}
                for lab in ("old", "default"):
                    totals[lab] += get.get(lab, float("nan")) * spec["layers"]
                totals["best"] += float(best["ms"]) * spec["layers"]
                totals["cublas"] += cub * spec["layers"]
                best_rows.append(best)
                print(f"BEST {model} {name} {kind_label} [{n}x{k}{' gated' if gated else ''}] {best['config']} "
                      f"BM={best['BLOCK_M']} BN={best['BLOCK_N']} BK={best['BLOCK_K']} w={best['num_warps']} "
                      f"st={best['num_stages']} FAST={best['FAST']} SWAP={best['SWAP']}: {float(best['ms']):.3f} ms "
                      f"{best['tflops']} TF/s | old {get.get('old', float('nan')):.3f} default "
                      f"{get.get('default', float('nan')):.3f} cuBLAS {cub:.3f} ms ({flop / cub / 1e9:.0f} TF/s)",
                      flush=True)
                del w, dq, x, want
            print(f"== {model} {kind_label}: GEMM ms per 512-token chunk (all layers): "
                  + "  ".join(f"{k} {v:.2f}" for k, v in totals.items())
                  + "  -> GEMM-only tok/s best " + (f"{M / totals['best'] * 1e3:,.0f}" if totals["best"] else "-"),
                  flush=True)

    fields = list(rows[0].keys()) if rows else []
    for fn, data in (("prefill_sweep.csv", rows), ("prefill_best.csv", best_rows)):
        with open(os.path.join(args.out, fn), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=fields)
            wr.writeheader()
            wr.writerows(data)
    print(f"wrote {args.out}/prefill_sweep.csv and prefill_best.csv in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
