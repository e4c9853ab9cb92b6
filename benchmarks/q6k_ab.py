"""A/B of the lm_head GEMV on GGUF Q6_K weights: the native q6k kind (6.5625 bits per weight) against the
previous exact repack into q8 with group-16 fp32 scales (10 bits per weight).

    python3 benchmarks/q6k_ab.py --out DIR        (about a minute on an H100)

Shapes: 128256x2048 (Llama-3.2-1B), 128256x3072 (Llama-3.2-3B), 151936x4096 (Qwen3-8B), with the fused final
RMSNorm as decode runs it. Random q6k planes; the q8 form is pack.q6k_as_q8 of the same weight, so both
compute the same products. Every timed config is first checked against x' @ W.dequantize().T in fp32 (rel
err printed and written). Times are medians of CUDA-graph replays of back-to-back launches over rotated
weight copies (>= 160 MB per kind, so the 50 MB L2 cannot hold them). GB/s = packed weight bytes / time, and
its share of 3.0 TB/s. q6k rows: plan()'s pick and a few BLOCK_N / num_warps variants; M = 8 for plan() too.
Writes DIR/q6k_ab.csv and prints one summary line per shape.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time
from pathlib import Path

import torch

from graph_timing import time_graph
from ingot.backends import reference
from ingot.backends.cuda import gemv, gemv_q6k
from ingot.quant import pack

SHAPES = {"llama1b.lm_head": (128256, 2048), "llama3b.lm_head": (128256, 3072), "qwen8b.lm_head": (151936, 4096)}
PEAK = 3.0e12
VARIANTS = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]  # (BLOCK_N, num_warps) beside plan()'s


def random_q6k(n: int, k: int, dev) -> pack.PackedLinear:
    def plane(cols, lo=0, hi=256, dtype=torch.uint8):
        return torch.randint(lo, hi, (n, cols), device=dev, dtype=torch.int16).to(dtype)

    supers = ((torch.rand(n, k // 256, device=dev) + 0.5) * 2e-4).half()
    return pack.PackedLinear("q6k", n, k, 16, plane(k // 2), plane(k // 16, -128, 128, torch.int8),
                             qhigh=plane(k // 4), supers=supers, source="random")


def clone(p: pack.PackedLinear) -> pack.PackedLinear:
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    return dataclasses.replace(p, qweight=c(p.qweight), scales=c(p.scales), mins=c(p.mins), qhigh=c(p.qhigh),
                               supers=c(p.supers))


def measure(copies, x, nw, config=None):
    """(seconds per call, output of the first copy) for gemv.linear with the fused norm."""
    w0, m = copies[0], x.shape[0]
    if w0.kind == "q6k":
        ws_n = gemv_q6k.workspace_numel(w0, m, config)
        call = lambda w, o, ws: gemv_q6k.linear(x, w, out=o, norm_weight=nw, workspace=ws, config=config)  # noqa
    else:
        ws_n = gemv.workspace_numel(w0, m)
        call = lambda w, o, ws: gemv.linear(x, w, out=o, norm_weight=nw, workspace=ws)  # noqa: E731
    out = torch.empty(m, w0.n, device=x.device)
    ws = torch.empty(max(ws_n, 1), device=x.device)
    call(w0, out, ws)
    first = out.clone()
    return time_graph(lambda i: call(copies[i % len(copies)], out, ws)), first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows, t0 = [], time.time()
    for name, (n, k) in SHAPES.items():
        base = random_q6k(n, k, dev)
        q8 = pack.q6k_as_q8(base)
        nw = torch.randn(k, device=dev)
        xs = {m: torch.randn(m, k, device=dev) for m in (1, 8)}
        w_ref = base.dequantize()
        forms = {}
        for label, w in (("q8-g16", q8), ("q6k", base)):
            n_copies = max(2, math.ceil(160e6 / w.nbytes))
            forms[label] = [w] + [clone(w) for _ in range(n_copies - 1)]
        del q8
        cands = [("q8-g16", 1, None), ("q6k plan", 1, None), ("q8-g16", 8, None), ("q6k plan", 8, None)]
        cands += [(f"q6k bn{bn} w{nwarps}", 1, dataclasses.replace(gemv_q6k.plan(n, k, 1), block_n=bn,
                                                                    num_warps=nwarps))
                  for bn, nwarps in VARIANTS]
        best = {}
        for label, m, cfg in cands:
            x = xs[m]
            expect = reference.rms_norm(x, nw, 1e-6) @ w_ref.T
            copies = forms["q8-g16" if label.startswith("q8") else "q6k"]
            try:
                sec, got = measure(copies, x, nw, cfg)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                print(f"{name} {label} M={m}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            err = float((got - expect).norm() / expect.norm())
            nbytes = copies[0].nbytes
            row = dict(shape=name, n=n, k=k, m=m, form=label, config=str(cfg or "plan"), us=round(sec * 1e6, 2),
                       weight_mb=round(nbytes / 1e6, 1), gb_s=round(nbytes / sec / 1e9, 1),
                       share_3tb=round(nbytes / sec / PEAK, 3), rel_err=f"{err:.2e}")
            rows.append(row)
            if m == 1:
                best.setdefault(label.split()[0], row)
                if row["us"] < best[label.split()[0]]["us"]:
                    best[label.split()[0]] = row
        del forms, w_ref
        torch.cuda.empty_cache()
        a, b = best.get("q8-g16"), best.get("q6k")
        if a and b:
            print(f"{name}: q8-g16 {a['us']} us ({a['gb_s']} GB/s, {a['share_3tb']:.0%}) | q6k best {b['form']} "
                  f"{b['us']} us ({b['gb_s']} GB/s, {b['share_3tb']:.0%}) | speedup {a['us'] / b['us']:.2f}x "
                  f"| err q6k {b['rel_err']}")
    with open(out_dir / "q6k_ab.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s -> {out_dir / 'q6k_ab.csv'}")


if __name__ == "__main__":
    main()
