"""Each decode projection of one layer timed alone, as the decode step calls it and with its fusions
toggled, on the GPU machine: which fusion costs what (the step's kernels ran slower than benchmarks/
gemv_sweep.py timed them alone, 2026-12-03: Qwen3-8B q4_0 gate_up 39.8 against 26.2 µs).

    python3 benchmarks/step_ops.py MODEL.gguf [--config "BN BK SPLIT WARPS UNPACK" ...]

Launch i uses layer i's weights (round the layers), so L2 does not hold them; x is random fp32. Each line:
op, variant, the config, µs a launch (median of CUDA-graph replays of 2 launches per layer), max |diff|
against the step's variant at the first layer."""

from __future__ import annotations

import argparse

import torch

import ingot
from graph_timing import time_graph
from ingot.backends.cuda import gemv
from ingot.backends.cuda.gemv import GemvConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--config", action="append", default=[],
                    help='extra word-kernel tiles for every op: "BLOCK_N BLOCK_K SPLIT WARPS UNPACK"')
    args = ap.parse_args()
    m = ingot.load(args.model, device="cuda", max_context=256, progress=False)
    b = m.backend
    layers, eps = b.w.layers, b.spec.norm_eps
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ops = [  # name, weight attribute, norm weight attribute, the step's keyword arguments
        ("qkv", "qkv", "attn_norm", dict(norm=True)),
        ("o", "o", None, dict(residual=True)),
        ("gate_up", "gate_up", "ffn_norm", dict(norm=True, gated="silu")),
        ("down", "down", None, dict(residual=True)),
    ]
    for name, attr, norm_attr, step_kw in ops:
        w = getattr(layers[0], attr)
        gated = step_kw.get("gated")
        n_out = w.n // 2 if gated else w.n
        x = torch.randn(1, w.k, device=dev)
        res = torch.randn(1, n_out, device=dev)
        out = torch.empty(1, n_out, device=dev)
        configs = [None] + [GemvConfig(1, *map(int, c.split()[:4]), kernel="word", unpack=int(c.split()[4]))
                            for c in args.config]
        ws = torch.zeros(max(gemv.workspace_numel(w, 1, gated, c) for c in configs) + 1, device=dev)
        variants = [("step", step_kw)]
        if "norm" in step_kw:
            variants.append(("no norm", {k: v for k, v in step_kw.items() if k != "norm"}))
        if "residual" in step_kw:
            variants.append(("no residual", {}))
        ref = None
        for label, kw in variants:
            for cfg in configs:
                call_kw = dict(kw)
                if call_kw.pop("residual", False):
                    call_kw["residual"] = res
                norm = call_kw.pop("norm", False)
                plan = cfg or gemv.plan(n_out, w.k, 1, w.kind, w.group, bool(gated))

                def launch(i=0, call_kw=call_kw, cfg=cfg, norm=norm):
                    lw = layers[i % len(layers)]
                    nw = getattr(lw, norm_attr) if norm else None
                    gemv.linear(x, getattr(lw, attr), out=out, norm_weight=nw, eps=eps, workspace=ws, config=cfg,
                                **call_kw)

                launch()
                torch.cuda.synchronize()
                if ref is None:
                    ref = out.clone()
                diff = (out - ref).abs().max().item() if label == "step" else float("nan")
                us = time_graph(launch, 2 * len(layers)) * 1e6
                print(f"{name:8s} {label:12s} bn{plan.block_n} bk{plan.block_k} s{plan.split} "
                      f"w{plan.num_warps} u{plan.unpack} {us:8.1f} us  diff {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
