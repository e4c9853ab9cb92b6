"""GPU correctness at real shapes, run by benchmarks/device_check.sh on the GPU machine.

1. Whole-model logits of each dense family (random weights, published shapes, a few layers) on the CUDA
   backend against the reference backend on the same GPU in fp32: prefill and step-by-step decode.
2. Graph replay equals eager execution of the same decode steps.
3. The embedded real models give the same greedy tokens on the GPU as the CPU reference (near-ties, where
   the two disagree, are explained by the logit gap).
Prints one line per check and writes a JSON summary; exits non-zero if any check fails."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import ingot
from ingot.bench.synthetic import write_synthetic_gguf

FAMILIES = [("llama-3.2-1b", "q4_0"), ("llama-3.2-1b", "q8_0"), ("qwen3-4b", "q4_0"), ("gemma-3-1b", "q8_0"),
            ("gemma-4-e2b", "q4_0"), ("gemma-4-26b-a4b", "q8_0")]
# Layers of each slice: 3, except Gemma 4's, which must end on a global layer; E2B's 20 reach five of its
# KV-sharing layers (16 on); 26B-A4B's 6 are five sliding layers and a global one, each with its MoE block.
LAYERS = {"gemma-4-e2b": 20, "gemma-4-26b-a4b": 6}
N_PROMPT = 592  # two prefill chunks, 512 + 80, before the 8 decode steps
RESULTS = []


def record(name, ok, **info):
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {json.dumps(info)}", flush=True)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def family_logits(models: Path, families=FAMILIES, n_prompt: int = N_PROMPT):
    for key, quant in families:
        layers = LAYERS.get(key, 3)
        path = models / f"{key}-{quant}-L{layers}.gguf"
        if not path.exists():
            write_synthetic_gguf(key, quant, path, layers=layers, progress=False)
        fast = ingot.load(path, device="cuda", backend="cuda", max_context=1024)
        ref = ingot.load(path, device="cuda", backend="reference", dtype=torch.float32, max_context=1024)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, fast.spec.vocab_size, (n_prompt + 8,), generator=g).tolist()
        a = fast.runner.prefill(ids[:-8]).clone()
        b = ref.runner.prefill(ids[:-8])
        steps_fast, steps_ref = [a], [b]
        for t in ids[-8:]:
            steps_fast.append(fast.runner.decode(t).clone())
            steps_ref.append(ref.runner.decode(t))
        err_prefill = rel(a, b)
        err_decode = max(rel(x, y) for x, y in zip(steps_fast[1:], steps_ref[1:]))
        record(f"logits {key} {quant} prompt {n_prompt}", err_prefill < 2e-2 and err_decode < 2e-2,
               prefill_rel_err=err_prefill, decode_rel_err=err_decode)
        # graph replay vs eager: the same steps again from the same prefix
        fast.runner.prefill(ids[:-8])
        graph = [fast.runner.decode(t).clone() for t in ids[-8:]]
        fast.backend.use_graph = False
        fast.runner.prefill(ids[:-8])
        eager = [fast.runner.decode(t).clone() for t in ids[-8:]]
        fast.backend.use_graph = True
        diff = max(float((x - y).abs().max()) for x, y in zip(graph, eager))
        record(f"graph == eager {key} {quant}", diff == 0.0, max_abs_diff=diff)
        del fast, ref
        torch.cuda.empty_cache()


def real_model(path: Path, prompts, steps=32):
    gpu = ingot.load(path, device="cuda", backend="cuda", max_context=512)
    cpu = ingot.load(path, device="cpu", max_context=512)
    for prompt in prompts:
        ids = cpu.tokenizer.encode(prompt)
        want = cpu.generate_ids(ids, max_tokens=steps)
        got = gpu.generate_ids(ids, max_tokens=steps)
        same = 0
        while same < min(len(want), len(got)) and want[same] == got[same]:
            same += 1
        info = {"prompt": prompt, "agree_steps": same, "steps": len(want)}
        if same < len(want):
            logits = cpu.logits(ids + want[:same + 1])[-1]
            info["cpu_gap_at_divergence"] = float(logits[want[same]] - logits[got[same]]) if same < len(got) else None
        ok = same == len(want) or (info.get("cpu_gap_at_divergence") is not None and info["cpu_gap_at_divergence"] < 0.1)
        record(f"greedy {path.name}", ok, **info)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/ingot-models"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--real", type=Path, nargs="*", default=[])
    ap.add_argument("--families", nargs="*", default=[f"{k}:{q}" for k, q in FAMILIES], metavar="KEY:QUANT")
    ap.add_argument("--prompt", type=int, default=N_PROMPT, help="prompt tokens before the 8 decode steps")
    args = ap.parse_args()
    families = [tuple(f.split(":")) for f in args.families]
    args.models.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for check in (lambda: family_logits(args.models, families, args.prompt),
                  *[(lambda p=p: real_model(p, ["The capital of France is", "def fibonacci(n):",
                                                "Once upon a time"])) for p in args.real]):
        try:
            check()
        except Exception as e:  # one broken check must not hide the others' results
            import traceback

            traceback.print_exc()
            record("exception", False, error=repr(e))
    (args.out / "gpu_correctness.json").write_text(json.dumps(RESULTS, indent=2))
    print(f"{sum(r['ok'] for r in RESULTS)}/{len(RESULTS)} checks passed in {time.time() - t0:.0f} s")
    sys.exit(0 if all(r["ok"] for r in RESULTS) else 1)


if __name__ == "__main__":
    main()
