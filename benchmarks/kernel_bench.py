"""Per-kernel bandwidth at the real shapes of the benchmark models, on the GPU machine.

Each decode GEMV reads its packed weight once: achieved bytes/s = weight bytes / kernel time, set against
the measured device copy bandwidth. Times are medians of CUDA-graph replays of 20 launches over rotating
weight copies (so L2 does not hold the weight between launches)."""

from __future__ import annotations

import argparse
import csv

import torch

from graph_timing import time_graph
from ingot.backends.cuda import gemv
from ingot.bench.roofline import copy_bandwidth
from ingot.quant import pack

SHAPES = {  # (name, N, K)
    "llama1b.qkv": (3072, 2048), "llama1b.o": (2048, 2048), "llama1b.gate_up": (16384, 2048),
    "llama1b.down": (2048, 8192), "llama1b.lm_head": (128256, 2048),
    "qwen8b.qkv": (6144, 4096), "qwen8b.o": (4096, 4096), "qwen8b.gate_up": (24576, 4096),
    "qwen8b.down": (4096, 12288), "qwen8b.lm_head": (151936, 4096),
}
KINDS = [("q4", dict(sym=True)), ("q4", dict(sym=False)), ("q8", dict(sym=True)), ("f16", {})]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"device copy bandwidth {bw / 1e12:.3f} TB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        for kind, opts in KINDS:
            w = torch.randn(n, k) * 0.02
            copies = max(1, min(4, int(2e9 // (n * k))))  # rotate so the 50 MB L2 cannot hold the weight
            packed = [pack.to_device(pack.quantize(w, kind, group=32, **opts) if kind != "f16"
                                     else pack.quantize(w, "f16"), dev) for _ in range(copies)]
            x = torch.randn(1, k, device=dev)
            out = torch.empty(1, n, device=dev)
            def step(i):
                gemv.linear(x, packed[i % copies], out=out)

            t = time_graph(step, launches=20, trials=15)
            nbytes = packed[0].nbytes
            label = kind + ("" if kind == "f16" else ("-sym" if opts.get("sym") else "-affine"))
            rows.append(dict(shape=name, n=n, k=k, kind=label, us=t * 1e6, gbps=nbytes / t / 1e9,
                             share=nbytes / t / bw))
            print(f"{name:18s} {label:10s} {n:>6}x{k:<6} {t * 1e6:8.1f} us {nbytes / t / 1e9:8.0f} GB/s "
                  f"{100 * nbytes / t / bw:5.1f}% of copy", flush=True)
    with open(f"{args.out}/kernel_bench.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
