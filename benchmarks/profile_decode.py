"""Where a decode step's time goes, on the GPU machine: GPU time per kernel family (eager steps under the
torch profiler), the replay time of the captured step graph alone, and the whole step as the generator
runs it (graph + host work + the token's copy to the host). With --prefill N, first the GPU time per kernel
family of one N-token prefill chunk (as the runner runs it: the chunk's graph, when it has one).

With --launches, also every kernel of one decode step in launch order (grid, duration, gap since the
previous kernel ended; negative = overlapped, as PDL allows), eager and inside the replayed graph.

    python3 benchmarks/profile_decode.py MODEL.gguf [--steps 32] [--prefill 512] [--launches]"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict

import torch

import ingot
from graph_timing import replay_us


def kernel_table(prof, runs: int, title: str, unit: str) -> None:
    """GPU time per kernel name over `runs` repetitions of what the profiler saw, largest first."""
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            per[e.key][0] += e.count
            per[e.key][1] += e.device_time_total
    total = sum(v[1] for v in per.values())
    print(f"{title}: {total / runs:.1f} {unit} over {sum(v[0] for v in per.values()) // runs} launches")
    for name, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"  {us / runs:8.1f} {unit}  {count // runs:4d}x  {name[:90]}")


def launch_table(prof, title: str) -> None:
    """Each kernel of the profiled step in order: start offset, duration, gap after the previous one, grid."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    events.sort(key=lambda e: e["ts"])
    if not events:
        print(f"{title}: the profiler saw no kernels")
        return
    t0, prev_end = events[0]["ts"], events[0]["ts"]
    print(f"{title}: {len(events)} kernels, {events[-1]['ts'] + events[-1]['dur'] - t0:.1f} us first start to last end")
    print("     start      dur      gap  grid            kernel")
    for e in events:
        grid = "x".join(str(g) for g in e.get("args", {}).get("grid", []))
        print(f"  {e['ts'] - t0:8.1f} {e['dur']:8.1f} {e['ts'] - prev_end:8.1f}  {grid:15s} {e['name'][:60]}")
        prev_end = max(prev_end, e["ts"] + e["dur"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0, metavar="N", help="also profile an N-token prefill")
    ap.add_argument("--launches", action="store_true", help="also list one step's kernels in launch order")
    args = ap.parse_args()
    m = ingot.load(args.model, device="cuda", max_context=max(1024, args.prefill + 64), progress=False)
    b = m.backend
    from torch.profiler import ProfilerActivity, profile

    if args.prefill:
        chunk = lambda first: list(range(first, first + args.prefill))  # noqa: E731 (no shared prefix)
        m.runner.prefill(chunk(1000))  # compiles, captures
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.runner.prefill(chunk(5000))
            torch.cuda.synchronize()
        kernel_table(prof, 1, f"GPU kernel time of a {args.prefill}-token prefill", "us")

    m.runner.prefill(list(range(100, 108)))

    # 1. per-kernel GPU time, eager
    b.use_graph = False
    for t in range(4):
        m.runner.decode(100 + t)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(args.steps):
            m.runner.decode(200 + t)
        torch.cuda.synchronize()
    kernel_table(prof, args.steps, "GPU kernel time per step", "us/step")
    if args.launches:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.runner.decode(300)
            torch.cuda.synchronize()
        launch_table(prof, "one eager step")

    # 2. graph replay alone
    b.use_graph = True
    m.runner.prefill(list(range(100, 108)))
    m.runner.decode(5)
    m.runner.decode(6)
    torch.cuda.synchronize()
    print(f"graph replay alone: {replay_us(b._graphs[1], args.steps, trials=1):.1f} us/step")
    if args.launches:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            b._graphs[1].replay()
            torch.cuda.synchronize()
        launch_table(prof, "one graph replay")

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
