"""Time from `ingot.load` to the first token: an .ingot file against the GGUF it was converted from, and
llama.cpp's own load time for the same GGUF. Runs on the GPU machine.

    python3 benchmarks/load_time.py [--key qwen3-8b] [--quant q4_0] [--dir D] [-r 3] \
        [--llama-completion PATH] [--cold] [--out results.json]

The model is a synthetic GGUF of the published shapes (`python -m ingot.bench.synthetic`, written once into
--dir), converted with `ingot convert` (its time is reported too). Each repetition is a fresh Python process,
so nothing but the OS page cache carries over: torch and CUDA are initialised before the clock starts, then
`ingot.load(path, device="cuda")` and one greedy token (`generate_ids`, 1 token after a 4-token prompt) are
timed. Without --cold the page cache is warm (the file was just written or read); --cold drops it before
every repetition (root only: /proc/sys/vm/drop_caches), which measures the disk as well.

llama.cpp: with --llama-completion (the `llama-completion` binary of a CUDA build), its
`llama_perf_context_print: load time = X ms` line for `-n 1 -ngl 99` on the same GGUF, and the process's wall
time. Its load time covers reading and uploading the weights, not CUDA initialisation, like ours here.

`ingot convert` needs xxhash (and `ingot sign` cryptography), pinned in pyproject.toml: on a GPU machine
without network, bring their cp312 manylinux wheels in .whl/ as device_check.sh expects.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, sys, time
import torch
device = sys.argv[3]
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
if device == "cuda":
    torch.cuda.init(); torch.zeros(1, device="cuda")  # CUDA context outside the clock
import ingot
t0 = time.perf_counter()
m = ingot.load(sys.argv[1], device=device, max_context=int(sys.argv[2]), progress=False)
sync()
t1 = time.perf_counter()
out = m.generate_ids([1, 2, 3, 4], max_tokens=1)
sync()
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "first_token_s": t2 - t0, "tokens": out, "format": m.format,
                  "weight_bytes": m.memory["weights"]}))
"""


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def ingot_run(path: Path, ctx: int, device: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(ctx), device], capture_output=True, text=True,
                       env=_env(), timeout=1800)
    if r.returncode:
        raise SystemExit(f"loading {path} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_run(binary: str, gguf: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([binary, "-m", str(gguf), "-p", "Hi", "-n", "1", "-ngl", "99", "--no-warmup", "-no-cnv"],
                       capture_output=True, text=True, errors="replace", timeout=1800,
                       stdin=subprocess.DEVNULL)  # a random model prints arbitrary bytes
    wall = time.perf_counter() - t0
    m = re.search(r"load time\s*=\s*([\d.]+)\s*ms", r.stderr + r.stdout)
    if not m:
        raise SystemExit(f"{binary}: no 'load time' line (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return {"load_s": float(m[1]) / 1000, "process_wall_s": wall}


def summarize(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", default="qwen3-8b", help="published shapes (ingot.bench.synthetic keys)")
    p.add_argument("--quant", default="q4_0", choices=["q4_0", "q8_0"])
    p.add_argument("--dir", default="/tmp/ingot-load-time", help="where the model files go")
    p.add_argument("-r", "--repeats", type=int, default=3)
    p.add_argument("-c", "--ctx", type=int, default=4096, help="max_context given to ingot.load")
    p.add_argument("--llama-completion", default=None, metavar="PATH", help="llama.cpp's llama-completion")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each repetition (root)")
    p.add_argument("--out", default=None, help="write every measurement as JSON here")
    p.add_argument("--layers", type=int, default=None, help="only the first N layers (a quick check)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself")
    args = p.parse_args(argv)

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{args.key}-{args.quant}" + (f"-{args.layers}l" if args.layers else "")
    gguf, native = d / f"{stem}.gguf", d / f"{stem}.ingot"
    if not gguf.exists():
        layers = ["--layers", str(args.layers)] if args.layers else []
        subprocess.run([sys.executable, "-m", "ingot.bench.synthetic", args.key, "--quant", args.quant, "-o",
                        str(gguf), *layers], check=True, env=_env())
    result = {"key": args.key, "quant": args.quant, "layers": args.layers, "device": args.device,
              "cold": args.cold, "gguf_bytes": gguf.stat().st_size}
    if not native.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ingot.cli", "convert", str(gguf), "-o", str(native)], check=True,
                       env=_env())
        result["convert_s"] = time.perf_counter() - t0
    result["ingot_bytes"] = native.stat().st_size

    runs = {"gguf": [], "ingot": [], "llama.cpp": []}
    for _ in range(args.repeats):
        for name, path in (("gguf", gguf), ("ingot", native)):
            if args.cold:
                _drop_caches()
            runs[name].append(ingot_run(path, args.ctx, args.device))
        if args.llama_completion:
            if args.cold:
                _drop_caches()
            runs["llama.cpp"].append(llama_run(args.llama_completion, gguf))
    if runs["gguf"][0]["tokens"] != runs["ingot"][0]["tokens"]:
        print("warning: the GGUF and the .ingot file gave different first tokens", file=sys.stderr)
    result["runs"] = runs

    print(f"{args.key} {args.quant}, {args.repeats} repetitions, page cache {'cold' if args.cold else 'warm'}")
    if "convert_s" in result:
        print(f"  ingot convert                 {result['convert_s']:.1f} s")
    for name in ("gguf", "ingot"):
        print(f"  Ingot from {name:<6} load        {summarize(runs[name], 'load_s')}   "
              f"to first token {summarize(runs[name], 'first_token_s')}")
    if runs["llama.cpp"]:
        print(f"  llama.cpp load time           {summarize(runs['llama.cpp'], 'load_s')}   "
              f"(process wall {summarize(runs['llama.cpp'], 'process_wall_s')})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
