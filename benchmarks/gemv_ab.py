"""M = 1 decode GEMV A/B on the GPU: the word kernel with its old separate split-K reduce, the word kernel
with the reduce fused into one launch, and the int8-activation dp4a kernel, at the real decode shapes.

    python3 benchmarks/gemv_ab.py --out DIR [--old-gemv FILE] [--shapes a,b] [--budget-s 170]

FILE is gemv.py from before the fused reduce (`git show 02e34b2:ingot/backends/cuda/gemv.py > FILE`); by
default the script asks git itself, and leaves the two-launch variant out if neither works.

For each shape (Llama-3.2-1B and Qwen3-8B: qkv, o, gate_up gated, down, lm_head) x kind (q4 symmetric,
q4 affine, q8; group 32) it times each variant with a few tile configs (block_n, block_k, split, num_warps).
qkv, gate_up and lm_head take the fused RMSNorm prologue, as in the decode step. Every result is first
checked against rms_norm(x) @ w.dequantize().T in fp32 (then silu(gate) * up for gate_up):
max rel err = max |out - ref| / max |ref|; the word kernels must be within 1e-4, dp4a (8-bit activations)
within 5e-2, else the config is reported WRONG and not timed. Times are medians of CUDA-graph replays of
20+ back-to-back calls rotating over weight copies of >= 160 MB in all (the 50 MB L2 cannot hold them, as
in a real decode step). GB/s = packed weight bytes (quants + scales + mins) / time; share = of 3.0 TB/s,
the H100's measured copy bandwidth. Writes DIR/gemv_ab.csv (every config) and DIR/gemv_ab_best.csv (best
per shape, kind and variant), prints the best per shape and the dp4a winners as GemvConfig lines for plan().
Past --budget-s seconds only each variant's first (plan-like) config is timed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import time_graph  # noqa: E402
from ingot.backends.cuda import gemv  # noqa: E402
from ingot.backends.cuda.gemv import GemvConfig  # noqa: E402
from ingot.quant.pack import PackedLinear  # noqa: E402

SHAPES = {  # name: (N, K, gated)
    "llama1b.qkv": (3072, 2048, False), "llama1b.o": (2048, 2048, False),
    "llama1b.gate_up": (16384, 2048, True), "llama1b.down": (2048, 8192, False),
    "llama1b.lm_head": (128256, 2048, False),
    "qwen8b.qkv": (6144, 4096, False), "qwen8b.o": (4096, 4096, False),
    "qwen8b.gate_up": (24576, 4096, True), "qwen8b.down": (4096, 12288, False),
    "qwen8b.lm_head": (151936, 4096, False),
}
KINDS = {"q4-sym": ("q4", False), "q4-affine": ("q4", True), "q8": ("q8", False)}
GROUP = 32
COPY_BW = 3.0e12
NORMED = ("qkv", "gate_up", "lm_head")
EPS = 1e-5
OLD_COMMIT = "02e34b2"  # the last gemv.py with the separate _split_reduce_kernel
# (block_n, num_warps), each with the K split for ~320 and ~640 programs; the word kernel's were swept
# already (benchmarks/gemv_sweep.py), so it gets plan()'s pick and one alternative.
DP4A_TILES = [(128, 4), (64, 4), (256, 8)]
WORD_TILES = [(64, 4)]
MAX_ERR = {"word-2launch": 1e-4, "word-fused": 1e-4, "dp4a": 5e-2}  # dp4a: 8-bit x, ~0.5-2% here


def load_old_gemv(path: str | None):
    """The pre-fusion gemv module, from FILE or from git; None when neither is there."""
    if path is None:
        try:
            src = subprocess.run(["git", "show", f"{OLD_COMMIT}:ingot/backends/cuda/gemv.py"], check=True,
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parent).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        path = tempfile.NamedTemporaryFile("w", suffix="_old_gemv.py", delete=False).name
        Path(path).write_text(src)
    spec = importlib.util.spec_from_file_location("old_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_gemv"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def random_packed(n: int, k: int, kind: str, mins: bool, dev) -> PackedLinear:
    """Quants over their whole range, scales (and mins) of a realistic size: speed does not depend on values."""
    s = (torch.rand(n, k // GROUP, device=dev) * 0.01 + 0.002).half()
    m = (torch.randn(n, k // GROUP, device=dev) * 0.02).half() if mins else None
    if kind == "q4":
        qw = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
    else:
        qw = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
    return PackedLinear(kind, n, k, GROUP, qw, s, m)


def split_for(n_out: int, k: int, block_n: int, block_k: int, programs: int) -> int:
    """K split giving about `programs` programs, no empty splits."""
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(round(programs / triton.cdiv(n_out, block_n)), k_tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


def candidates(n_out: int, k: int, kind: str, gated: bool, old) -> list[tuple[str, GemvConfig]]:
    """(variant, config); each variant's first config is plan()'s (or plan()'s tiles on the dp4a kernel)."""
    planned = gemv.plan(n_out, k, 1, kind, GROUP, gated)
    word = dataclasses.replace(planned, kernel="word")
    out = []
    if old is not None:
        out.append(("word-2launch", old.plan(n_out, k, 1, kind, GROUP, gated)))
    out.append(("word-fused", word))
    out.append(("dp4a", dataclasses.replace(word, kernel="dp4a")))
    for variant, tiles in (("word-fused", WORD_TILES), ("dp4a", DP4A_TILES)):
        for block_n, warps in tiles:
            if gated and kind == "q4" and block_n > 128:
                continue  # gate and up tiles per step: registers spill
            for programs in (gemv.TARGET_PROGRAMS, 2 * gemv.TARGET_PROGRAMS):
                split = split_for(n_out, k, block_n, word.block_k, programs)
                out.append((variant, GemvConfig(1, block_n, word.block_k, split, warps, variant.split("-")[0])))
    seen, uniq = set(), []
    for v, c in out:
        key = (v, c.block_n, c.block_k, c.split, c.num_warps)
        if key not in seen:
            seen.add(key)
            uniq.append((v, c))
    return uniq


def cfg_str(c) -> str:
    return f"bn{c.block_n} bk{c.block_k} s{c.split} w{c.num_warps}"


def run_shape(name, label, old, dev, t_start, budget_s):
    n, k, gated = SHAPES[name]
    kind, mins = KINDS[label]
    act = "silu" if gated else None
    n_out = n // 2 if gated else n
    torch.manual_seed(0)
    w0 = random_packed(n, k, kind, mins, dev)
    nbytes = w0.nbytes
    copies = min(64, max(2, math.ceil(160e6 / nbytes)))
    packed = [w0] + [dataclasses.replace(w0, qweight=w0.qweight.clone(), scales=w0.scales.clone(),
                                         mins=None if w0.mins is None else w0.mins.clone())
                     for _ in range(copies - 1)]
    x = torch.randn(1, k, device=dev)
    # as in the decode step: the RMSNorm prologue on the projections that read the residual stream
    nw = torch.randn(k, device=dev) if name.split(".")[1] in NORMED else None
    h = x if nw is None else x * torch.rsqrt(x.pow(2).mean() + EPS) * nw
    y = h @ w0.dequantize().T
    ref = torch.nn.functional.silu(y[:, :n_out]) * y[:, n_out:] if gated else y
    del y
    out = torch.empty(1, n_out, device=dev)
    cands = candidates(n_out, k, kind, gated, old)
    if time.time() - t_start > budget_s:
        firsts = {}
        for v, c in cands:
            firsts.setdefault(v, c)
        cands = list(firsts.items())
    ws_numel = max(gemv.workspace_numel(w0, 1, act, c) for v, c in cands if v != "word-2launch")
    ws = torch.zeros(ws_numel + 1, device=dev)  # zeroed: the fused kernels' ticket counters
    rows = []
    for variant, cfg in cands:
        if variant == "word-2launch":  # its own workspace: no counters, any contents will do
            mod, wsp = old, torch.empty(max(1, old.workspace_numel(w0, 1, act, cfg)), device=dev)
        else:
            mod, wsp = gemv, ws

        def step(i=0, cfg=cfg, mod=mod, wsp=wsp):
            mod.linear(x, packed[i % copies], out=out, gated=act, config=cfg, workspace=wsp, norm_weight=nw,
                       eps=EPS)

        out.fill_(float("nan"))
        try:
            step()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result too
            print(f"  {name} {label} {variant} {cfg_str(cfg)}: error {type(e).__name__}: {e}"[:300], flush=True)
            continue
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        ok = math.isfinite(err) and err < MAX_ERR[variant]
        t = time_graph(step, max(20, copies)) if ok else float("nan")
        rows.append(dict(shape=name, n=n, k=k, gated=int(gated), kind=label, variant=variant,
                         config=cfg_str(cfg), block_n=cfg.block_n, block_k=cfg.block_k, split=cfg.split,
                         num_warps=cfg.num_warps, us=t * 1e6, gbps=nbytes / t / 1e9, share=nbytes / t / COPY_BW,
                         max_rel_err=err, ok=int(ok)))
        if not ok:
            print(f"  {name} {label} {variant} {cfg_str(cfg)}: WRONG max rel err {err:.3g}", flush=True)
    del packed, w0, ref
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--old-gemv", default=None, help="gemv.py of commit 02e34b2 (default: from git)")
    ap.add_argument("--shapes", default="", help="comma-separated subset of shape names")
    ap.add_argument("--budget-s", type=float, default=170.0, help="after this, only each variant's first config")
    args = ap.parse_args()
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full fp32
    dev = torch.device("cuda")
    old = load_old_gemv(args.old_gemv)
    print(f"{torch.cuda.get_device_name(dev)}; two-launch baseline: {'yes' if old else 'NOT FOUND, skipped'}",
          flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, best_rows = [], []
    for name in [s for s in args.shapes.split(",") if s] or list(SHAPES):
        for label in KINDS:
            got = [r for r in run_shape(name, label, old, dev, t_start, args.budget_s) if r["ok"]]
            rows += got
            per_variant = {}
            for r in got:
                if r["variant"] not in per_variant or r["us"] < per_variant[r["variant"]]["us"]:
                    per_variant[r["variant"]] = r
            best_rows += per_variant.values()
            us = {v: r["us"] for v, r in per_variant.items()}
            base = us.get("word-fused", float("nan"))
            line = "  ".join(f"{v} {t:6.1f}us x{base / t:4.2f}" for v, t in us.items())
            d = per_variant.get("dp4a")
            print(f"{name:16s} {label:9s} {line}  dp4a best [{d['config'] if d else '-'}] "
                  f"{100 * d['share'] if d else 0:4.1f}% ({time.time() - t_start:.0f}s)", flush=True)
    for fname, data in (("gemv_ab.csv", rows), ("gemv_ab_best.csv", best_rows)):
        if data:
            with open(Path(args.out) / fname, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(data[0]))
                wr.writeheader()
                wr.writerows(data)
    print("\ndp4a winners for plan(): (n_out, k, kind, gated): GemvConfig(block_m, block_n, block_k, split, "
          "num_warps, kernel)")
    for r in best_rows:
        if r["variant"] == "dp4a":
            n_out = r["n"] // 2 if r["gated"] else r["n"]
            fused = next((b["us"] for b in best_rows if b["variant"] == "word-fused" and b["shape"] == r["shape"]
                          and b["kind"] == r["kind"]), float("nan"))
            print(f"  ({n_out}, {r['k']}, {KINDS[r['kind']][0]!r}, {bool(r['gated'])}): GemvConfig(1, "
                  f"{r['block_n']}, {r['block_k']}, {r['split']}, {r['num_warps']}, 'dp4a'),  # {r['kind']} "
                  f"{r['us']:.1f} us ({100 * r['share']:.0f}%), word-fused {fused:.1f} us")
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
