"""Decode GEMVs at real shapes for Nsight Compute: each launched a few times, eagerly, so ncu can pick one.

    ncu --clock-control none -k regex:gemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy python3 benchmarks/ncu_gemv.py qwen8b.gate_up [--kernel dp4a]

(benchmarks/ncu_gemv.sh runs the set the device script asks for.) The call is the decode step's: RMSNorm
prologue on qkv, gate_up and lm_head, gated SiLU on gate_up, a residual on o and down; plan()'s tiles.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ingot.backends.cuda import gemv
from ingot.quant import pack

SHAPES = {  # name: (N, K, gated)
    "llama3b.qkv": (5120, 3072, False), "llama3b.gate_up": (16384, 3072, True), "llama3b.down": (3072, 8192, False),
    "qwen8b.qkv": (6144, 4096, False), "qwen8b.o": (4096, 4096, False),
    "qwen8b.gate_up": (24576, 4096, True), "qwen8b.down": (4096, 12288, False),
    "qwen8b.lm_head": (151936, 4096, False),
}
NORMED = ("qkv", "gate_up", "lm_head")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--quant", default="q4", choices=("q4", "q8"))
    ap.add_argument("--kernel", default=None, choices=("word", "dp4a"), help="default: plan()'s")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    n, k, gated = SHAPES[args.shape]
    dev = torch.device("cuda")
    w = pack.quantize(torch.randn(n, k, device=dev) * 0.02, args.quant, group=32, sym=True)
    n_out = n // 2 if gated else n
    x = torch.randn(1, k, device=dev)
    norm = torch.rand(k, device=dev) + 0.5 if args.shape.split(".")[1] in NORMED else None
    res = torch.randn(1, n_out, device=dev) if args.shape.split(".")[1] in ("o", "down") else None
    act = "silu" if gated else None
    cfg = gemv.plan(n_out, k, 1, args.quant, 32, gated)
    if args.kernel == "dp4a":
        cfg = gemv._plan_dp4a(n_out, k, args.quant, 32)
    elif args.kernel == "word":
        cfg = dataclasses.replace(gemv._plan_word(n_out, k, args.quant, 32, gated))
    ws = torch.zeros(max(gemv.workspace_numel(w, 1, act, cfg), 1), device=dev)
    out = torch.empty(1, n_out, device=dev)
    for _ in range(args.calls):
        gemv.linear(x, w, out=out, norm_weight=norm, residual=res, gated=act, workspace=ws, config=cfg)
    torch.cuda.synchronize()
    print(args.shape, args.quant, cfg)


if __name__ == "__main__":
    main()
