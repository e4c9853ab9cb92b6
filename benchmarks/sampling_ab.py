"""Per-step cost of picking the next token at batch 1 on the GPU: old (whole-row sort; penalties on the
CPU after copying the logits to the host) against new (candidate prefilter; penalties on the device).

    python3 benchmarks/sampling_ab.py --out DIR [--steps 200]

For vocabularies 128256 (Llama 3) and 151936 (Qwen) and the chains greedy, temperature only, top-k 40, top-p
0.9, min-p 0.05, top-p 0.9 with penalties, and greedy with penalties, each step copies a fixed logits row
(randn * 3: peaked like a model's) into the work buffer, picks a token and brings its id to the host, as
the decode loop does; the time is wall clock per step after warm-up. Also checks, on 64 stratified
uniforms, that the new path draws the same tokens as the sort where the kept prefix lies in the candidates
and reports how many rows did. Writes DIR/sampling_ab.csv and prints a table; about a minute on an H100.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ingot.backends.cuda import sampling  # noqa: E402
from ingot.engine.sampler import Sampler, SamplingParams  # noqa: E402

VOCABS = (128256, 151936)
PENALTIES = dict(repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)
CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_k_40": dict(temperature=0.8, top_k=40),
    "top_p_0.9": dict(temperature=0.8, top_p=0.9),
    "min_p_0.05": dict(temperature=0.8, min_p=0.05),
    "top_p_0.9+penalties": dict(temperature=0.8, top_p=0.9, **PENALTIES),
    "greedy+penalties": dict(temperature=0.0, **PENALTIES),
}


def _device_params(p: SamplingParams, M: int):
    def col(v, dt):
        return torch.full((M,), v, dtype=dt, device="cuda")

    return dict(temperature=col(p.temperature, torch.float32), top_k=col(p.top_k or 0, torch.int32),
                top_p=col(1.0 if p.top_p is None else p.top_p, torch.float32), min_p=col(p.min_p or 0.0, torch.float32),
                seed_offset=torch.arange(M, dtype=torch.int64, device="cuda"))


def _old_step(p: SamplingParams, V: int):
    """The previous Sampler: penalties (and so everything after them) on the CPU, else the whole-row sort."""
    if p.penalised:
        sampler = Sampler(p)
        return lambda work, history: sampler(work.cpu(), history)
    if p.temperature == 0.0:
        return lambda work, history: int(work.argmax())
    d = _device_params(p, 1)
    ws = sampling.sample_workspace(1, V, "cuda", candidates=None)
    out = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step(work, history):
        sampling.sample(work.view(1, V), **d, out=out, workspace=ws)
        d["seed_offset"] += 1
        return int(out[0])

    return step


def _new_step(p: SamplingParams, V: int):
    sampler = Sampler(p)
    return lambda work, history: sampler(work, history)


def _time(step, src: torch.Tensor, steps: int, warmup: int = 20) -> float:
    work = torch.empty_like(src)
    history = list(range(100, 164))  # a prompt's last 64 tokens
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        work.copy_(src)
        history.append(step(work, history))
    return (time.perf_counter() - t0) / steps


def _agreement(src: torch.Tensor, chain: dict, N: int = 64) -> tuple[int, int]:
    """Rows (of N stratified uniforms) where prefilter and sort agree, and rows that stayed on candidates."""
    V = src.numel()
    x = src.view(1, V).expand(N, V).contiguous()
    d = _device_params(SamplingParams(**chain), N)
    u = ((torch.arange(N, device="cuda") + 0.5) / N).float()
    ws = sampling.sample_workspace(N, V, "cuda")
    new = sampling.sample(x, **d, uniforms=u, workspace=ws)
    old = sampling.sample(x, **d, uniforms=u, workspace=sampling.sample_workspace(N, V, "cuda", candidates=None))
    return int((new == old).sum()), int(ws["row"][:, 2].min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(torch.cuda.get_device_name(0))
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for V in VOCABS:
        src = torch.randn(V, generator=g, device="cuda") * 3
        for name, chain in CASES.items():
            p = SamplingParams(seed=1, **chain)
            old = _time(_old_step(p, V), src, args.steps)
            new = _time(_new_step(p, V), src, args.steps)
            agree, n_cand = _agreement(src, {k: v for k, v in chain.items() if k not in PENALTIES}) \
                if chain["temperature"] > 0 else (64, 0)
            rows.append(dict(vocab=V, case=name, old_us=round(old * 1e6, 1), new_us=round(new * 1e6, 1),
                             speedup=round(old / new, 2), same_tokens_of_64=agree, candidates=n_cand))
            print(f"V={V:6d} {name:22s} old {old * 1e6:8.1f} us  new {new * 1e6:8.1f} us  x{old / new:5.2f}"
                  f"  same tokens {agree}/64  candidates {n_cand}", flush=True)
    path = os.path.join(args.out, "sampling_ab.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
