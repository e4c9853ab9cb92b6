"""A/B of prefill tile rules on whole models: pp512 with gemm.pick_tiles as it is, and with the swept
full-chunk table switched off (the general rule alone). Medians of 10 timed chunks after warm-up."""

from __future__ import annotations

import statistics
import sys

import torch

import ingot
from ingot.backends.cuda import gemm


def pp512(m, reps=10):
    ids = torch.randint(0, m.spec.vocab_size, (512,)).tolist()
    times = []
    for i in range(reps + 2):
        m.runner.tokens = []
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        m.runner.prefill(ids)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b) / 1000)
    return 512 / statistics.median(times)


def main():
    swept = gemm._swept_tiles
    for path in sys.argv[1:]:
        m = ingot.load(path, device="cuda", max_context=1024, progress=False)
        with_table = pp512(m)
        gemm._swept_tiles = lambda *a, **k: None
        general = pp512(m)
        gemm._swept_tiles = swept
        again = pp512(m)
        print(f"{path.rsplit('/', 1)[-1]:28s} swept {with_table:9.0f}  general {general:9.0f}  swept again {again:9.0f} tok/s")


if __name__ == "__main__":
    main()
