"""Where a decode step's time goes, on the GPU machine: GPU time per kernel family (eager steps under the
torch profiler), the replay time of the captured step graph alone, and the whole step as the generator
runs it (graph + host work + the token's copy to the host)."""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import ingot
from graph_timing import replay_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    m = ingot.load(args.model, device="cuda", max_context=1024, progress=False)
    b = m.backend
    m.runner.prefill(list(range(100, 108)))

    # 1. per-kernel GPU time, eager
    b.use_graph = False
    for t in range(4):
        m.runner.decode(100 + t)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(args.steps):
            m.runner.decode(200 + t)
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            per[e.key][0] += e.count
            per[e.key][1] += e.device_time_total
    total = sum(v[1] for v in per.values())
    print(f"GPU kernel time per step: {total / args.steps:.1f} us over {sum(v[0] for v in per.values()) // args.steps} launches")
    for name, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"  {us / args.steps:8.1f} us/step  {count // args.steps:4d}/step  {name[:90]}")

    # 2. graph replay alone
    b.use_graph = True
    m.runner.prefill(list(range(100, 108)))
    m.runner.decode(5)
    m.runner.decode(6)
    torch.cuda.synchronize()
    print(f"graph replay alone: {replay_us(b._graphs[1], args.steps, trials=1):.1f} us/step")

    # 3. the generator's loop
    ids = list(range(100, 108))
    m.generate_ids(ids, max_tokens=4)
    t0 = time.perf_counter()
    out = m.generate_ids(ids, max_tokens=args.steps + 1)
    dt = time.perf_counter() - t0
    s = m.last_stats
    print(f"generate_ids: {len(out)} tokens, decode {s.decode_tok_s:.0f} tok/s "
          f"({1e6 / s.decode_tok_s:.0f} us/step), whole call {dt * 1000:.1f} ms")


if __name__ == "__main__":
    main()
