"""A few-layer slice of Qwen3-30B-A3B (random weights, written as GGUF by ingot.bench.synthetic) on the CUDA
backend against the fp32 reference backend on the same GPU: the logits after a 512-token prefill and after
8 decode steps, then `ingot bench` pp512 / tg128 of the slice on the CUDA backend.

Pass: relative error (norm) of the logits under 1e-2 (fp16 tensor-core prefill) and the same argmax.

    python benchmarks/moe_model_check.py --out DIR [--layers 4] [--quant q4_0]   # ~2-3 minutes on the H100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import ingot
from ingot.bench.bench import format_rows, run_bench
from ingot.bench.synthetic import write_synthetic_gguf


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quant", default="q4_0", choices=["q4_0", "q8_0"])
    ap.add_argument("--gguf", default=None, help="where to write the slice (default: in --out, deleted after)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.gguf or out / f"qwen3-30b-a3b-{args.layers}l-{args.quant}.gguf")
    t0 = time.time()
    if not path.exists():
        write_synthetic_gguf("qwen3-30b-a3b", args.quant, path, layers=args.layers, progress=False)
    print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB, written in {time.time() - t0:.0f} s")

    fast = ingot.load(path, device="cuda", backend="cuda", max_context=1024)
    ref = ingot.load(path, device="cuda", backend="reference", dtype=torch.float32, max_context=1024)
    ids = torch.randint(0, fast.spec.vocab_size, (520,), generator=torch.Generator().manual_seed(0)).tolist()
    results, ok = [], True
    a, b = fast.runner.prefill(ids[:512]).clone(), ref.runner.prefill(ids[:512])
    steps = [("prefill 512", a, b)]
    for i, t in enumerate(ids[512:]):
        steps.append((f"decode {i + 1}", fast.runner.decode(t).clone(), ref.runner.decode(t)))
    for name, a, b in steps:
        err, same = rel(a, b), int(a.argmax()) == int(b.argmax())
        ok &= err < 1e-2 and same
        print(f"  {name}: logits rel err {err:.2e}, argmax {'same' if same else 'DIFFERENT'}")
        results.append(dict(step=name, rel_err=err, same_argmax=same))
    del ref
    torch.cuda.empty_cache()

    rows = run_bench(fast, n_prompt=(512,), n_gen=(128,), reps=3)
    print(format_rows(rows))
    (out / "moe_model_check.json").write_text(json.dumps(dict(
        layers=args.layers, quant=args.quant, checks=results,
        bench=[{k: v for k, v in r.items() if k != "samples"} for r in rows]), indent=2, default=str))
    if args.gguf is None:
        path.unlink()
    print(f"{'PASS' if ok else 'FAIL'} in {time.time() - t0:.0f} s; {out / 'moe_model_check.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
