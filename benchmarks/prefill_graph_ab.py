"""A/B of prefill on whole models: eager chunks (~300 Triton launches from Python per chunk) against chunks
replayed from the per-bucket CUDA graphs. For each prompt length: wall time of Runner.prefill from an empty
cache to the logits on the host side of a synchronize, mean and sd over 5 runs after 2 warm-up runs (the
first captures the graphs), and the largest |logit difference| between the two modes.

    python benchmarks/prefill_graph_ab.py --out DIR MODEL.gguf [MODEL.gguf ...]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import ingot

LENGTHS = (37, 128, 300, 512)
WARMUP, RUNS = 2, 5


def timed_prefill(m, ids):
    """Seconds of one prefill from an empty cache, and its logits."""
    m.runner.tokens = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = m.runner.prefill(ids)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, logits.clone()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.models:
        m = ingot.load(path, device="cuda", max_context=1024, progress=False)
        name = Path(path).name
        for n in LENGTHS:
            ids = torch.randint(0, m.spec.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            stats, logits = {}, {}
            for mode in ("eager", "graph"):
                m.backend.use_graph = mode == "graph"
                times = []
                for i in range(WARMUP + RUNS):
                    t, logits[mode] = timed_prefill(m, ids)
                    if i >= WARMUP:
                        times.append(t)
                stats[mode] = (statistics.mean(times), statistics.stdev(times))
            diff = float((logits["graph"] - logits["eager"]).abs().max())
            for mode, (mean, sd) in stats.items():
                rows.append(dict(model=name, tokens=n, mode=mode, mean_ms=f"{mean * 1e3:.3f}", sd_ms=f"{sd * 1e3:.3f}",
                                 tok_s=f"{n / mean:.0f}", max_logit_diff=f"{diff:.3e}"))
            (em, es), (gm, gs) = stats["eager"], stats["graph"]
            print(f"{name:28s} pp{n:<4d} eager {n / em:8.0f} tok/s (sd {es * 1e3:.2f} ms)  "
                  f"graph {n / gm:8.0f} tok/s (sd {gs * 1e3:.2f} ms)  x{em / gm:.2f}  max |dlogit| {diff:.2e}")
        m.backend.use_graph = True
        del m
        torch.cuda.empty_cache()
    with open(args.out / "prefill_graph_ab.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out / 'prefill_graph_ab.csv'}")


if __name__ == "__main__":
    main()
