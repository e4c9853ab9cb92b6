"""`ingot bench`: llama-bench-style prefill and decode throughput of one model on one device.

    ingot bench MODEL [-p 512] [-n 128] [-r 5] [--batch 1] [-o table|csv|json] [--roofline] [--device D]

ppN: N random token ids prefilled from an empty cache, tokens/s. tgN: N tokens decoded one at a time
(greedy) after a short prompt, tokens/s. Each is the mean and standard deviation over -r timed repetitions
that follow --warmup untimed ones; on a GPU every repetition is bracketed by torch.cuda.synchronize().

For tg rows the table adds the weight bytes one decode step reads (the backend's own figure
`weight_bytes_per_token` when it has one, else the checkpoint's packed tensor bytes without the embedding
table, which a decode only gathers from, and with only top_k / n_experts of each MoE expert tensor), the
effective bandwidth that implies, and with --roofline its share of a measured device copy bandwidth.

This module imports torch lazily so that `ingot --help` stays fast.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ingot.errors import IngotError

TG_PROMPT = 8  # tokens prefilled (untimed) before a tg test

FIELDS = ["date", "commit", "ingot_version", "model", "path", "arch", "size_bytes", "params", "backend", "device",
          "gpu_name", "dtype", "test", "n_prompt", "n_gen", "batch", "reps", "warmup", "tps_mean", "tps_sd",
          "bytes_per_token", "eff_bw_bytes_s", "copy_bw_bytes_s", "bw_share"]


# ---- arguments ------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise IngotError(f"expected an integer or a comma-separated list of them, got {text!r}") from None
    if any(v < 0 for v in values):
        raise IngotError(f"token counts must not be negative, got {text!r}")
    return values


def add_arguments(p) -> None:
    """The `ingot bench` options (used by ingot.cli)."""
    p.add_argument("model", help="a .gguf file, a Hugging Face or MLX folder, or an embedded name")
    p.add_argument("-p", "--n-prompt", default="512", metavar="N",
                   help="prompt tokens for the pp test; a comma list runs several, 0 skips (512)")
    p.add_argument("-n", "--n-gen", default="128", metavar="N",
                   help="tokens to generate for the tg test; a comma list runs several, 0 skips (128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="R", help="timed repetitions per test (5)")
    p.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed repetitions before those (1)")
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="sequences prefilled and decoded together, 1..32; the CUDA backend only (1)")
    p.add_argument("-o", "--output", default="table", choices=["table", "csv", "json"], help="output format")
    p.add_argument("--roofline", action="store_true",
                   help="also measure the device's copy bandwidth and show each tg test's share of it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")


def run_cli(args) -> int:
    rows = run_bench(args.model, n_prompt=_int_list(args.n_prompt), n_gen=_int_list(args.n_gen),
                     reps=args.repetitions, warmup=args.warmup, batch=args.batch, device=args.device,
                     roofline=args.roofline, seed=args.seed, log=sys.stderr)
    print(format_rows(rows, args.output))
    return 0


# ---- measuring ------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(runner) -> None:
    """An empty cache: the next prefill starts at position 0 and reuses nothing."""
    runner.tokens = []
    runner.cache.length = 0


def _timed(device, fn) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t




def _check_batch(batch: int) -> None:
    if batch < 1:
        raise IngotError(f"--batch must be at least 1, got {batch}")


def _batch_api(model, batch: int):
    backend = model.backend
    most = int(getattr(backend, "max_batch", 1) or 1)
    name = getattr(backend, "name", type(backend).__name__)
    _check_batch(batch)
    if batch > most:
        raise IngotError(f"--batch {batch}: the {name} backend was loaded with max_batch {most}")
    if batch == 1:
        return None
    runner = model.runner
    return runner


def bench_prefill(model, n: int, reps: int, warmup: int, rng, batch: int = 1) -> list[float]:
    """Tokens/s of prefilling n random ids from an empty cache, one sample per timed repetition."""
    runner, vocab, device = model.runner, model.spec.vocab_size, model.device
    batched = _batch_api(model, batch)
    samples = []
    for rep in range(warmup + reps):
        seqs = [[int(i) for i in rng.integers(0, vocab, n)] for _ in range(batch)]
        if batched is None:
            _reset(runner)
            dt = _timed(device, lambda: runner.prefill(seqs[0]))
        else:
            dt = _timed(device, lambda: batched.prefill_batch(seqs))
        if rep >= warmup:
            samples.append(batch * n / dt)
    return samples


def bench_decode(model, n: int, reps: int, warmup: int, rng, batch: int = 1) -> list[float]:
    """Tokens/s of n greedy decode steps after a TG_PROMPT-token prompt, one sample per timed repetition."""
    runner, vocab, device = model.runner, model.spec.vocab_size, model.device
    batched = _batch_api(model, batch)
    samples = []
    for rep in range(warmup + reps):
        seqs = [[int(i) for i in rng.integers(0, vocab, TG_PROMPT)] for _ in range(batch)]
        if batched is None:
            _reset(runner)
            first = int(runner.prefill(seqs[0]).argmax())

            def loop():  # the generator's greedy path: each step queued before the previous one is read
                for _ in runner.greedy(first, n):
                    pass
        else:
            toks = [int(t) for t in batched.prefill_batch(seqs).argmax(-1)]

            def loop():
                cur = toks
                for _ in range(n):
                    cur = batched.decode_batch_greedy(cur)

        _sync(device)
        dt = _timed(device, loop)
        if rep >= warmup:
            samples.append(batch * n / dt)
    return samples


# ---- what the model is ----------------------------------------------------------------------------------
def model_bytes(model, ckpt=None) -> dict:
    """size_bytes and params of the checkpoint's tensors, and the weight bytes one decode step reads."""
    if ckpt is None:
        from ingot.formats import open_checkpoint

        ckpt = open_checkpoint(model.path)
    import math

    size = sum(t.nbytes for t in ckpt.tensors.values())
    params = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    own = getattr(model.backend, "weight_bytes_per_token", None)
    if own is not None:
        per_token = int(own() if callable(own) else own)
    else:
        spec = model.spec
        per_token = 0
        for name in spec.weights():
            nbytes = ckpt.tensors[name].nbytes
            if name == "token_embd.weight" and not spec.tie_embeddings:
                continue  # only gathered; a tied table is read whole as the output matrix
            if "_exps." in name:
                moe = spec.layers[int(name.split(".")[1])].moe
                nbytes = nbytes * moe.top_k // moe.n_experts
            per_token += nbytes
    return {"size_bytes": int(size), "params": int(params), "bytes_per_token": int(per_token)}


def git_commit() -> str | None:
    """The commit of the checkout Ingot runs from (with '-dirty' for uncommitted changes), if any.
    INGOT_COMMIT names it where the code runs from a copy without .git (the GPU machine's working tree)."""
    if os.environ.get("INGOT_COMMIT"):
        return os.environ["INGOT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---- the run --------------------------------------------------------------------------------------------
def run_bench(model, n_prompt=(512,), n_gen=(128,), reps: int = 5, warmup: int = 1, batch: int = 1,
              device=None, roofline: bool = False, seed: int = 0, log=None) -> list[dict]:
    """One result row (a dict with FIELDS and `samples`) per pp and tg test.

    model: an ingot.Model, or anything ingot.load takes (it is then loaded with a context that fits the
    longest test)."""
    import numpy as np

    import ingot
    from ingot.api import Model
    from ingot.bench.roofline import copy_bandwidth, device_name

    n_prompt = [n_prompt] if isinstance(n_prompt, int) else list(n_prompt)
    n_gen = [n_gen] if isinstance(n_gen, int) else list(n_gen)
    if reps < 1:
        raise IngotError(f"repetitions must be at least 1, got {reps}")
    if warmup < 0:
        raise IngotError(f"warmup must not be negative, got {warmup}")
    if not any(n_prompt) and not any(n_gen) and not roofline:
        raise IngotError("nothing to measure: every prompt (-p) and generation (-n) count is 0")
    _check_batch(batch)  # before the load, which would word it as max_batch
    need = max([p for p in n_prompt] + [TG_PROMPT + g for g in n_gen if g] + [1])
    if not isinstance(model, Model):
        if log:
            print(f"loading {model} ...", file=log, flush=True)
        model = ingot.load(model, device=device, max_context=need, max_batch=batch)
    elif model.max_context < need:
        raise IngotError(f"the model was loaded with a context of {model.max_context}; the tests need {need}")
    _batch_api(model, batch)  # a clear error before any test runs
    info = model_bytes(model)
    dev = model.device
    copy_bw = None
    if roofline:
        if log:
            print("measuring copy bandwidth ...", file=log, flush=True)
        copy_bw = copy_bandwidth(dev)
    base = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "ingot_version": ingot.__version__,
        "model": Path(model.path).name,
        "path": str(model.path),
        "arch": model.arch,
        "size_bytes": info["size_bytes"],
        "params": info["params"],
        "backend": getattr(model.backend, "name", type(model.backend).__name__),
        "device": str(dev),
        "gpu_name": device_name(dev) if dev.type == "cuda" else None,
        "dtype": str(getattr(model.backend, "dtype", "")).replace("torch.", "") or None,
        "batch": batch,
        "reps": reps,
        "warmup": warmup,
        "copy_bw_bytes_s": copy_bw,
    }
    rng = np.random.default_rng(seed)
    rows = []
    tests = [("pp", p) for p in n_prompt if p] + [("tg", g) for g in n_gen if g]
    for kind, n in tests:
        if log:
            print(f"{kind}{n} ...", file=log, flush=True)
        fn = bench_prefill if kind == "pp" else bench_decode
        samples = fn(model, n, reps, warmup, rng, batch)
        mean = statistics.fmean(samples)
        sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
        row = dict(base, test=f"{kind}{n}" + (f" b{batch}" if batch > 1 else ""),
                   n_prompt=n if kind == "pp" else TG_PROMPT, n_gen=n if kind == "tg" else 0,
                   tps_mean=mean, tps_sd=sd, bytes_per_token=None, eff_bw_bytes_s=None, bw_share=None,
                   samples=samples)
        if kind == "tg":
            # One decode step reads the weights once for the whole batch: bandwidth follows steps/s.
            row["bytes_per_token"] = info["bytes_per_token"]
            row["eff_bw_bytes_s"] = info["bytes_per_token"] * mean / batch
            if copy_bw:
                row["bw_share"] = row["eff_bw_bytes_s"] / copy_bw
        rows.append(row)
    return rows


# ---- output ---------------------------------------------------------------------------------------------
def _human_bytes(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _human_params(n) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_table(rows: list[dict]) -> str:
    """A Markdown table like llama-bench's."""
    head = ["model", "size", "params", "backend", "device", "test", "t/s", "B/tok", "eff BW", "% copy BW"]
    body = []
    for r in rows:
        body.append([
            r["model"], _human_bytes(r["size_bytes"]), _human_params(r["params"]), r["backend"],
            r["gpu_name"] or r["device"], r["test"], f"{r['tps_mean']:.2f} ± {r['tps_sd']:.2f}",
            _human_bytes(r["bytes_per_token"]) if r["bytes_per_token"] else "",
            f"{r['eff_bw_bytes_s'] / 1e9:.1f} GB/s" if r["eff_bw_bytes_s"] else "",
            f"{100 * r['bw_share']:.1f}%" if r["bw_share"] else "",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    right = {2, 6, 7, 8, 9, 1}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    lines = [line(head), sep] + [line(b) for b in body]
    if rows and rows[0].get("copy_bw_bytes_s"):
        lines.append(f"\ncopy bandwidth: {rows[0]['copy_bw_bytes_s'] / 1e9:.1f} GB/s (read + write)")
    if rows:
        lines.append(f"\ncommit {rows[0]['commit'] or 'unknown'}, {rows[0]['date']}")
    return "\n".join(lines)


def format_rows(rows: list[dict], fmt: str = "table") -> str:
    if fmt == "table":
        return format_table(rows)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in FIELDS})
        return out.getvalue().rstrip("\n")
    raise IngotError(f"unknown output format '{fmt}' (table, csv, json)")
