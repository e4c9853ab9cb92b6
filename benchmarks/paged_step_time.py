"""The server's batched step without the server: forward_paged as BatchEngine calls it, timed per step on the
GPU machine, beside the single-sequence runner's decode of the same model. Tells the engine's own step time
apart from the HTTP server's (benchmarks/serve_bench.py measures the two together).

    python3 benchmarks/paged_step_time.py MODEL.gguf [--streams 1 8 32] [--prompt 500] [--tokens 128]

For each stream count: every sequence's prompt is prefilled through forward_paged in chunks of 512 tokens
(one sequence a call), then --tokens decode steps of all the sequences together, each step's greedy tokens
taken to the host as the engine does (one argmax of all rows, one copy). Prints the mean and median wall ms
of a decode step, the steps that captured a new graph (a new batch bucket or block-table width), and the
tokens per second the decode steps alone give; then the runner's `decode_greedy` ms a step for one sequence.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ingot
from ingot.engine.block_manager import BLOCK_SIZE
from ingot.engine.logits import greedy_tokens


def run(m, streams: int, prompt: int, tokens: int) -> dict:
    b = m.backend
    blocks_per_seq = -(-(prompt + tokens) // BLOCK_SIZE)
    cache = b.new_paged_cache(streams * blocks_per_seq, BLOCK_SIZE)
    g = torch.Generator().manual_seed(streams)
    seqs = []
    for i in range(streams):
        ids = torch.randint(0, m.spec.vocab_size, (prompt,), generator=g).tolist()
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        for start in range(0, prompt, 512):
            chunk = ids[start:start + 512]
            logits = b.forward_paged([(chunk, start, table[: -(-(start + len(chunk)) // BLOCK_SIZE)])], cache)
        seqs.append([ids + greedy_tokens(logits), table])
    times, captures = [], []
    for step in range(tokens - 1):
        before = len(b._paged_graphs)
        t0 = time.perf_counter()
        batch = [([s[0][-1]], len(s[0]) - 1, s[1][: -(-len(s[0]) // BLOCK_SIZE)]) for s in seqs]
        picks = greedy_tokens(b.forward_paged(batch, cache))
        times.append(time.perf_counter() - t0)
        if len(b._paged_graphs) != before:
            captures.append(step)
        for s, t in zip(seqs, picks):
            s[0].append(t)
    steady = [t for i, t in enumerate(times) if i not in captures]
    mean = statistics.mean(steady)
    return dict(streams=streams, mean_ms=mean * 1e3, median_ms=statistics.median(steady) * 1e3,
                capture_steps=captures, capture_ms=[round(times[i] * 1e3, 1) for i in captures],
                tok_s=streams / mean)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu: the CUDA backend under TRITON_INTERPRET=1 (a check)")
    args = ap.parse_args()
    m = ingot.load(args.model, device=args.device, backend="cuda", max_context=args.prompt + args.tokens + 16,
                   progress=False)
    for n in args.streams:
        print(run(m, n, args.prompt, args.tokens), flush=True)
    m.runner.prefill([i % m.spec.vocab_size for i in range(100, 100 + args.prompt)])
    t = None
    times = []
    for i in range(args.tokens):
        t0 = time.perf_counter()
        t = m.runner.decode_greedy(t if t is not None else 7)
        times.append(time.perf_counter() - t0)
    print(dict(runner_decode_ms=statistics.median(times[len(times) // 4:]) * 1e3), flush=True)


if __name__ == "__main__":
    main()
