"""One decode step's GPU time from its captured graph, and the greedy tokens it produces, on the GPU machine.

    python3 benchmarks/step_time.py MODEL.gguf [--tag T]

Prints one line: tag, model, median µs per replayed step (7 trials of 64 back-to-back replays, at a
context of ~100 tokens), generate_ids' decode tok/s, and a checksum of 32 greedy tokens, so variants of
the step (e.g. INGOT_PDL modes) can be compared for speed and for identical output in one table.
"""

from __future__ import annotations

import argparse
import os
import zlib

import ingot
from graph_timing import replay_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tag", default=os.environ.get("INGOT_PDL", ""))
    args = ap.parse_args()
    m = ingot.load(args.model, device="cuda", max_context=1024, progress=False)
    prompt = list(range(100, 196))
    tokens = m.generate_ids(prompt, max_tokens=32)
    tok_s = m.last_stats.decode_tok_s
    b = m.backend
    m.runner.prefill(prompt)
    m.runner.decode(5)
    name = os.path.basename(args.model)
    print(f"step {args.tag:>6} {name:32s} {replay_us(b._graphs[1]):8.1f} us/step  generate {tok_s:7.0f} tok/s  "
          f"tokens {zlib.crc32(str(tokens).encode()):08x}", flush=True)


if __name__ == "__main__":
    main()
