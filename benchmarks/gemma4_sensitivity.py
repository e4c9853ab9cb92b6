"""Why gpu_correctness.py's Gemma 4 logits checks fail (relative error ~0.6) with no kernel at fault: on the
random-weight GGUF slices the attention is nearly argmax, so fp16 rounding of q, k and v alone (what the CUDA
backend's fp16 KV cache and tensor-core dots do) moves the logits that much. CPU only, reference backend only.

Gemma 4 attends with softmax scale 1 on RMS-normed q and k; the synthetic files' q/k norm weights are ~1
(N(1, 0.02)), so scores have std sqrt(head_dim) (16 at 256, 22.6 at 512) and the top key takes ~0.9 of the
weight. A perturbation of the scores by ~1e-2 then flips which key wins for some of the 592 x heads rows,
and the flips compound over the layers. Gemma 3 (query_pre_attn_scalar 256: scale 1/16) and trained Gemma 4
norms keep scores near std 1, where the same rounding costs ~3e-4.

Prints, for one slice with its q/k norm weights set near 1 (as the generator wrote them before it scaled
them by head_dim**-0.25): score std and mean max softmax probability per layer; the relative logits change
of the reference (fp32) when attention sees fp16-rounded q/k/v, k/v only, or q with 1e-5 noise; then the
same with the weights near head_dim**-0.25 (scores of std ~1).

    python benchmarks/gemma4_sensitivity.py gemma-4-26b-a4b q8_0 6 --overrides '{"vocab_size": 4096,
        "num_experts": 8, "top_k_experts": 2}'
    python benchmarks/gemma4_sensitivity.py gemma-4-e2b q4_0 20 --overrides '{"vocab_size": 4096,
        "vocab_size_per_layer_input": 4096}'

(the overrides shrink only the vocabulary and the experts, so the slice fits a CPU; the attention shapes
are the published ones). Measured 2026-12-02 on the CPU with fp16 q/k/v, norms near 1: 26B-A4B slice 0.567
prefill / 0.552 decode (gpu_correctness.py, CUDA backend on the H200: 0.57 / 0.76), E2B slice 0.544 / 0.644
(H200: 0.59 / 0.69); with the scaled norms 0.0003 to 0.0023 (26B-A4B). The errors near 1 vary
from draw to draw (0.29 to 0.57 for the same slice with other norm values): the flips are chaotic.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import ingot
import ingot.backends.reference as R
from ingot.bench.synthetic import write_synthetic_gguf


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("quant")
    p.add_argument("layers", type=int)
    p.add_argument("--overrides", default="{}", help="config fields for write_synthetic_gguf (JSON)")
    p.add_argument("--prompt", type=int, default=592)
    p.add_argument("--dir", default=None, help="where to write the GGUF slice (default: a temporary folder)")
    args = p.parse_args(argv)

    folder = Path(args.dir or tempfile.mkdtemp())
    path = folder / f"{args.model}-{args.quant}-L{args.layers}-sens.gguf"
    if not path.exists():
        write_synthetic_gguf(args.model, args.quant, path, layers=args.layers, progress=False,
                             overrides=json.loads(args.overrides))
    n = args.prompt
    m = ingot.load(path, device="cpu", backend="reference", dtype=torch.float32, max_context=n + 8, progress=False)
    ids = torch.randint(0, m.spec.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    orig, stats = R.attend, []

    def probe(q, k, v, pos, scale, window=0):
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("thd,shd->hts", q.float(), k.repeat_interleave(g, 1).float()) * scale
        kpos = torch.arange(k.shape[0])
        allowed = kpos[None] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - kpos[None] < window
        s = s.masked_fill(~allowed[None], float("-inf"))
        stats.append((float(s[s.isfinite()].std()), float(s.softmax(-1).max(-1).values.mean())))
        return orig(q, k, v, pos, scale, window)

    def run(att):
        R.attend = att
        try:
            m.runner.tokens = []
            return m.runner.prefill(ids[:n]).clone(), m.runner.decode(ids[n]).clone()
        finally:
            R.attend = orig

    def h(t):
        return t.half().float()

    variants = {
        "q, k, v rounded to fp16": lambda q, k, v, p, s, w=0: orig(h(q), h(k), h(v), p, s, w),
        "k, v rounded to fp16": lambda q, k, v, p, s, w=0: orig(q, h(k), h(v), p, s, w),
        "q with 1e-5 relative noise": lambda q, k, v, p, s, w=0: orig(q * (1 + 1e-5 * torch.randn_like(q)), k, v,
                                                                       p, s, w),
    }
    norms = [lw[n] for lw in m.backend.layers for n in ("attn_q_norm", "attn_k_norm") if n in lw]
    for w in norms:  # weights near 1 (what the generator wrote before ingot/bench/synthetic.py scaled them)
        w.div_(w.mean())
    for label in ("q/k norms near 1", "q/k norms * head_dim**-0.25"):
        stats.clear()
        a, da = run(probe)
        layers = [f"{sd:.1f}/{mx:.2f}" for sd, mx in stats[: m.spec.n_layers]]
        print(f"[{label}] score std / mean max softmax prob per layer: {' '.join(layers)}")
        for name, att in variants.items():
            b, db = run(att)
            print(f"[{label}] {name}: prefill rel {rel(b, a):.4f}  decode rel {rel(db, da):.4f}", flush=True)
        for w in norms:
            w.mul_(w.shape[0] ** -0.25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
